"""ONNX forms of the wider op surface: math functions, comparisons and logic, reductions, indexing
(gathers, scatters, sorting) and resampling. Registered into ``onnx.EMITTERS`` on import.

ONNX does not promote types the way torch does, so operands are cast to the dtype torch computes
in before comparing or combining them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx import helper as onnx_helper

from slimgraph.backends.onnx import (
    _ONNX_DTYPE,
    EMITTERS,
    _Builder,
    _reduce_axes,
    _reduce_mean,
    _simple,
    _softplus,
    emitter,
)
from slimgraph.errors import UnsupportedError
from slimgraph.ir import DType, Node, Value
from slimgraph.ir.symbolic import SymDim

for _op, _onnx in {"sin": "Sin", "cos": "Cos", "asin": "Asin", "acos": "Acos", "atan": "Atan",
                   "sinh": "Sinh", "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh",
                   "ceil": "Ceil", "floor": "Floor", "round": "Round", "sign": "Sign", "reciprocal": "Reciprocal",
                   "isnan": "IsNaN", "softsign": "Softsign"}.items():
    EMITTERS[_op] = _simple(_onnx)


def _cast(b: _Builder, name: str, have: DType, want: DType) -> str:
    return name if have == want else b.add("Cast", [name], 1, to=_ONNX_DTYPE[want])[0]


def _common(node: Node) -> DType:
    """The dtype torch computes a binary op's operands in."""
    a, c = node.inputs[0], node.inputs[1]
    if a.rank == 0 and c.rank > 0 and a.dtype.is_float == c.dtype.is_float:
        return c.dtype
    if c.rank == 0 and a.rank > 0 and a.dtype.is_float == c.dtype.is_float:
        return a.dtype
    return DType.from_torch(torch.promote_types(a.dtype.torch, c.dtype.torch))


def _operands(b: _Builder, node: Node, dtype: DType | None = None) -> list[str]:
    dtype = dtype or _common(node)
    return [_cast(b, b.name(v), v.dtype, dtype) for v in node.inputs[:2]]


@emitter("isinf")
def emit_isinf(b, node):
    """IsInf takes float16 and bfloat16 from opset 20 on: before, they are cast to float32 (exactly)."""
    x = node.inputs[0]
    name = b.inp(0)
    if b.opset < 20 and x.dtype in (DType.float16, DType.bfloat16):
        name = _cast(b, name, x.dtype, DType.float32)
    b.add("IsInf", [name], [b.out()])


@emitter("tan")
def emit_tan(b, node):
    """onnxruntime has no float64 Tan, and in float32 (NO_DOUBLE_KERNEL) the input's rounding grows
    by x * tan(x) near a pole (1e-4 relative at tan(x) = 1000): a float64 one is sin / cos."""
    if node.inputs[0].dtype != DType.float64:
        b.add("Tan", [b.inp(0)], [b.out()])
        return
    b.add("Div", [b.add("Sin", [b.inp(0)], 1)[0], b.add("Cos", [b.inp(0)], 1)[0]], [b.out()])


@emitter("logical_not")
def emit_logical_not(b, node):
    """ONNX's Not takes bool only: other types are cast to it first (nonzero, NaN too, is true)."""
    x = node.inputs[0]
    b.add("Not", [_cast(b, b.inp(0), x.dtype, DType.bool)], [b.out()])


@emitter("trunc")
def emit_trunc(b, node):
    x = b.inp(0)
    b.add("Mul", [b.add("Sign", [x], 1)[0], b.add("Floor", [b.add("Abs", [x], 1)[0]], 1)[0]], [b.out()])


