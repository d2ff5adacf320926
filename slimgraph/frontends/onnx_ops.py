"""Handlers mapping ONNX ops to canonical IR ops (opset 7 and up).

Each handler reads the converter's current node (``cv.node``: attributes via ``cv.attr``,
inputs via ``cv.tensor_input`` for tensors and ``cv.static`` for shapes, axes, pads) and
returns the IR value(s) for its outputs, or raises Unhandled to make the node opaque.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from slimgraph.frontends.onnx_shapes import sizes
from slimgraph.ir import DType, Value
from slimgraph.ir.opdefs.shape import BATCH
from slimgraph.ir.symbolic import SymDim

Handler = Callable[[Any], Any]
HANDLERS: dict[str, Handler] = {}
# ops never evaluated at import even with static inputs (random, or with training outputs)
NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
              "Bernoulli", "Dropout"}


class Unhandled(Exception):
    """This node cannot be mapped exactly; make it opaque."""


def handles(*ops: str):
    def deco(fn: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = fn
        return fn

    return deco


def _x(cv) -> Value:
    x = cv.tensor_input(0)
    if x is None:
        raise Unhandled
    return x


def _ints(values: Any) -> list:
    """Ints from a static array; sizes over the graph's symbols stay SymDims."""
    return [v if isinstance(v, SymDim) else int(v) for v in np.asarray(values).reshape(-1)]


def _symbolic(values: list) -> bool:
    return any(isinstance(v, SymDim) for v in values)