@emitter("expm1", "log1p")
def emit_expm1_log1p(b, node):
    """exp(x) - 1 and log(1 + x) with no cancellation near 0, as torch computes them (exp(x) - 1 of
    x = -1.7e-7 is 8% off in float32, ir 11000386): Kahan's forms (u - 1) * x / log(u) and
    log(u) * x / (u - 1) for u = exp(x) or 1 + x where |x| < 0.5 (x itself where u rounds to 1), the
    plain ones past it. 16-bit floats compute in float32 between casts (comparisons of them need
    newer onnxruntime kernels)."""
    v = node.inputs[0]
    wide = DType.float32 if v.dtype in (DType.float16, DType.bfloat16) else v.dtype
    x = _cast(b, b.inp(0), v.dtype, wide)

    def scalar(number: float) -> str:
        return b.initializer(torch.tensor(number, dtype=wide.torch), "c")

    u = b.add("Exp", [x], 1)[0] if node.op == "expm1" else b.add("Add", [x, scalar(1.0)], 1)[0]
    d, log = b.add("Sub", [u, scalar(1.0)], 1)[0], b.add("Log", [u], 1)[0]
    ratio = b.add("Div", [b.add("Mul", [d, x], 1)[0], log], 1)[0] if node.op == "expm1" else \
        b.add("Div", [b.add("Mul", [log, x], 1)[0], d], 1)[0]
    near = b.add("Where", [b.add("Equal", [d, scalar(0.0)], 1)[0], x, ratio], 1)[0]
    small = b.add("Less", [b.add("Abs", [x], 1)[0], scalar(0.5)], 1)[0]
    plain = d if node.op == "expm1" else log
    if wide == v.dtype:
        b.add("Where", [small, near, plain], [b.out()])
    else:
        b.add("Cast", [b.add("Where", [small, near, plain], 1)[0]], [b.out()], to=_ONNX_DTYPE[v.dtype])


@emitter("log2", "log10", "logsigmoid", "mish")
def emit_log_family(b, node):
    x, v = b.inp(0), node.inputs[0]
    if node.op in ("log2", "log10"):
        base = b.scalar_like(math.log(2.0 if node.op == "log2" else 10.0), v, "ln_base")
        b.add("Div", [b.add("Log", [x], 1)[0], base], [b.out()])
    elif node.op == "logsigmoid":  # -softplus(-x)
        b.add("Neg", [_softplus(b, b.add("Neg", [x], 1)[0], v.dtype)], [b.out()])
    else:  # mish: x * tanh(softplus(x))
        b.add("Mul", [x, b.add("Tanh", [_softplus(b, x, v.dtype)], 1)[0]], [b.out()])


_COMPARE = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual",
            "logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}


@emitter(*_COMPARE, "ne")
def emit_compare(b, node):
    logical = node.op.startswith("logical")
    operands = _operands(b, node, DType.bool if logical else None)
    if node.op == "ne":
        b.add("Not", [b.add("Equal", operands, 1)[0]], [b.out()])
    else:
        b.add(_COMPARE[node.op], operands, [b.out()])


@emitter("bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not")
def emit_bitwise(b, node):
    """Integer bitwise ops need opset 18; on bools they are the logical ones (any opset)."""
    if all(v.dtype == DType.bool for v in node.inputs):
        onnx_op = {"bitwise_and": "And", "bitwise_or": "Or", "bitwise_xor": "Xor", "bitwise_not": "Not"}[node.op]
        b.add(onnx_op, [b.inp(i) for i in range(len(node.inputs))], [b.out()])
        return
    if b.opset < 18:
        raise UnsupportedError(f"node {node.name}: integer {node.op} needs ONNX opset 18 or newer (asked for "
                               f"{b.opset}); pass opset=18")
    onnx_op = {"bitwise_and": "BitwiseAnd", "bitwise_or": "BitwiseOr", "bitwise_xor": "BitwiseXor",
               "bitwise_not": "BitwiseNot"}[node.op]
    b.add(onnx_op, _operands(b, node) if node.op != "bitwise_not" else [b.inp(0)], [b.out()])


@emitter("fmod", "remainder")
def emit_mod(b, node):
    """ONNX's Mod: fmod=1 is C's, fmod=0 Python's (integers only). A float remainder is torch's:
    fmod, plus b where that is nonzero and of the other sign. A zero keeps a's sign (remainder(-2, -2)
    is -0.0, which atan2 or 1 / x tell apart), where a - floor(a / b) * b would give +0.0."""
    out = node.outputs[0]
    a, c = _operands(b, node, out.dtype)
    if node.op == "fmod" or not out.dtype.is_float:
        b.add("Mod", [a, c], [b.out()], fmod=int(node.op == "fmod" or out.dtype.is_float))
        return
    mod = b.add("Mod", [a, c], 1, fmod=1)[0]
    zero = b.scalar_like(0.0, out, "zero")
    sides = b.add("Xor", [b.add("Less", [c, zero], 1)[0], b.add("Less", [mod, zero], 1)[0]], 1)[0]
    wrapped = b.add("And", [sides, b.add("Not", [b.add("Equal", [mod, zero], 1)[0]], 1)[0]], 1)[0]
    b.add("Where", [wrapped, b.add("Add", [mod, c], 1)[0], mod], [b.out()])


@emitter("atan2")
def emit_atan2(b, node):
    """atan(y / x), moved by +-pi into the left half-plane, as torch.atan2; atan2(+-0, +-0) is +-0 or
    +-pi (y / x would be NaN: x is 1 there). A zero's sign is read off 1 / v (torch.atan2(-0.0, -1) is
    -pi, where y < 0 says +pi)."""
    out = node.outputs[0]
    y, x = _operands(b, node, out.dtype)
    zero, one = b.scalar_like(0.0, out, "zero"), b.scalar_like(1.0, out, "one")

    def negative(v: str) -> str:  # v < 0, -0.0 included (1 / -0.0 is -inf)
        return b.add("Or", [b.add("Less", [v, zero], 1)[0], b.add("Less", [b.add("Div", [one, v], 1)[0], zero],
                                                                   1)[0]], 1)[0]

    origin = b.add("And", [b.add("Equal", [y, zero], 1)[0], b.add("Equal", [x, zero], 1)[0]], 1)[0]
    divisor = b.add("Where", [origin, one, x], 1)[0]
    base = b.add("Atan", [b.add("Div", [y, divisor], 1)[0]], 1)[0]
    pi = b.add("Where", [negative(y), b.scalar_like(-math.pi, out, "minus_pi"), b.scalar_like(math.pi, out, "pi")],
               1)[0]
    b.add("Where", [negative(x), b.add("Add", [base, pi], 1)[0], base], [b.out()])  # base + 0 would lose -0.0


@emitter("where")
def emit_where(b, node):
    out = node.outputs[0]
    a, c = (_cast(b, b.name(v), v.dtype, out.dtype) for v in node.inputs[1:])
    b.add("Where", [b.inp(0), a, c], [b.out()])


# ---------------------------------------------------------------------------- reductions
def _reduce(b: _Builder, onnx_op: str, x: str, axes: list[int], keep: int, outputs) -> str:
    return _reduce_axes(b, onnx_op, x, axes, keep, outputs)


@emitter("amax", "amin", "prod")
def emit_minmax(b, node):
    onnx_op = {"amax": "ReduceMax", "amin": "ReduceMin", "prod": "ReduceProd"}[node.op]
    _reduce(b, onnx_op, b.inp(0), node.attrs["axes"], int(node.attrs.get("keepdim", False)), [b.out()])


@emitter("any")
def emit_any(b, node):
    """Truth (nonzero) as 0 or 1, then the max: a float cast straight to an integer would truncate
    0.25 to 0, and the max of -1 and 0 is 0."""
    truth = _cast(b, b.inp(0), node.inputs[0].dtype, DType.bool)
    as_int = b.add("Cast", [truth], 1, to=_ONNX_DTYPE[DType.int32])[0]
    top = _reduce(b, "ReduceMax", as_int, node.attrs["axes"], int(node.attrs.get("keepdim", False)), 1)
    b.add("Cast", [top], [b.out()], to=_ONNX_DTYPE[DType.bool])


@emitter("var")
def emit_var(b, node):
    """Two passes in float64, rounded once, as torch's CPU var accumulates in double: in float32 the
    mean's rounding leaves x - mean nonzero where x is constant (a variance of 4e-15, not 0) and
    costs up to 1e-3 relative where the mean is large beside the spread."""
    x, a = node.inputs[0], node.attrs
    axes, keep = a["axes"], int(a.get("keepdim", False))
    count = math.prod(x.shape[i] for i in axes)
    wide = _cast(b, b.inp(0), x.dtype, DType.float64)
    centered = b.add("Sub", [wide, _reduce_mean(b, wide, axes, 1)], 1)[0]
    squares = _reduce(b, "ReduceSum", b.add("Mul", [centered, centered], 1)[0], axes, keep, 1)
    denominator = b.initializer(torch.tensor(max(count - a.get("correction", 1), 0), dtype=torch.float64), "count")
    out = node.outputs[0].dtype
    var = b.add("Div", [squares, denominator], [b.out()] if out == DType.float64 else 1)[0]
    if out != DType.float64:
        b.add("Cast", [var], [b.out()], to=_ONNX_DTYPE[out])