def _window(cv, x: Value, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads (or auto_pad) as [begin..., end...] over the spatial dims."""
    nd = len(kernel)
    auto = cv.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = cv.attr("pads")
        return _ints(pads) if pads is not None else [0] * (2 * nd)
    if auto == "VALID":
        return [0] * (2 * nd)
    begin, end = [], []
    for i in range(nd):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin + end


# ============================================================================ layers
@handles("ConvTranspose")
def conv_transpose(cv):
    """torch's attributes: symmetric pads; output_shape and asymmetric or automatic pads stay opaque."""
    x, w, b = _x(cv), cv.tensor_input(1), cv.tensor_input(2)
    if w is None or cv.attr("output_shape") is not None or cv.attr("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise Unhandled
    nd = w.rank - 2
    pads = _ints(cv.attr("pads", [0] * 2 * nd))
    if pads[:nd] != pads[nd:]:
        raise Unhandled
    return cv.emit("conv_transpose", [x, w, b], {
        "stride": _ints(cv.attr("strides", [1] * nd)), "padding": pads[:nd],
        "dilation": _ints(cv.attr("dilations", [1] * nd)), "groups": int(cv.attr("group", 1)),
        "output_padding": _ints(cv.attr("output_padding", [0] * nd))})


@handles("Conv")
def conv(cv):
    x, w, b = _x(cv), cv.tensor_input(1), cv.tensor_input(2)
    if w is None:
        raise Unhandled
    nd = w.rank - 2
    kernel = list(w.shape[2:])
    strides = _ints(cv.attr("strides", [1] * nd))
    dilations = _ints(cv.attr("dilations", [1] * nd))
    pads = _window(cv, x, kernel, strides, dilations)
    return cv.emit("conv", [x, w, b], {"stride": strides, "pads": pads, "dilation": dilations,
                                       "groups": int(cv.attr("group", 1))})


@handles("Gemm")
def gemm(cv):
    """alpha * A' @ B' + beta * C; a fully connected layer (linear) whenever B is static."""
    a, b, c = _x(cv), cv.input(1), cv.input(2)
    alpha, beta = float(cv.attr("alpha", 1.0)), float(cv.attr("beta", 1.0))
    trans_a, trans_b = int(cv.attr("transA", 0)), int(cv.attr("transB", 0))
    if trans_a:
        a = cv.emit("permute", [a], {"perm": [1, 0]}, suffix="_at")
    bias = None
    if isinstance(b, np.ndarray):
        # the file's tensors keep their names where they are used as they are (a round trip of a
        # linear on [B, E], written as Gemm, gives back its weight's name); a transposed weight is
        # named as linear-form names one (<name>_t back to <name>)
        w = b if trans_b else b.T
        if trans_b and alpha == 1.0:
            weight = cv.tensor_input(1)
        else:
            source = cv.node.inputs[1].name
            label = f"{cv.name}_weight" if alpha != 1.0 else source[:-2] if source.endswith("_t") else f"{source}_t"
            cv.env[cv.name + "::W"] = np.ascontiguousarray(w * alpha if alpha != 1.0 else w)
            weight = cv.value(cv.name + "::W", label)
        if isinstance(c, np.ndarray) and c.size == w.shape[0] and (c.ndim == 1 or c.shape[-1] == c.size):
            if c.ndim == 1 and beta == 1.0:
                bias = cv.tensor_input(2)
            else:
                cv.env[cv.name + "::B"] = (c * beta).reshape(-1).astype(c.dtype)
                bias = cv.value(cv.name + "::B", f"{cv.name}_bias")
            c = None
        y = cv.emit("linear", [a, weight, bias], suffix="_mm" if c is not None else "")
    else:
        bt = cv.tensor_input(1)
        if trans_b:
            bt = cv.emit("permute", [bt], {"perm": [1, 0]}, suffix="_bt")
        y = cv.emit("matmul", [a, bt], suffix="_mm")
        if alpha != 1.0:
            y = cv.emit("mul", [y, _scalar(cv, alpha, y)], suffix="_alpha")
        if c is None:
            return cv.emit("identity", [y])
    if c is None:
        return y
    cv_c = cv.tensor_input(2)
    if beta != 1.0:
        cv_c = cv.emit("mul", [cv_c, _scalar(cv, beta, cv_c)], suffix="_beta")
    return cv.emit("add", [y, cv_c])


@handles("MatMul")
def matmul(cv):
    return cv.emit("matmul", [_x(cv), cv.tensor_input(1)])


@handles("BatchNormalization")
def batch_norm(cv):
    if len(cv.node.outputs) > 1 and any(t.outputs for t in cv.node.outputs[1:]):
        raise Unhandled  # training-mode statistics outputs
    if int(cv.attr("training_mode", 0)):
        raise Unhandled
    x = _x(cv)
    params = [cv.tensor_input(i) for i in range(1, 5)]
    return cv.emit("batch_norm", [x, *params], {"eps": float(cv.attr("epsilon", 1e-5)),
                                                "momentum": round(1.0 - float(cv.attr("momentum", 0.9)), 6)})


@handles("LayerNormalization")
def layer_norm(cv):
    x = _x(cv)
    axis = int(cv.attr("axis", -1)) % x.rank
    if len(cv.node.outputs) > 1 and any(t.outputs for t in cv.node.outputs[1:]):
        raise Unhandled
    return cv.emit("layer_norm", [x, cv.tensor_input(1), cv.tensor_input(2)],
                   {"normalized_shape": list(x.shape[axis:]), "eps": float(cv.attr("epsilon", 1e-5))})


@handles("LRN")
def lrn(cv):
    """torch's window is [c - size // 2, c + (size - 1) // 2], ONNX's [c - (size - 1) // 2, c + size // 2]:
    the same for odd sizes only (an even one stays opaque)."""
    size = int(cv.attr("size"))
    if size % 2 == 0:
        raise Unhandled
    return cv.emit("lrn", [_x(cv)], {"size": size, "alpha": float(cv.attr("alpha", 1e-4)),
                                     "beta": float(cv.attr("beta", 0.75)), "k": float(cv.attr("bias", 1.0))})


@handles("InstanceNormalization")
def instance_norm(cv):
    """Instance norm is group norm with a group per channel. Over one element per channel it is the
    bias (x - mean is 0, or NaN where x is not finite): torch's group_norm refuses that at batch 1."""
    x, scale, bias = _x(cv), cv.tensor_input(1), cv.tensor_input(2)
    if x.rank < 3 or scale is None or bias is None or (x.sym and x.sym[1] is not None):
        raise Unhandled
    if int(np.prod(x.shape[2:])) == 1 and not (x.sym and any(x.sym[2:])):
        per_channel = cv.emit("reshape", [bias], {"shape": [x.shape[1]] + [1] * (x.rank - 2)}, suffix="_bias")
        return cv.emit("add", [cv.emit("sub", [x, x], suffix="_zero"), per_channel])
    return cv.emit("group_norm", [x, scale, bias], {"num_groups": x.shape[1], "eps": float(cv.attr("epsilon", 1e-5))})


@handles("MaxPool", "AveragePool")
def pool(cv):
    if len(cv.node.outputs) > 1 and cv.node.outputs[1].outputs:
        raise Unhandled  # MaxPool's indices output
    x = _x(cv)
    kernel = _ints(cv.attr("kernel_shape"))
    nd = len(kernel)
    strides = _ints(cv.attr("strides", [1] * nd))
    dilations = _ints(cv.attr("dilations", [1] * nd))
    pads = _window(cv, x, kernel, strides, dilations)
    attrs = {"kernel": kernel, "stride": strides, "pads": pads, "ceil_mode": bool(cv.attr("ceil_mode", 0))}
    if cv.node.op == "MaxPool":
        if int(cv.attr("storage_order", 0)):
            raise Unhandled
        op, attrs = "max_pool", {**attrs, "dilation": dilations}
    elif dilations != [1] * nd:
        raise Unhandled
    else:
        op, attrs = "avg_pool", {**attrs, "count_include_pad": bool(cv.attr("count_include_pad", 0))}
    y = cv.emit(op, [x], attrs)
    trim = _trimming_slice(cv, y) if attrs["ceil_mode"] else None
    if trim is not None:
        cv.graph.remove_node(y.producer)
        y = cv.emit(op, [x], attrs, name=trim.outputs[0].name)
        cv.absorbed.add(trim.outputs[0].name)
    return y


def _trimming_slice(cv, y: Value) -> Any:
    """The Slice that is the only reader of a ceil-mode pool and keeps all of the pool's windows as
    torch counts them, or None. ONNX's shape inference counts one more window where the last starts
    in the padding (torch and onnxruntime do not), so slimgraph writes such a pool as the pool and
    that Slice: the Slice is then no node and the pool takes its name (the file imports as the IR
    it was written from)."""
    tensor = cv.node.outputs[0]
    if len(tensor.outputs) != 1 or tensor.outputs[0].op != "Slice" or tensor in cv.gs_graph.outputs:
        return None
    trim = tensor.outputs[0]
    bounds = [cv.env.get(t.name) if t.name else None for t in trim.inputs[1:5]]
    if len(bounds) < 3 or any(not isinstance(b, np.ndarray) or b.dtype == object for b in bounds[:3]) \
            or (len(bounds) > 3 and bounds[3] is not None and not isinstance(bounds[3], np.ndarray)):
        return None
    starts, ends, axes = (b.reshape(-1) for b in bounds[:3])
    steps = bounds[3].reshape(-1) if len(bounds) > 3 and bounds[3] is not None else np.ones_like(starts)
    sym = y.sym or (None,) * y.rank
    return trim if all(s == 0 and st == 1 and sym[int(a) % y.rank] is None and e >= y.shape[int(a) % y.rank]
                       for s, e, a, st in zip(starts, ends, axes, steps)) else None


@handles("GlobalAveragePool", "GlobalMaxPool")
def global_pool(cv):
    x = _x(cv)
    op = "adaptive_avg_pool" if cv.node.op == "GlobalAveragePool" else "adaptive_max_pool"
    return cv.emit(op, [x], {"output_size": [1] * (x.rank - 2)})


@handles("Dropout")
def dropout(cv):
    if len(cv.node.outputs) > 1 and cv.node.outputs[1].outputs:
        raise Unhandled  # the mask is used
    ratio = cv.static(1) if len(cv.node.inputs) > 1 else None
    p = float(ratio) if ratio is not None else float(cv.attr("ratio", 0.5))
    return [cv.emit("dropout", [_x(cv)], {"p": p}), None]


@handles("Identity")
def identity(cv):
    return cv.emit("identity", [_x(cv)])


# ============================================================================ element-wise
_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
          "Neg": "neg", "Abs": "abs", "Erf": "erf", "Softplus": "softplus", "HardSwish": "hardswish"}
for _onnx, _op in _UNARY.items():
    HANDLERS[_onnx] = (lambda op: lambda cv: cv.emit(op, [_x(cv)]))(_op)


@handles("Selu")
def selu(cv):
    default_alpha, default_gamma = 1.67326319217681884765625, 1.05070102214813232421875
    if abs(float(cv.attr("alpha", default_alpha)) - default_alpha) > 1e-6 or \
            abs(float(cv.attr("gamma", default_gamma)) - default_gamma) > 1e-6:
        raise Unhandled
    return cv.emit("selu", [_x(cv)])


@handles("LeakyRelu")
def leaky_relu(cv):
    return cv.emit("leaky_relu", [_x(cv)], {"negative_slope": float(cv.attr("alpha", 0.01))})


@handles("Elu")
def elu(cv):
    return cv.emit("elu", [_x(cv)], {"alpha": float(cv.attr("alpha", 1.0))})


@handles("PRelu")
def prelu(cv):
    """The canonical prelu takes a scalar or a per-channel (axis 1) slope vector."""
    x, slope = _x(cv), cv.input(1)
    if not isinstance(slope, np.ndarray):
        raise Unhandled
    channels = x.shape[1] if x.rank > 1 else None
    per_channel = slope.size == channels and (
        (cv.opset < 7 and slope.ndim == 1)  # legacy PRelu: a [C] slope applies along axis 1
        or list(slope.shape) == [channels] + [1] * (x.rank - 2)
        or (x.rank == 2 and slope.ndim == 1))
    if slope.size == 1:
        cv.env[cv.name + "::slope"] = slope.reshape(())
    elif per_channel:
        cv.env[cv.name + "::slope"] = slope.reshape(-1)
    else:
        raise Unhandled
    return cv.emit("prelu", [x, cv.value(cv.name + "::slope", f"{cv.name}_slope")])


@handles("HardSigmoid")
def hard_sigmoid(cv):
    alpha, beta = float(cv.attr("alpha", 0.2)), float(cv.attr("beta", 0.5))
    x = _x(cv)
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return cv.emit("hardsigmoid", [x])
    scaled = cv.emit("mul", [x, _scalar(cv, alpha, x)], suffix="_scale")
    shifted = cv.emit("add", [scaled, _scalar(cv, beta, x)], suffix="_shift")
    return cv.emit("clip", [shifted], {"min": 0.0, "max": 1.0})


def _scalar(cv, number: float, like: Value) -> Value:
    return cv.graph.add_constant(f"{cv.name}_c", torch.tensor(number, dtype=like.dtype.torch))


@handles("Clip")
def clip(cv):
    if cv.node.inputs[1:]:
        lo, hi = cv.static(1), cv.static(2)
    else:
        lo, hi = cv.attr("min"), cv.attr("max")
    if lo is None and hi is None:
        return cv.emit("identity", [_x(cv)])
    return cv.emit("clip", [_x(cv)], {"min": None if lo is None else float(lo),
                                      "max": None if hi is None else float(hi)})


@handles("Gelu")
def gelu(cv):
    approx = cv.attr("approximate", "none")
    return cv.emit("gelu", [_x(cv)], {"approximate": approx.decode() if isinstance(approx, bytes) else approx})


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow"}


def _binary(cv, op: str) -> Value:
    a, b = cv.tensor_input(0), cv.tensor_input(1)
    if int(cv.attr("broadcast", 0)) and cv.attr("axis") is not None:
        # opset < 7: B is aligned with A starting at `axis`; pad B's shape on the right instead
        trailing = a.rank - int(cv.attr("axis")) % a.rank - b.rank
        if trailing > 0:
            b = cv.emit("reshape", [b], {"shape": list(b.shape) + [1] * trailing}, suffix="_aligned")
    if op == "div" and not a.dtype.is_float:
        if a.dtype != b.dtype or a.dtype == DType.bool:
            raise Unhandled
        return cv.emit("div", [a, b], {"rounding_mode": "trunc"})  # ONNX's integer Div truncates
    if op == "pow" and a.dtype != b.dtype:
        raise Unhandled  # ONNX's Pow keeps the base's type (int ** float is an int), torch promotes
    return cv.emit(op, [a, b])


for _onnx, _op in _BINARY.items():
    HANDLERS[_onnx] = (lambda op: lambda cv: _binary(cv, op))(_op)


@handles("Sum", "Max", "Min")
def variadic(cv):
    op = {"Sum": "add", "Max": "maximum", "Min": "minimum"}[cv.node.op]
    values = [cv.tensor_input(i) for i in range(len(cv.node.inputs))]
    acc = values[0]
    if len(values) == 1:
        return cv.emit("identity", [acc])
    for i, v in enumerate(values[1:]):
        acc = cv.emit(op, [acc, v], suffix="" if i == len(values) - 2 else f"_{i}")
    return acc


@handles("Softmax", "LogSoftmax")
def softmax(cv):
    x = _x(cv)
    op = "softmax" if cv.node.op == "Softmax" else "log_softmax"
    default = -1 if cv.opset >= 13 else 1
    axis = int(cv.attr("axis", default)) % x.rank
    if cv.opset >= 13 or axis == x.rank - 1:
        return cv.emit(op, [x], {"axis": axis})
    # before opset 13 the input is flattened to 2-D at `axis` and normalized over the rest
    flat = cv.emit("flatten", [x], {"start": axis, "end": x.rank - 1}, suffix="_flat")
    y = cv.emit(op, [flat], {"axis": axis}, suffix="_2d")
    return cv.emit("reshape", [y], {"shape": list(x.shape)})


# ============================================================================ shapes
def _batch_target(x: Value, target: list[int], allowzero: bool) -> list:
    """ONNX reshape target -> IR target; a copied dim (0) stays symbolic: the input's expression
    where it has one (``seq``), the batch for a leading dim, else the size."""
    out: list = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            out.append(x.dim(i) if x.sym and x.sym[i] is not None else BATCH if i == 0 else x.shape[i])
        else:
            out.append(d)
    return out


@handles("Reshape")
def reshape(cv):
    x = _x(cv)
    if len(cv.node.inputs) > 1:
        target = _ints(cv.static(1))
    else:
        target = _ints(cv.attr("shape"))
    return cv.emit("reshape", [x], {"shape": _batch_target(x, target, bool(cv.attr("allowzero", 0)))})


@handles("Flatten")
def flatten(cv):
    x = _x(cv)
    axis = int(cv.attr("axis", 1))
    axis = axis + x.rank if axis < 0 else axis  # in [-rank, rank]: -rank is 0, not 1
    if axis == 1 and x.rank > 1:
        return cv.emit("flatten", [x], {"start": 1, "end": x.rank - 1})
    inner = int(np.prod(x.shape[axis:])) if axis < x.rank else 1
    return cv.emit("reshape", [x], {"shape": [-1, inner] if axis > 0 else [1, -1]})


@handles("Transpose")
def transpose(cv):
    x = _x(cv)
    perm = cv.attr("perm")
    perm = _ints(perm) if perm is not None else list(reversed(range(x.rank)))
    return cv.emit("permute", [x], {"perm": perm})


def _axes(cv, index: int = 1) -> list[int] | None:
    if len(cv.node.inputs) > index and cv.node.inputs[index].name:
        return _ints(cv.static(index))
    axes = cv.attr("axes")
    return _ints(axes) if axes is not None else None


@handles("Squeeze")
def squeeze(cv):
    x = _x(cv)
    axes = _axes(cv)
    axes = [a for a in range(x.rank) if x.shape[a] == 1] if axes is None else [a % x.rank for a in axes]
    return cv.emit("squeeze", [x], {"axes": axes})


@handles("Unsqueeze")
def unsqueeze(cv):
    x = _x(cv)
    axes = _axes(cv)
    rank = x.rank + len(axes)
    return cv.emit("unsqueeze", [x], {"axes": sorted(a % rank for a in axes)})


@handles("Concat")
def concat(cv):
    values = [cv.tensor_input(i) for i in range(len(cv.node.inputs))]
    values = [v for v in values if v is not None and v.numel > 0] or values[:1]
    axis = int(cv.attr("axis", 1)) % values[0].rank  # axis was optional (default 1) before opset 4
    if len(values) == 1:
        return cv.emit("identity", [values[0]])
    return cv.emit("concat", values, {"axis": axis})


@handles("Split")
def split(cv):
    x = _x(cv)
    axis = int(cv.attr("axis", 0)) % x.rank
    n = len(cv.node.outputs)
    sizes = None
    if len(cv.node.inputs) > 1 and cv.node.inputs[1].name:
        sizes = _ints(cv.static(1))
    elif cv.attr("split") is not None:
        sizes = _ints(cv.attr("split"))
    if sizes is None:
        size = x.shape[axis]
        chunk = -(-size // n)
        sizes = [chunk] * (n - 1) + [size - chunk * (n - 1)]
    outs = cv.emit("split", [x], {"axis": axis, "sizes": sizes})
    return list(outs) if isinstance(outs, tuple) else [outs]


def _reversed(size: int, start: int, end: int, step: int) -> tuple[int, int, int]:
    """A negative-step slice of ``size`` elements as a positive-step one of the flipped axis."""
    s, e, st = slice(start, end, step).indices(size)
    count = len(range(s, e, st))
    if not count:
        return 0, 0, 1
    first = size - 1 - s
    return first, first + (count - 1) * -st + 1, -st


@handles("Slice")
def slice_(cv):
    """A negative step reverses its axis: flip, then a positive-step slice of the flipped axis."""
    x = _x(cv)
    if cv.name in cv.absorbed:  # a ceil-mode pool's trim to torch's windows: the pool is its value
        return x
    if cv.opset < 10:
        starts, ends = _ints(cv.attr("starts")), _ints(cv.attr("ends"))
        axes = _ints(cv.attr("axes")) if cv.attr("axes") is not None else list(range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(cv.static(1)), _ints(cv.static(2))
        axes = _ints(cv.static(3)) if cv.input(3) is not None else list(range(len(starts)))
        steps = _ints(cv.static(4)) if cv.input(4) is not None else [1] * len(starts)
    norm: dict[str, list] = {"axes": [], "starts": [], "ends": [], "steps": []}
    flips: list[int] = []
    symbolic = _symbolic([*starts, *ends]) or bool(x.sym)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        axis %= x.rank
        size = x.shape[axis]
        static = not (isinstance(start, SymDim) or isinstance(end, SymDim) or (x.sym and x.sym[axis] is not None))
        if step < 0:
            if static:
                flips.append(axis)
                start, end, step = _reversed(size, start, end, step)
                if (start, end, step) == (0, size, 1):
                    continue
            elif step == -1 and not isinstance(start, SymDim) and (start == -1 or start >= 2 ** 62) \
                    and not isinstance(end, SymDim) and end <= -2 ** 31:
                flips.append(axis)  # the whole axis reversed, whatever its size
                continue
            else:
                raise Unhandled
        elif symbolic:  # bounds over the graph's symbols: as given, clamped at run time
            if not isinstance(end, SymDim) and end >= 2 ** 62:
                end = x.dim(axis)  # "to the end"
        else:
            # clamp like ONNX (and Python slicing) does; huge sentinels mean "to the end"
            start = max(min(start, size), -size - 1)
            end = max(min(end, size), -size - 1)
            s, e, step = slice(start, end, step).indices(size)
            start, end = s, max(e, s)
        for key, v in zip(norm, (axis, start, end, step)):
            norm[key].append(v)
    if flips:
        x = cv.emit("flip", [x], {"dims": sorted(set(flips))}, suffix="_flip" if norm["axes"] else "")
        if not norm["axes"]:
            return x
    return cv.emit("slice", [x], norm)


@handles("Gather")
def gather(cv):
    x, indices = _x(cv), cv.input(1)
    axis = int(cv.attr("axis", 0)) % x.rank
    if isinstance(indices, Value):  # computed indices: a table lookup (embedding) or a take
        if axis == 0 and x.rank == 2 and x.is_constant and not indices.dtype.is_float:
            return cv.emit("embedding", [x, indices])
        return cv.emit("take", [x, indices], {"axis": axis})
    if not isinstance(indices, np.ndarray) or indices.dtype == object:
        raise Unhandled
    if x.sym and x.sym[axis] is not None:  # a negative index counts from a size known at run time only
        if indices.ndim == 0:
            return cv.emit("select", [x], {"axis": axis, "index": int(indices)})
        index = cv.graph.add_constant(f"{cv.name}_indices", torch.from_numpy(indices.astype(np.int64)))
        return cv.emit("take", [x, index], {"axis": axis})
    size = x.shape[axis]
    if any(not -size <= int(i) < size for i in indices.reshape(-1)):  # onnxruntime refuses them too
        raise ValueError(f"indices {indices.reshape(-1).tolist()} are outside axis {axis} of size {size}")
    flat = [int(i) % size for i in indices.reshape(-1)]
    if indices.ndim == 0:
        return cv.emit("select", [x], {"axis": axis, "index": flat[0]})
    if indices.ndim == 1:
        return cv.emit("gather", [x], {"axis": axis, "indices": flat})
    raise Unhandled


@handles("Expand")
def expand(cv):
    x = _x(cv)
    shape = _ints(cv.static(1))
    rank = max(len(shape), x.rank)
    full = [1] * (rank - len(shape)) + shape
    if _symbolic(shape) or x.sym:  # sizes over the graph's symbols: a 1 keeps x's own dim
        dims = [1] * (rank - x.rank) + [x.dim(a) for a in range(x.rank)]
        if rank > x.rank:
            x = cv.emit("reshape", [x], {"shape": dims}, suffix="_rank")
        return cv.emit("expand", [x], {"shape": [d if not isinstance(t, SymDim) and t == 1 else t
                                                 for t, d in zip(full, dims)]})
    padded = [1] * (rank - x.rank) + list(x.shape)
    # a 1 keeps x's dim (-1): at its import size, a batch imported at 1 would be frozen there
    target = [-1 if a == 1 else a for a in full]
    if rank > x.rank:
        x = cv.emit("reshape", [x], {"shape": padded}, suffix="_rank")
    return cv.emit("expand", [x], {"shape": target})


@handles("Tile")
def tile(cv):
    repeats = _ints(cv.static(1))
    if _symbolic(repeats):
        raise Unhandled
    return cv.emit("tile", [_x(cv)], {"repeats": repeats})


@handles("Pad")
def pad(cv):
    x = _x(cv)
    if cv.opset < 11:
        pads, value = _ints(cv.attr("pads")), float(cv.attr("value", 0.0))
    else:
        pads = _ints(cv.static(1))
        v = cv.static(2)
        value = float(v) if v is not None and np.size(v) else 0.0
        if cv.input(3) is not None:
            raise Unhandled  # axes input (opset 18)
    mode = cv.attr("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None or any(p < 0 for p in pads):
        raise Unhandled
    n = x.rank
    torch_pads: list[int] = []
    for d in reversed(range(n)):
        torch_pads += [pads[d], pads[n + d]]
    # F.pad pads the last dims first; its reflect and replicate modes take all spatial dims' pads
    least = 2 if torch_mode == "constant" else 2 * max(x.rank - 2, 1)
    while torch_pads[-2:] == [0, 0] and len(torch_pads) > least:
        torch_pads = torch_pads[:-2]
    if torch_mode != "constant" and len(torch_pads) // 2 > x.rank - 2:
        raise Unhandled  # torch reflects only spatial dims
    return cv.emit("pad", [x], {"pads": torch_pads, "mode": torch_mode, "value": value})


_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax", "ReduceMin": "amin", "ReduceProd": "prod"}


@handles(*_REDUCE)
def reduce(cv):
    """Axes are an input from opset 18 (ReduceSum: 13), an attribute before; none (or an empty
    input) reduces every axis unless noop_with_empty_axes says the node is an identity."""
    x = _x(cv)
    op = _REDUCE[cv.node.op]
    axes_from_input = cv.node.op == "ReduceSum" and cv.opset >= 13 or cv.opset >= 18
    axes = _axes(cv) if axes_from_input else (_ints(cv.attr("axes")) if cv.attr("axes") is not None else None)
    if axes is None or not axes:
        if int(cv.attr("noop_with_empty_axes", 0)):
            return cv.emit("identity", [x])
        axes = list(range(x.rank))
    if x.dtype == DType.bool or (op == "mean" and not x.dtype.is_float):
        raise Unhandled  # not ONNX's types for these ops (torch's mean takes no integers)
    attrs = {"axes": sorted({a % x.rank for a in axes}), "keepdim": bool(cv.attr("keepdims", 1))}
    if op in ("sum", "prod") and not x.dtype.is_float and x.dtype != DType.int64:
        # torch sums and multiplies narrower integers into int64; ONNX keeps the type
        y = cv.emit(op, [x], attrs, suffix="_int64")
        return cv.emit("cast", [y], {"dtype": str(x.dtype.torch).removeprefix("torch.")})
    return cv.emit(op, [x], attrs)


@handles("ArgMax", "ArgMin")
def arg_reduce(cv):
    """The first index of the max (min), as torch's; select_last_index has no IR form."""
    x = _x(cv)
    if int(cv.attr("select_last_index", 0)) or x.dtype == DType.bool or x.rank == 0:
        raise Unhandled
    return cv.emit("argmax" if cv.node.op == "ArgMax" else "argmin", [x],
                   {"axes": [int(cv.attr("axis", 0)) % x.rank], "keepdim": bool(cv.attr("keepdims", 1))})


@handles("Cast")
def cast(cv):
    from slimgraph.frontends.onnx import _ONNX_TO_DTYPE

    dtype = _ONNX_TO_DTYPE.get(int(cv.attr("to")))
    if dtype is None:
        raise Unhandled
    return cv.emit("cast", [_x(cv)], {"dtype": str(dtype.torch).replace("torch.", "")})


# ============================================================================ quantization
# A DequantizeLinear of a constant stays a node: folding it at import would turn int8 weights
# back into float ones and lose what a QDQ model is for.
NEVER_FOLD.add("DequantizeLinear")
_QUANT_DTYPES = (np.uint8, np.int8)
_OUTPUT_DTYPES = {0: np.uint8, 2: np.uint8, 3: np.int8}  # QuantizeLinear's output_dtype: unset, UINT8, INT8


def _quant_params(cv, x: Value, dequantize: bool) -> tuple[list[Value | None], dict]:
    """Scale and zero point (static) as IR constants, with the axis attribute when per-axis."""
    scale, zero_point = cv.input(1), cv.input(2)
    if not isinstance(scale, np.ndarray) or not (zero_point is None or isinstance(zero_point, np.ndarray)):
        raise Unhandled  # parameters computed at run time
    if int(cv.attr("block_size", 0) or 0) or scale.dtype != np.float32 or scale.ndim > 1:
        raise Unhandled  # blocked quantization, or half-precision scales: keep the ONNX node
    if zero_point is None and not dequantize:  # the IR's quantize_linear takes its type from the zero point
        dtype = _OUTPUT_DTYPES.get(int(cv.attr("output_dtype", 0) or 0))
        if dtype is None:
            raise Unhandled
        zero_point = np.zeros(scale.shape, dtype=dtype)
    if zero_point is not None and (zero_point.dtype not in _QUANT_DTYPES or zero_point.shape != scale.shape):
        raise Unhandled  # int16, int4 and float8 types have no IR form yet
    attrs: dict = {}
    if scale.size == 1:
        scale, zero_point = scale.reshape(()), None if zero_point is None else zero_point.reshape(())
    else:
        attrs["axis"] = int(cv.attr("axis", 1)) % x.rank
    # added directly (not through cv.value): 0-d arrays must stay 0-d
    params: list[Value | None] = [cv.graph.add_constant(f"{cv.name}_scale", torch.from_numpy(scale.copy()))]
    if zero_point is not None:
        params.append(cv.graph.add_constant(f"{cv.name}_zero_point", torch.from_numpy(zero_point.copy())))
    return params, attrs


@handles("QuantizeLinear")
def quantize_linear(cv):
    x = _x(cv)
    if not x.dtype.is_float:
        raise Unhandled
    params, attrs = _quant_params(cv, x, dequantize=False)
    return cv.emit("quantize_linear", [x, *params], attrs)


@handles("DequantizeLinear")
def dequantize_linear(cv):
    x = _x(cv)
    if x.dtype.torch not in (torch.uint8, torch.int8, torch.int32):
        raise Unhandled
    params, attrs = _quant_params(cv, x, dequantize=True)
    return cv.emit("dequantize_linear", [x, *params], attrs)


# ============================================================================ symbolic sizes
@handles("Shape")
def shape(cv):
    """The sizes of a tensor: an array of SymDims and ints (onnx_shapes) where some are symbolic."""
    x = _x(cv)
    if not x.sym and any("batch_symbol" in v.meta for v in cv.graph.inputs):
        raise Unhandled  # the legacy symbolic batch ("N") has no value at import
    dims = [x.dim(a) for a in range(x.rank)]
    start, end = int(cv.attr("start", 0)), cv.attr("end")
    dims = dims[start:None if end is None else int(end)]
    return sizes(dims) if x.sym else np.asarray(dims, dtype=np.int64)  # static: folds like any constant


@handles("Range")
def range_(cv):
    bounds = [_ints(cv.static(i))[0] for i in range(3)]
    if not _symbolic(bounds):
        raise Unhandled
    dtype = str(torch.from_numpy(np.zeros(0, dtype=cv.node.outputs[0].dtype)).dtype).removeprefix("torch.")
    return cv.emit("arange", [], {"start": bounds[0], "end": bounds[1], "step": bounds[2], "dtype": dtype})


@handles("ConstantOfShape")
def constant_of_shape(cv):
    dims = _ints(cv.static(0))
    value = cv.attr("value")
    value = np.zeros(1, dtype=np.float32) if value is None else np.asarray(value).reshape(-1)
    if not _symbolic(dims):
        raise Unhandled
    dtype = str(torch.from_numpy(value).dtype).removeprefix("torch.")
    return cv.emit("full", [], {"shape": dims, "value": value[0].item(), "dtype": dtype})  # a Python number


_COMPARE = {"Equal": "eq", "Less": "lt", "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge",
            "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor"}


def _compare(cv, op: str) -> Value:
    return cv.emit(op, [cv.tensor_input(0), cv.tensor_input(1)])


for _onnx, _op in _COMPARE.items():
    HANDLERS[_onnx] = (lambda op: lambda cv: _compare(cv, op))(_op)


@handles("Not", "IsNaN", "IsInf")
def predicate(cv):
    x = _x(cv)
    if cv.node.op == "IsInf" and (int(cv.attr("detect_negative", 1)) != 1 or int(cv.attr("detect_positive", 1)) != 1):
        raise Unhandled
    return cv.emit({"Not": "logical_not", "IsNaN": "isnan", "IsInf": "isinf"}[cv.node.op], [x])


@handles("Where")
def where(cv):
    return cv.emit("where", [cv.tensor_input(0), cv.tensor_input(1), cv.tensor_input(2)])


@handles("GatherND")
def gather_nd(cv):
    """data[indices[..., 0], indices[..., 1], ...] (batch_dims 0): advanced indexing of the first dims."""
    x, indices = _x(cv), cv.tensor_input(1)
    if int(cv.attr("batch_dims", 0)) != 0 or indices.shape[-1] > x.rank or indices.dtype != DType.int64:
        raise Unhandled
    parts = [cv.emit("select", [indices], {"axis": indices.rank - 1, "index": k}, suffix=f"_index{k}")
             for k in range(indices.shape[-1])]
    return cv.emit("index", [x, *parts], {"axes": list(range(len(parts)))})


from slimgraph.frontends import onnx_indexing, onnx_math  # noqa: E402, F401  (their handlers join HANDLERS)