@emitter("argmax", "argmin")
def emit_argmax(b, node):
    b.add("ArgMax" if node.op == "argmax" else "ArgMin", [b.inp(0)], [b.out()], axis=node.attrs["axes"][0],
          keepdims=int(node.attrs.get("keepdim", False)))


@emitter("cumsum")
def emit_cumsum(b, node):
    b.add("CumSum", [b.inp(0), b.const(np.asarray(node.attrs["axis"], dtype=np.int64), "axis")], [b.out()])


# ---------------------------------------------------------------------------- indexing
def _int64(b: _Builder, v: Value) -> str:
    return _cast(b, b.name(v), v.dtype, DType.int64)


@emitter("embedding")
def emit_embedding(b, node):
    b.add("Gather", [b.inp(0), _int64(b, node.inputs[1])], [b.out()], axis=0)


@emitter("take")
def emit_take(b, node):
    b.add("Gather", [b.inp(0), _int64(b, node.inputs[1])], [b.out()], axis=node.attrs["axis"])


@emitter("gather_elements")
def emit_gather_elements(b, node):
    b.add("GatherElements", [b.inp(0), _int64(b, node.inputs[1])], [b.out()], axis=node.attrs["axis"])


@emitter("index")
def emit_index(b, node):
    """Integer tensors at some axes: transpose those axes to the front, GatherND on the broadcast
    indices stacked last, then put the result dims where torch does (in place when adjacent)."""
    x, axes = node.inputs[0], node.attrs["axes"]
    if len(axes) == 1 and node.inputs[1].dtype != DType.bool:  # one integer index: take, a plain Gather
        b.add("Gather", [b.inp(0), _int64(b, node.inputs[1])], [b.out()], axis=axes[0])
        return
    indices = [_int64(b, v) for v in node.inputs[1:]]
    rest = [a for a in range(x.rank) if a not in axes]
    front = b.add("Transpose", [b.inp(0)], 1, perm=axes + rest)[0] if axes != list(range(len(axes))) else b.inp(0)
    shape = torch.broadcast_shapes(*[tuple(v.shape) for v in node.inputs[1:]])
    # the indices broadcast together, at run time (their sizes may be symbolic): the shape of their sum
    total = indices[0]
    for i in indices[1:]:
        total = b.add("Add", [total, i], 1)[0]
    target = b.add("Concat", [b.add("Shape", [total], 1)[0], b.ints([1], "one")], 1, axis=0)[0]
    stacked = b.add("Concat", [b.add("Expand", [b.add("Unsqueeze", [i, b.ints([-1], "last")], 1)[0], target], 1)[0]
                               for i in indices], 1, axis=-1)[0]
    gathered = b.add("GatherND", [front, stacked], 1)[0]  # [*shape, *rest dims]
    adjacent = axes == list(range(axes[0], axes[0] + len(axes)))
    if not adjacent or axes[0] == 0:
        b.add("Identity", [gathered], [b.out()])
        return
    k, n = len(shape), axes[0]  # torch puts the index dims at the first indexed axis
    perm = list(range(k, k + n)) + list(range(k)) + list(range(k + n, k + len(rest)))
    b.add("Transpose", [gathered], [b.out()], perm=perm)


@emitter("index_put")
def emit_index_put(b, node):
    """x[..., idx, ...] = values along one axis: ScatterElements with the index broadcast to the
    updates' shape (the values broadcast to what x[..., idx, ...] selects)."""
    x, values, axes = node.inputs[0], node.inputs[1], node.attrs["axes"]
    if len(axes) != 1:
        raise UnsupportedError(f"node {node.name}: index_put at several axes {axes} has no ONNX form yet")
    axis, index = axes[0], node.inputs[2]
    if index.rank != 1:
        raise UnsupportedError(f"node {node.name}: index_put with a {index.rank}-d index has no ONNX form yet")
    # the updates' shape, x's with the index's length at axis, read at run time (sizes may be symbolic)
    dims = [x.dim(a) for a in range(x.rank)]
    dims[axis] = index.dim(0)
    updates_shape = b.sizes(dims, "updates_shape")
    idx = b.add("Reshape", [_int64(b, index), b.ints([1] * axis + [-1] + [1] * (x.rank - axis - 1), "idx_shape")],
                1)[0]
    idx = b.add("Expand", [idx, updates_shape], 1)[0]
    updates = b.add("Expand", [_cast(b, b.name(values), values.dtype, x.dtype), updates_shape], 1)[0]
    if node.attrs.get("accumulate") and b.opset < 16:
        raise UnsupportedError(f"node {node.name}: index_put with accumulate needs ONNX opset 16 or newer")
    _scatter_elements(b, node, idx, updates, axis, "add" if node.attrs.get("accumulate") else None)


def _scatter_elements(b: _Builder, node: Node, index: str, updates: str, axis: int, reduction: str | None) -> None:
    """ScatterElements of input 0 into the node's output. onnxruntime reduces no 16-bit floats: a
    float16 or bfloat16 one with a reduction runs in float32 (the sum rounded once, not per update)."""
    x = node.inputs[0]
    extra = {"reduction": reduction} if reduction else {}
    if not reduction or x.dtype not in (DType.float16, DType.bfloat16):
        b.add("ScatterElements", [b.inp(0), index, updates], [b.out()], axis=axis, **extra)
        return
    wide = [_cast(b, name, x.dtype, DType.float32) for name in (b.inp(0), updates)]
    y = b.add("ScatterElements", [wide[0], index, wide[1]], 1, axis=axis, **extra)[0]
    b.add("Cast", [y], [b.out()], to=_ONNX_DTYPE[x.dtype])


@emitter("scatter")
def emit_scatter(b, node):
    reduce = node.attrs.get("reduce", "none")
    onnx_reduce = {"none": None, "sum": "add", "prod": "mul", "amax": "max", "amin": "min"}[reduce]
    needed = 18 if reduce in ("amax", "amin") else 16 if onnx_reduce else 13
    if b.opset < needed:
        raise UnsupportedError(f"node {node.name}: scatter with reduce={reduce} needs ONNX opset {needed} or newer")
    src = node.inputs[2]
    _scatter_elements(b, node, _int64(b, node.inputs[1]), _cast(b, b.name(src), src.dtype, node.inputs[0].dtype),
                      node.attrs["axis"], onnx_reduce)


@emitter("flip")
def emit_flip(b, node):
    dims = node.attrs["dims"]
    big = np.iinfo(np.int64).max
    b.add("Slice", [b.inp(0), b.ints([-1] * len(dims), "starts"), b.ints([-big] * len(dims), "ends"),
                    b.ints(dims, "axes"), b.ints([-1] * len(dims), "steps")], [b.out()])


@emitter("tile")
def emit_tile(b, node):
    x, repeats = node.inputs[0], node.attrs["repeats"]
    name = b.inp(0)
    if len(repeats) > x.rank:  # Tensor.repeat adds leading dims
        name = b.add("Unsqueeze", [name, b.ints(list(range(len(repeats) - x.rank)), "lead")], 1)[0]
    b.add("Tile", [name, b.ints(repeats, "repeats")], [b.out()])


@emitter("topk", "sort")
def emit_topk(b, node):
    x, a = node.inputs[0], node.attrs
    axis = a["axis"]
    k = a["k"] if node.op == "topk" else x.shape[axis]
    largest = a.get("largest", True) if node.op == "topk" else a.get("descending", False)
    b.add("TopK", [b.inp(0), b.ints([k], "k")], [b.out(0), b.out(1)], axis=axis, largest=int(largest), sorted=1)


@emitter("diagonal")
def emit_diagonal(b, node):
    """Move dim1, dim2 last, flatten them, and gather the diagonal's flat positions."""
    x, a = node.inputs[0], node.attrs
    d1, d2, offset = a["dim1"], a["dim2"], a.get("offset", 0)
    rest = [d for d in range(x.rank) if d not in (d1, d2)]
    moved = b.add("Transpose", [b.inp(0)], 1, perm=rest + [d1, d2])[0]
    rows, cols = x.shape[d1], x.shape[d2]
    flat = b.add("Reshape", [moved, b.ints([0] * len(rest) + [rows * cols], "flat")], 1)[0]
    positions = [i * cols + i + offset for i in range(rows) if 0 <= i + offset < cols] if offset >= 0 else \
        [(i - offset) * cols + i for i in range(cols) if 0 <= i - offset < rows]
    b.add("Gather", [flat, b.ints(positions, "positions")], [b.out()], axis=len(rest))


# ---------------------------------------------------------------------------- layers
@emitter("conv_transpose")
def emit_conv_transpose(b, node):
    a, w = node.attrs, node.inputs[1]
    inputs = [b.inp(0), b.inp(1)] + ([b.inp(2)] if len(node.inputs) > 2 and node.inputs[2] is not None else [])
    b.add("ConvTranspose", inputs, [b.out()], kernel_shape=list(w.shape[2:]), strides=a["stride"],
          pads=list(a["padding"]) * 2, dilations=a["dilation"], group=a["groups"],
          output_padding=a["output_padding"])


@emitter("resize")
def emit_resize(b, node):
    """torch's interpolate rules as Resize attributes: nearest is floor(dst / scale) ("asymmetric",
    "floor"); linear and cubic use half-pixel centres (or align_corners), cubic with a = -0.75."""
    a = node.attrs
    mode = a["mode"]
    if mode == "nearest":
        coords, extra = "asymmetric", {"nearest_mode": "floor"}
    else:
        coords = "align_corners" if a.get("align_corners") else "pytorch_half_pixel"
        extra = {"cubic_coeff_a": -0.75} if mode == "cubic" else {}
    if a.get("scales"):
        scales = b.const(np.asarray([1.0, 1.0] + list(a["scales"]), dtype=np.float32), "scales")
        b.add("Resize", [b.inp(0), "", scales], [b.out()], mode=mode, coordinate_transformation_mode=coords,
              **extra)
        return
    lead = b.add("Shape", [b.inp(0)], 1, start=0, end=2)[0] if b.opset >= 15 else b.add(
        "Slice", [b.add("Shape", [b.inp(0)], 1)[0], b.ints([0], "s"), b.ints([2], "e")], 1)[0]
    sizes = b.add("Concat", [lead, b.ints(a["size"], "size")], 1, axis=0)[0]
    b.add("Resize", [b.inp(0), "", "", sizes], [b.out()], mode=mode, coordinate_transformation_mode=coords, **extra)


@emitter("grid_sample")
def emit_grid_sample(b, node):
    if b.opset < 16:
        raise UnsupportedError(f"node {node.name}: grid_sample needs ONNX opset 16 or newer")
    a = node.attrs
    mode = a["mode"] if b.opset < 20 else {"bilinear": "linear", "bicubic": "cubic"}.get(a["mode"], a["mode"])
    b.add("GridSample", [b.inp(0), b.inp(1)], [b.out()], mode=mode, padding_mode=a["padding_mode"],
          align_corners=int(a["align_corners"]))


@emitter("arange")
def emit_arange(b, node):
    """Range takes no 16-bit floats: those count in float32 and are cast (exact for what float16 holds)."""
    a, out = node.attrs, node.outputs[0]
    count = DType.float32 if out.dtype in (DType.float16, DType.bfloat16) else out.dtype
    bounds = []
    for key in ("start", "end", "step"):
        scalar = b.add("Squeeze", [b.size(a[key]) if isinstance(a[key], SymDim) else b.ints([a[key]], key)], 1)[0]
        bounds.append(_cast(b, scalar, DType.int64, count))
    if count == out.dtype:
        b.add("Range", bounds, [b.out()])
    else:
        b.add("Cast", [b.add("Range", bounds, 1)[0]], [b.out()], to=_ONNX_DTYPE[out.dtype])


@emitter("full")
def emit_full(b, node):
    out = node.outputs[0]
    value = onnx_helper.make_tensor("value", _ONNX_DTYPE[out.dtype], [1], [node.attrs["value"]])
    b.add("ConstantOfShape", [b.sizes(node.attrs["shape"], "shape")], [b.out()], value=value)


@emitter("sizes")
def emit_sizes(b, node):
    b.add("Reshape", [b.sizes(node.attrs["values"], "values"), b.ints(node.attrs["shape"], "shape")], [b.out()])


# ---------------------------------------------------------------------------- weight-only quantization
# matmul_nbits as onnxruntime's MatMulNBits (com.microsoft), or, at opset 21 and up where
# WEIGHT_ONLY_FORM says so, as the standard block-wise DequantizeLinear (uint4/uint8 weights [K, N])
# + MatMul (+ Add). Measured on MiniLM, int4 in blocks of 32 (onnxruntime 1.32, AMD EPYC, one thread,
# batch 1 x 128 tokens, 101 interleaved runs, medians): MatMulNBits 52.7 ms; DequantizeLinear + MatMul
# 52.4 ms with float activations (session option session.qdq_matmulnbits_accuracy_level=0), because
# onnxruntime fuses it into that same MatMulNBits kernel. By default it fuses it with accuracy_level 4
# (activations quantized to int8 per block): 47.5 ms, as MatMulNBits with accuracy_level=4 (47.4 ms),
# but no longer the interpreter's numbers (fp32 51.2 ms). Equal speed at equal numbers, so the default
# is MatMulNBits: any opset, no fusion to rely on, activations float as the pass promises.
WEIGHT_ONLY_FORM = "matmul_nbits"  # or "dequantize_linear"


def _raw_initializer(b: _Builder, base: str, data_type: int, dims: list[int], raw: bytes) -> str:
    name = b.fresh(f"{b.node.name}_{base}")
    b.initializers.append(onnx_helper.make_tensor(name, data_type, dims, raw, raw=True))
    return name


@emitter("matmul_nbits")
def emit_matmul_nbits(b, node):
    from onnx import TensorProto

    from slimgraph.ir.opdefs.quant import pack_nbits, unpack_nbits

    a = node.attrs
    x, w, scales, zero_points = node.inputs[:4]
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    scale_name = _cast(b, b.name(scales), scales.dtype, x.dtype)
    bias_name = _cast(b, b.name(bias), bias.dtype, x.dtype) if bias is not None else ""
    if WEIGHT_ONLY_FORM == "matmul_nbits" or b.opset < 21 or not (w.is_constant and zero_points.is_constant):
        inputs = [b.inp(0), b.inp(1), scale_name, b.inp(3)] + (["", bias_name] if bias is not None else [])
        b.add("MatMulNBits", inputs, [b.out()], domain="com.microsoft", K=a["K"], N=a["N"], bits=a["bits"],
              block_size=a["block_size"])
        b.extra_opsets["com.microsoft"] = 1
        return
    bits, k, n = a["bits"], a["K"], a["N"]
    blocks = scales.shape[1]
    q = unpack_nbits(w.const_value, bits).reshape(n, -1)[:, :k].t().contiguous()  # [K, N]
    zp = unpack_nbits(zero_points.const_value, bits)[:, :blocks].t().contiguous()  # [blocks, N]
    kind = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8

    def raw(t):  # ONNX packs 4-bit tensors two a byte in row-major order, the first in the low bits
        flat = t.flatten()
        if bits == 4:
            flat = pack_nbits(torch.nn.functional.pad(flat, (0, flat.numel() % 2)).reshape(1, -1), 4)
        return flat.numpy().tobytes()

    wq = _raw_initializer(b, "wq", kind, [k, n], raw(q))
    zq = _raw_initializer(b, "zq", kind, [blocks, n], raw(zp))
    st = b.add("Transpose", [scale_name], 1, perm=[1, 0])[0]  # constant-folded by onnxruntime
    dq = b.add("DequantizeLinear", [wq, st, zq], 1, axis=0, block_size=a["block_size"])[0]
    if bias is None:
        b.add("MatMul", [b.inp(0), dq], [b.out()])
    else:
        b.add("Add", [b.add("MatMul", [b.inp(0), dq], 1)[0], bias_name], [b.out()])
