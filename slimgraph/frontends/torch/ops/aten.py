"""Handlers for Core ATen ops (what torch.export leaves after decomposition) and for the composite
ops kept whole through it (``tracing.KEEP``).

Every op of the Core ATen opset has a handler here or sits in ``NOT_CONVERTED`` with the reason;
tests/frontends/test_torch_coverage.py checks that. Handlers read their operands by the op's
schema names (``p["input"]``, ``p["dim"]``), with the schema's defaults filled in.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from slimgraph.frontends.torch.dims import BatchDim, concrete
from slimgraph.frontends.torch.ops.functions import (
    adaptive,
    attention,
    avg_pool,
    conv_attrs,
    gather_index,
    max_pool,
    reshape_target,
    roll,
    split_outputs,
)
from slimgraph.frontends.torch.ops.registry import FUNCTIONS, Unhandled, ints, tensor_arg
from slimgraph.ir import DType, Value
from slimgraph.ir.opdefs.shape import BATCH
from slimgraph.ir.symbolic import SymDim

aten = torch.ops.aten
Params = dict[str, Any]

# Core ATen ops with no handler, and why. Everything else in the opset converts.
NOT_CONVERTED = {
    "training only (gradients)": [
        "_adaptive_avg_pool2d_backward", "avg_pool2d_backward", "convolution_backward", "embedding_dense_backward",
        "max_pool2d_with_indices_backward", "native_group_norm_backward", "native_layer_norm_backward"],
    "random: a deployed graph computes deterministically": ["rand", "randn", "randperm", "native_dropout"],
    "data-dependent output shape": ["nonzero", "masked_scatter"],
    "memory layout, not values (strides, storage offsets)": ["as_strided", "sym_stride", "sym_storage_offset"],
    "complex tensors (the IR has no complex dtype)": ["_fft_r2c", "_fft_c2r"],
    "no IR op yet: rare in deployed models (distance matrices, bags, col2im)": [
        "_cdist_forward", "_pdist_forward", "_embedding_bag", "col2im"],
}

# ---------------------------------------------------------------------------- plumbing


def params(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Params:
    """The call's operands by schema name, defaults filled in."""
    bound: Params = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
        else:
            bound[a.name] = None
    return bound


def handles(*names: str):
    """Register for aten ops by "name" or "name.overload" (ones this torch lacks are skipped)."""
    def deco(fn: Callable[[Any, Params, Any], Any]):
        for full in names:
            name, _, overload = full.partition(".")
            op = getattr(getattr(aten, name, None), overload or "default", None)
            if op is None:
                continue

            def handler(cv, args, kwargs, real, op=op):
                return fn(cv, params(op, args, kwargs), real)

            FUNCTIONS[op] = handler
        return fn

    return deco


def operand(cv, x: Any, like: Value) -> Value:
    """A tensor operand, or a Python number as a 0-d constant."""
    if isinstance(x, BatchDim):
        raise Unhandled  # a batch size used as a tensor value
    return cv.as_value(x, like)


def _dims(dim: Any, rank: int) -> list[int]:
    if dim is None or dim == []:
        return list(range(rank))
    return [d % max(rank, 1) for d in ints(dim, 1)]


# ---------------------------------------------------------------------------- element-wise
UNARY = {name: name for name in (
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atanh", "ceil", "cos", "cosh", "erf", "exp", "expm1", "floor",
    "log", "log10", "log1p", "log2", "neg", "reciprocal", "relu", "rsqrt", "sigmoid", "sign", "sin", "sinh", "sqrt",
    "tan", "tanh", "trunc", "isinf", "isnan", "logical_not", "silu", "hardswish", "hardsigmoid", "mish", "selu")}
UNARY["log_sigmoid"] = "logsigmoid"
UNARY["bitwise_not"] = "bitwise_not"


def _unary(op: str):
    def handler(cv, p, real):
        x = tensor_arg(p["self"])
        if op == "bitwise_not" and x.dtype == DType.bool:
            return cv.emit("logical_not", [x])
        return cv.emit(op, [x])
    return handler


for _name, _op in UNARY.items():
    handles(_name, f"{_name}_")(_unary(_op))


@handles("round")
def round_(cv, p, real):
    return cv.emit("round", [tensor_arg(p["self"])])


@handles("gelu")
def gelu(cv, p, real):
    return cv.emit("gelu", [tensor_arg(p["self"])], {"approximate": p["approximate"]})


@handles("hardtanh", "hardtanh_")
def hardtanh(cv, p, real):
    return cv.emit("clip", [tensor_arg(p["self"])], {"min": float(p["min_val"]), "max": float(p["max_val"])})


@handles("leaky_relu", "leaky_relu_")
def leaky_relu(cv, p, real):
    return cv.emit("leaky_relu", [tensor_arg(p["self"])], {"negative_slope": float(p["negative_slope"])})


@handles("elu", "elu_")
def elu(cv, p, real):
    """scale * elu(input_scale * x, alpha): SELU and CELU decompose to it."""
    x, scale, input_scale = tensor_arg(p["self"]), float(p["scale"]), float(p["input_scale"])
    if input_scale != 1.0:
        x = cv.emit("mul", [x, cv.scalar(input_scale, x)])
    y = cv.emit("elu", [x], {"alpha": float(p["alpha"])})
    return y if scale == 1.0 else cv.emit("mul", [y, cv.scalar(scale, y)])


@handles("softplus")
def softplus(cv, p, real):
    """log(1 + exp(beta x)) / beta, and x itself where beta x > threshold (torch's rule)."""
    x, beta, threshold = tensor_arg(p["self"]), float(p["beta"]), float(p["threshold"])
    if beta == 1.0 and threshold == 20.0:
        return cv.emit("softplus", [x])
    bx = cv.emit("mul", [x, cv.scalar(beta, x)])
    smooth = cv.emit("div", [cv.emit("log1p", [cv.emit("exp", [bx])]), cv.scalar(beta, x)])
    return cv.emit("where", [cv.emit("gt", [bx, cv.scalar(threshold, x)]), x, smooth])


@handles("rrelu", "rrelu_with_noise_functional", "rrelu_with_noise")
def rrelu(cv, p, real):
    """At inference RReLU is a leaky ReLU with the mean of its slope range."""
    if p.get("training"):
        raise Unhandled
    slope = (float(p["lower"]) + float(p["upper"])) / 2
    y = cv.emit("leaky_relu", [tensor_arg(p["self"])], {"negative_slope": slope})
    return (y, p["noise"]) if isinstance(real, tuple) else y


@handles("_trilinear")
def trilinear(cv, p, real):
    """sum over sumdim of the three operands, each unsqueezed at its expand dims (nn.Bilinear)."""
    factors = []
    for x, dims in ((p["i1"], p["expand1"]), (p["i2"], p["expand2"]), (p["i3"], p["expand3"])):
        x = tensor_arg(x)
        for d in dims:
            x = cv.emit("unsqueeze", [x], {"axes": [d]})
        factors.append(x)
    y = cv.emit("mul", [cv.emit("mul", factors[:2]), factors[2]])
    return cv.emit("sum", [y], {"axes": list(p["sumdim"]), "keepdim": False}) if p["sumdim"] else y


@handles("conv_tbc")
def conv_tbc(cv, p, real):
    """A conv1d over [time, batch, channels] with a [kernel, in, out] weight."""
    x, w, b = tensor_arg(p["self"]), tensor_arg(p["weight"]), tensor_arg(p["bias"])
    pad = int(p["pad"])
    xs = cv.emit("permute", [x], {"perm": [1, 2, 0]})
    ws = cv.emit("permute", [w], {"perm": [2, 1, 0]})
    y = cv.emit("conv", [xs, ws, b], {"stride": [1], "pads": [pad, pad], "dilation": [1], "groups": 1})
    return cv.emit("permute", [y], {"perm": [2, 0, 1]})


@handles("prelu", "_prelu_kernel")
def prelu(cv, p, real):
    return cv.emit("prelu", [tensor_arg(p["self"]), tensor_arg(p["weight"])])


BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "maximum": "maximum", "minimum": "minimum",
          "fmod": "fmod", "remainder": "remainder", "atan2": "atan2", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le",
          "gt": "gt", "ge": "ge", "logical_and": "logical_and", "logical_or": "logical_or",
          "logical_xor": "logical_xor", "bitwise_and": "bitwise_and", "bitwise_or": "bitwise_or",
          "bitwise_xor": "bitwise_xor", "pow": "pow"}
_BOOL_FORM = {"bitwise_and": "logical_and", "bitwise_or": "logical_or", "bitwise_xor": "logical_xor"}


def _binary(op: str):
    def handler(cv, p, real):
        a = p.get("self")
        b = p.get("other", p.get("exponent"))
        if not isinstance(a, Value) and not isinstance(b, Value):
            raise Unhandled
        like = a if isinstance(a, Value) else b
        a, b = operand(cv, a, like), operand(cv, b, like)
        alpha = p.get("alpha", 1)
        if alpha not in (None, 1):
            b = cv.emit("mul", [b, cv.scalar(alpha, b)])
        name = _BOOL_FORM.get(op, op) if a.dtype == b.dtype == DType.bool else op
        mode = p.get("rounding_mode")
        return cv.emit(name, [a, b], {"rounding_mode": mode} if mode else None)
    return handler


for _name, _op in BINARY.items():
    handles(*(f"{_name}.{o}" for o in ("Tensor", "Scalar", "Tensor_mode", "Scalar_mode", "Tensor_Tensor",
                                       "Tensor_Scalar", "default", "self")), f"{_name}_.Tensor",
            f"{_name}_.Scalar")(_binary(_op))
handles("atan2.out")(_binary("atan2"))  # an out= overload the opset tags core
handles("__and__.Tensor", "__or__.Tensor", "__xor__.Tensor")(  # Python's operators, before decomposition
    lambda cv, p, real: _binary({"__and__": "bitwise_and", "__or__": "bitwise_or", "__xor__": "bitwise_xor"}[
        cv.current.target.__name__.split(".")[0]])(cv, p, real))


@handles("rsub.Scalar", "rsub.Tensor")
def rsub(cv, p, real):
    """other - alpha * self: what ``1.0 - mask`` traces to."""
    x, other = p["self"], p["other"]
    if not isinstance(x, Value) and not isinstance(other, Value):
        raise Unhandled
    like = x if isinstance(x, Value) else other
    x, other = operand(cv, x, like), operand(cv, other, like)
    if p.get("alpha", 1) not in (None, 1):
        x = cv.emit("mul", [x, cv.scalar(p["alpha"], x)])
    return cv.emit("sub", [other, x])


@handles("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar")
def where(cv, p, real):
    cond, a, b = tensor_arg(p["condition"]), p["self"], p["other"]
    like = a if isinstance(a, Value) else b if isinstance(b, Value) else None
    if like is None:
        a = cv.graph.add_constant(f"{cv.name}_a", torch.tensor(a, dtype=real.dtype))
        like = a
    return cv.emit("where", [cond, operand(cv, a, like), operand(cv, b, like)])


@handles("clamp", "clamp_", "clamp.Tensor")
def clamp(cv, p, real):
    x, lo, hi = tensor_arg(p["self"]), p["min"], p["max"]
    if not isinstance(lo, Value) and not isinstance(hi, Value):
        bounds = {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)}
        return cv.emit("clip", [x], bounds)
    y = x
    if lo is not None:
        y = cv.emit("maximum", [y, operand(cv, lo, x)])
    if hi is not None:
        y = cv.emit("minimum", [y, operand(cv, hi, x)])
    return y


# ---------------------------------------------------------------------------- reductions
def _reduce(op: str):
    def handler(cv, p, real):
        x = tensor_arg(p["self"])
        if p.get("dtype") is not None and DType.from_torch(p["dtype"]) != x.dtype:
            x = cv.emit("cast", [x], {"dtype": str(p["dtype"]).removeprefix("torch.")})
        dim = p.get("dim", p.get("dims"))
        attrs = {"axes": _dims(dim, x.rank), "keepdim": bool(p.get("keepdim") or False)}
        if op == "var":
            correction = p.get("correction")
            unbiased = p.get("unbiased")
            attrs["correction"] = float(correction) if correction is not None else (0 if unbiased is False else 1)
        if x.rank == 0:  # nothing to reduce (a 0-d variance is nan: the decomposition says so)
            if op == "var":
                raise Unhandled
            return cv.emit("identity", [x])
        return cv.emit(op, [x], attrs)
    return handler


handles("sum.dim_IntList", "sum.default")(_reduce("sum"))
handles("mean.dim", "mean.default")(_reduce("mean"))
handles("amax")(_reduce("amax"))
handles("amin")(_reduce("amin"))
handles("prod.default", "prod.dim_int")(_reduce("prod"))
handles("any.default", "any.dim", "any.dims")(_reduce("any"))
handles("var.correction", "var.dim")(_reduce("var"))


def _arg_reduce(op: str):
    def handler(cv, p, real):
        x = tensor_arg(p["self"])
        if p["dim"] is None:  # over the flattened tensor
            x = cv.emit("reshape", [x], {"shape": [-1]})
            return cv.emit(op, [x], {"axes": [0], "keepdim": False}) if not p["keepdim"] else \
                cv.emit("reshape", [cv.emit(op, [x], {"axes": [0], "keepdim": False})], {"shape": list(real.shape)})
        return cv.emit(op, [x], {"axes": [p["dim"] % x.rank], "keepdim": bool(p["keepdim"])})
    return handler


handles("argmax")(_arg_reduce("argmax"))
handles("argmin")(_arg_reduce("argmin"))


@handles("max.dim", "min.dim")
def max_dim(cv, p, real):
    x = tensor_arg(p["self"])
    largest = cv.current.target.__name__.startswith("max")
    attrs = {"axes": [p["dim"] % x.rank], "keepdim": bool(p["keepdim"])}
    return (cv.emit("amax" if largest else "amin", [x], attrs), cv.emit("argmax" if largest else "argmin", [x], attrs))


@handles("cumsum")
def cumsum(cv, p, real):
    x = tensor_arg(p["self"])
    if p["dtype"] is not None and DType.from_torch(p["dtype"]) != x.dtype:
        x = cv.emit("cast", [x], {"dtype": str(p["dtype"]).removeprefix("torch.")})
    return cv.emit("cumsum", [x], {"axis": p["dim"] % max(x.rank, 1)})


@handles("_softmax", "_log_softmax", "softmax.int", "log_softmax.int")
def softmax(cv, p, real):
    x = tensor_arg(p["self"])
    if real.dtype != x.dtype.torch:
        x = cv.emit("cast", [x], {"dtype": str(real.dtype).removeprefix("torch.")})
    op = "log_softmax" if "log" in cv.current.target.__name__ else "softmax"
    return cv.emit(op, [x], {"axis": p["dim"] % max(x.rank, 1)})


# ---------------------------------------------------------------------------- moving data
@handles("view", "_unsafe_view", "reshape", "view_copy")
def view(cv, p, real):
    x = tensor_arg(p["self"])
    return cv.emit("reshape", [x], {"shape": reshape_target(x, p.get("size", p.get("shape")))})


@handles("flatten.using_ints")
def flatten(cv, p, real):
    x = tensor_arg(p["self"])
    if x.rank == 0:
        raise Unhandled
    return cv.emit("flatten", [x], {"start": p["start_dim"] % x.rank, "end": p["end_dim"] % x.rank})


@handles("roll")
def roll_(cv, p, real):
    return roll(cv, tensor_arg(p["self"]), [int(s) for s in p["shifts"]], list(p["dims"]))


@handles("unflatten.int")
def unflatten(cv, p, real):
    x = tensor_arg(p["self"])
    dim, sizes = p["dim"] % x.rank, list(p["sizes"])
    shape = [x.dim(i) for i in range(dim)] + sizes + [x.dim(i) for i in range(dim + 1, x.rank)]
    if dim > 0 and not x.sym:  # the input's own leading dim: the batch stays free
        return cv.emit("reshape", [x], {"shape": [BATCH, *(int(d) for d in shape[1:])]})
    return cv.emit("reshape", [x], {"shape": reshape_target(x, shape)})


@handles("permute", "permute_copy")
def permute(cv, p, real):
    x = tensor_arg(p["self"])
    return cv.emit("permute", [x], {"perm": [d % x.rank for d in p["dims"]]})


@handles("transpose.int")
def transpose(cv, p, real):
    x = tensor_arg(p["self"])
    perm = list(range(x.rank))
    d0, d1 = p["dim0"] % x.rank, p["dim1"] % x.rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return cv.emit("permute", [x], {"perm": perm})


@handles("t")
def t(cv, p, real):
    x = tensor_arg(p["self"])
    return cv.emit("permute", [x], {"perm": list(reversed(range(x.rank)))})


@handles("expand", "expand_copy")
def expand(cv, p, real):
    x = tensor_arg(p["self"])
    sizes = list(p["size"])
    if any(isinstance(s, SymDim) for s in sizes) or x.sym:  # sizes over the graph's symbols
        lead = len(sizes) - x.rank
        shape = [x.dim(i - lead) if s == -1 else s for i, s in enumerate(sizes)]
        if all((isinstance(a, SymDim) and a == b) or a == b for a, b in zip(shape[lead:], _dims_of(x))) \
                and lead == 0:
            return cv.emit("identity", [x])
        return cv.emit("expand", [x], {"shape": shape})
    batch = [s for s in sizes if isinstance(s, BatchDim)]
    if len(batch) == 1 and isinstance(sizes[0], BatchDim) and sizes[0].factor == 1:
        return cv.emit("expand_batch", [x, batch[0].source], {"shape": ["N"] + [int(concrete(s)) for s in sizes[1:]]})
    shape = list(real.shape)
    if shape == list(x.shape):
        return cv.emit("identity", [x])
    return cv.emit("expand", [x], {"shape": shape})


@handles("unsqueeze", "unsqueeze_copy")
def unsqueeze(cv, p, real):
    x = tensor_arg(p["self"])
    return cv.emit("unsqueeze", [x], {"axes": [p["dim"] % (x.rank + 1)]})


@handles("squeeze.dim", "squeeze.dims", "squeeze.default", "squeeze_copy.dims")
def squeeze(cv, p, real):
    x = tensor_arg(p["self"])
    dim = p.get("dim", p.get("dims"))
    axes = [a for a in range(x.rank) if x.shape[a] == 1] if dim is None else [d % max(x.rank, 1) for d in ints(dim, 1)]
    axes = [a for a in axes if x.rank and x.shape[a] == 1]
    return cv.emit("squeeze", [x], {"axes": axes}) if axes else cv.emit("identity", [x])


@handles("cat")
def cat(cv, p, real):
    tensors = [t for t in p["tensors"] if not (isinstance(t, Value) and t.shape == (0,))]  # legacy empty operands
    if not tensors or not all(isinstance(t, Value) for t in tensors):
        raise Unhandled
    if len(tensors) == 1:
        return cv.emit("identity", tensors)
    return cv.emit("concat", tensors, {"axis": p["dim"] % tensors[0].rank})


@handles("split_with_sizes", "split.Tensor", "split_with_sizes_copy", "unbind.int", "chunk.default")
def split(cv, p, real):
    x = tensor_arg(p["self"])
    axis = p.get("dim", 0) % x.rank
    if cv.current.target.__name__.startswith("unbind"):  # its parts have the axis squeezed away
        parts = split_outputs(cv, x, [1] * x.shape[axis], axis)
        return tuple(cv.emit("squeeze", [v], {"axes": [axis]}, name=f"{cv.name}_squeeze") for v in parts)
    return split_outputs(cv, x, [t.shape[axis] for t in real], axis)


@handles("select.int", "select_copy.int")
def select(cv, p, real):
    x = tensor_arg(p["self"])
    axis, index = p["dim"] % x.rank, int(concrete(p["index"]))
    if not (x.sym and x.sym[axis] is not None):  # a symbolic size: a negative index counts from its run-time end
        index %= x.shape[axis]
    return cv.emit("select", [x], {"axis": axis, "index": index})


def _dims_of(x: Value) -> list:
    return [x.dim(a) for a in range(x.rank)]


@handles("slice.Tensor", "slice_copy.Tensor")
def slice_(cv, p, real):
    x = tensor_arg(p["self"])
    axis = p["dim"] % x.rank
    end = p["end"]
    if isinstance(p["start"], SymDim) or isinstance(end, SymDim) or isinstance(x.dim(axis), SymDim):
        start, size = p["start"] or 0, x.dim(axis)
        if isinstance(end, SymDim) and end == size or (isinstance(end, int) and end >= 2 ** 62):
            end = size  # to the end of the dim
        if start == 0 and p["step"] == 1 and end == size:
            return cv.emit("identity", [x])
        return cv.emit("slice", [x], {"axes": [axis], "starts": [start], "ends": [end], "steps": [p["step"]]})
    if isinstance(end, BatchDim) and end.value >= x.shape[axis]:
        end = None  # up to a batch size that is the whole dim: to the end, at any batch
    start, step = concrete(p["start"]), concrete(p["step"])
    if (start or 0) == 0 and step == 1 and (end is None or concrete(end) >= x.shape[axis]):
        return cv.emit("identity", [x])  # the whole dim (at any batch size): nothing to slice
    s, e, st = slice(start, concrete(end), step).indices(x.shape[axis])
    return cv.emit("slice", [x], {"axes": [axis], "starts": [s], "ends": [e], "steps": [st]})


@handles("flip")
def flip(cv, p, real):
    x = tensor_arg(p["self"])
    return cv.emit("flip", [x], {"dims": [d % x.rank for d in p["dims"]]})


@handles("repeat")
def repeat(cv, p, real):
    return cv.emit("tile", [tensor_arg(p["self"])], {"repeats": [int(concrete(r)) for r in p["repeats"]]})


@handles("diagonal", "diagonal_copy")
def diagonal(cv, p, real):
    x = tensor_arg(p["self"])
    return cv.emit("diagonal", [x], {"offset": p["offset"], "dim1": p["dim1"] % x.rank, "dim2": p["dim2"] % x.rank})


@handles("alias", "clone", "contiguous", "detach", "lift_fresh_copy", "alias_copy", "dropout", "feature_dropout")
def identity(cv, p, real):
    x = p.get("self", p.get("input"))
    return cv.emit("identity", [tensor_arg(x)])


@handles("_to_copy", "to.dtype", "to.dtype_layout", "to.device", "type_as")
def to_copy(cv, p, real):
    x = tensor_arg(p["self"])
    if DType.from_torch(real.dtype) == x.dtype:
        return cv.emit("identity", [x])
    return cv.emit("cast", [x], {"dtype": str(real.dtype).removeprefix("torch.")})


@handles("copy", "copy_")
def copy(cv, p, real):
    x, src = tensor_arg(p["self"]), tensor_arg(p["src"])
    y = src if src.dtype == x.dtype else cv.emit("cast", [src], {"dtype": str(real.dtype).removeprefix("torch.")})
    dims = [x.dim(a) for a in range(x.rank)]  # symbolic where x's are: a fill of x[:, -1] at any batch
    return y if [y.dim(a) for a in range(y.rank)] == dims else cv.emit("expand", [y], {"shape": dims})


def _filled(cv, shape: list, value: Any, real: torch.Tensor) -> Value:
    """A tensor of one value: a constant, or a full node where its shape is symbolic."""
    if not any(isinstance(d, SymDim) for d in shape):
        return cv.graph.add_constant(cv.name, torch.full(tuple(real.shape), value, dtype=real.dtype))
    return cv.emit("full", [], {"shape": list(shape), "value": value, "dtype": str(real.dtype).removeprefix("torch.")})


@handles("fill.Scalar", "fill_.Scalar", "full_like", "zeros_like", "ones_like", "empty_like")
def fill(cv, p, real):
    """Only the operand's shape is read."""
    x = p["self"]
    name = cv.current.target.__name__.split(".")[0]
    value = {"zeros_like": 0, "ones_like": 1, "empty_like": 0}.get(name, p.get("value", p.get("fill_value")))
    shape = [x.dim(a) for a in range(x.rank)] if isinstance(x, Value) else list(real.shape)
    return _filled(cv, shape, value.item() if isinstance(value, torch.Tensor) else value, real)


@handles("new_ones", "new_zeros", "new_full")
def new_filled(cv, p, real):
    name = cv.current.target.__name__.split(".")[0]
    value = {"new_ones": 1, "new_zeros": 0}.get(name, p.get("fill_value"))
    return _filled(cv, list(p["size"]), value, real)


@handles("empty.memory_format", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided")
def empty(cv, p, real):
    return _filled(cv, list(p["size"]), 0, real)  # contents unspecified: zeros


@handles("constant_pad_nd")
def constant_pad(cv, p, real):
    return cv.emit("pad", [tensor_arg(p["self"])], {"pads": ints(p["pad"], 0), "mode": "constant",
                                                    "value": float(p["value"] or 0.0)})


@handles("pad")
def pad(cv, p, real):
    """F.pad as torch.export records it before decomposition (kept whole: one IR op for every mode)."""
    mode = p["mode"] or "constant"
    return cv.emit("pad", [tensor_arg(p["self"])], {"pads": ints(p["pad"], 0), "mode": mode,
                                                    "value": float(p["value"] or 0.0)})


@handles("reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
         "replication_pad3d", "circular_pad1d", "circular_pad2d", "circular_pad3d")
def mode_pad(cv, p, real):
    name = cv.current.target.__name__
    mode = "reflect" if name.startswith("reflection") else "replicate" if name.startswith("replication") else "circular"
    return cv.emit("pad", [tensor_arg(p["self"])], {"pads": ints(p["padding"], 0), "mode": mode, "value": 0.0})


# ---------------------------------------------------------------------------- indexing
@handles("embedding")
def embedding(cv, p, real):
    return cv.emit("embedding", [tensor_arg(p["weight"]), tensor_arg(p["indices"])])


@handles("index_select")
def index_select(cv, p, real):
    x, idx = tensor_arg(p["self"]), p["index"]
    if isinstance(idx, Value) and idx.is_constant and idx.rank == 1:
        return gather_index(cv, x, (slice(None),) * (p["dim"] % x.rank) + (idx,))
    return cv.emit("take", [x, tensor_arg(idx)], {"axis": p["dim"] % x.rank})


@handles("index.Tensor", "_unsafe_index.Tensor")
def index(cv, p, real):
    x, indices = tensor_arg(p["self"]), list(p["indices"])
    axes = [a for a, i in enumerate(indices) if i is not None]
    values = [indices[a] for a in axes]
    if not values or not all(isinstance(v, Value) for v in values) or any(v.dtype == DType.bool for v in values):
        raise Unhandled  # boolean masks select a data-dependent number of elements
    if len(values) == 1 and values[0].is_constant and values[0].rank == 1:
        return gather_index(cv, x, tuple(slice(None) if i is None else i for i in indices))
    if len(values) == 1:
        return cv.emit("take", [x, values[0]], {"axis": axes[0]})
    return cv.emit("index", [x, *values], {"axes": axes})


@handles("index_put", "index_put_", "_unsafe_index_put")
def index_put(cv, p, real):
    x, indices, values = tensor_arg(p["self"]), list(p["indices"]), p["values"]
    axes = [a for a, i in enumerate(indices) if i is not None]
    idx = [indices[a] for a in axes]
    if not all(isinstance(v, Value) and v.dtype != DType.bool for v in idx):
        raise Unhandled
    return cv.emit("index_put", [x, operand(cv, values, x), *idx], {"axes": axes, "accumulate": bool(p["accumulate"])})


def _position(bound: Any, size: Any, default: Any) -> Any:
    """A slice bound as a position along a dim of (symbolic) ``size``: ``default`` for None, the size
    for one past 2^62 (torch's "to the end"), counted from the end where negative."""
    if bound is None:
        return default
    if isinstance(bound, int) and bound >= 2 ** 62:
        return size
    return size + bound if isinstance(bound, int) and bound < 0 else bound


@handles("slice_scatter")
def slice_scatter(cv, p, real):
    """x[..., start:end:step] = src as an index_put at those positions: constants, or an arange over
    the run-time size where the dim is symbolic (x[:, 1:] = y at every sequence length)."""
    x, src = tensor_arg(p["self"]), tensor_arg(p["src"])
    axis = p["dim"] % x.rank
    size, start, end, step = x.dim(axis), p["start"], p["end"], p["step"] or 1
    if isinstance(size, SymDim) or isinstance(start, SymDim) or isinstance(end, SymDim):
        positions = cv.emit("arange", [], {"start": _position(start, size, 0), "end": _position(end, size, size),
                                           "step": step, "dtype": "int64"})
    else:
        start, end, step = slice(concrete(start), concrete(end), concrete(step)).indices(size)
        positions = cv.graph.add_constant(f"{cv.name}_positions", torch.arange(start, end, step))
    return cv.emit("index_put", [x, src, positions], {"axes": [axis], "accumulate": False})


@handles("select_scatter")
def select_scatter(cv, p, real):
    """x[..., index] = src; a negative index on a symbolic dim counts from its run-time size."""
    x, src = tensor_arg(p["self"]), tensor_arg(p["src"])
    axis = p["dim"] % x.rank
    index, size = int(p["index"]), x.dim(axis)
    if isinstance(size, SymDim) and index < 0:
        position = cv.emit("sizes", [], {"values": [size + index], "shape": [1]})
    else:
        position = cv.graph.add_constant(f"{cv.name}_position", torch.tensor([index % x.shape[axis]]))
    src = cv.emit("unsqueeze", [src], {"axes": [axis]})
    return cv.emit("index_put", [x, src, position], {"axes": [axis], "accumulate": False})


@handles("gather")
def gather(cv, p, real):
    x = tensor_arg(p["self"])
    return cv.emit("gather_elements", [x, tensor_arg(p["index"])], {"axis": p["dim"] % x.rank})


_REDUCE = {"sum": "sum", "add": "sum", "prod": "prod", "multiply": "prod", "amax": "amax", "amin": "amin"}


@handles("scatter.src", "scatter.value", "scatter_add", "scatter_reduce.two", "scatter.reduce", "scatter.value_reduce")
def scatter(cv, p, real):
    x, index = tensor_arg(p["self"]), tensor_arg(p["index"])
    src = p.get("src", p.get("value"))
    reduce = p.get("reduce")
    if cv.current.target.__name__.startswith("scatter_add"):
        reduce = "sum"
    if (reduce is not None and reduce not in _REDUCE) or p.get("include_self", True) is False:
        raise Unhandled  # mean, or a reduction that ignores the existing values
    if not isinstance(src, Value):
        src = cv.graph.add_constant(f"{cv.name}_src", torch.full(tuple(index.shape), src, dtype=x.dtype.torch))
    return cv.emit("scatter", [x, index, src], {"axis": p["dim"] % x.rank, "reduce": _REDUCE.get(reduce, "none")})


@handles("sort", "sort.stable")
def sort(cv, p, real):
    x = tensor_arg(p["self"])
    return cv.emit("sort", [x], {"axis": p["dim"] % x.rank, "descending": bool(p["descending"])})


@handles("topk")
def topk(cv, p, real):
    x = tensor_arg(p["self"])
    if not p["sorted"]:
        raise Unhandled  # unsorted order is implementation-defined
    return cv.emit("topk", [x], {"k": int(concrete(p["k"])), "axis": p["dim"] % x.rank, "largest": bool(p["largest"])})


# ---------------------------------------------------------------------------- layers
@handles("linear")
def linear(cv, p, real):
    return cv.emit("linear", [tensor_arg(p["input"]), tensor_arg(p["weight"]), p["bias"]])


@handles("addmm")
def addmm(cv, p, real):
    x, w, bias = tensor_arg(p["mat1"]), tensor_arg(p["mat2"]), tensor_arg(p["self"])
    if float(p["beta"]) != 1.0 or float(p["alpha"]) != 1.0:
        raise Unhandled
    return cv.emit("add", [cv.emit("matmul", [x, w]), bias])


@handles("mm", "bmm", "matmul")
def matmul(cv, p, real):
    return cv.emit("matmul", [tensor_arg(p["self"]), tensor_arg(p.get("mat2", p.get("other")))])


@handles("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding")
def conv(cv, p, real):
    x, w = tensor_arg(p["input"]), tensor_arg(p["weight"])
    attrs = conv_attrs(p["stride"], p["padding"], p["dilation"], p["groups"], w, x.rank - 2)
    return cv.emit("conv", [x, w, p["bias"]], attrs)


@handles("conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input")
def conv_transpose(cv, p, real):
    x, w = tensor_arg(p["input"]), tensor_arg(p["weight"])
    nd = x.rank - 2
    return cv.emit("conv_transpose", [x, w, p["bias"]], {
        "stride": ints(p["stride"], nd), "padding": ints(p["padding"], nd), "dilation": ints(p["dilation"], nd),
        "output_padding": ints(p["output_padding"], nd), "groups": int(p["groups"])})


@handles("convolution")
def convolution(cv, p, real):
    x, w = tensor_arg(p["input"]), tensor_arg(p["weight"])
    nd = x.rank - 2
    if p["transposed"]:
        return cv.emit("conv_transpose", [x, w, p["bias"]], {
            "stride": ints(p["stride"], nd), "padding": ints(p["padding"], nd), "dilation": ints(p["dilation"], nd),
            "output_padding": ints(p["output_padding"], nd), "groups": int(p["groups"])})
    attrs = conv_attrs(p["stride"], p["padding"], p["dilation"], p["groups"], w, nd)
    return cv.emit("conv", [x, w, p["bias"]], attrs)


@handles("layer_norm", "native_layer_norm")
def layer_norm(cv, p, real):
    y = cv.emit("layer_norm", [tensor_arg(p["input"]), p["weight"], p["bias"]],
                {"normalized_shape": list(concrete(p["normalized_shape"])), "eps": float(p["eps"])})
    return (y, None, None) if isinstance(real, tuple) else y


@handles("group_norm", "native_group_norm")
def group_norm(cv, p, real):
    num_groups = p.get("num_groups", p.get("group"))
    y = cv.emit("group_norm", [tensor_arg(p["input"]), p["weight"], p["bias"]],
                {"num_groups": int(num_groups), "eps": float(p["eps"])})
    return (y, None, None) if isinstance(real, tuple) else y


@handles("instance_norm")
def instance_norm(cv, p, real):
    x = tensor_arg(p["input"])
    if p["use_input_stats"] is False:
        raise Unhandled  # running statistics: a batch norm, which the decomposition gives
    return cv.emit("group_norm", [x, p["weight"], p["bias"]], {"num_groups": x.shape[1], "eps": float(p["eps"])})


@handles("batch_norm", "_native_batch_norm_legit_no_training")
def batch_norm(cv, p, real):
    if p.get("training"):
        raise Unhandled
    x, w, b, m, v = (p[k] for k in ("input", "weight", "bias", "running_mean", "running_var"))
    if not all(isinstance(t, Value) for t in (m, v)):
        raise Unhandled
    if w is None:
        w = cv.graph.add_constant(f"{cv.name}_weight", torch.ones(m.shape, dtype=m.dtype.torch))
    if b is None:
        b = cv.graph.add_constant(f"{cv.name}_bias", torch.zeros(m.shape, dtype=m.dtype.torch))
    y = cv.emit("batch_norm", [tensor_arg(x), w, b, m, v], {"eps": float(p["eps"]),
                                                            "momentum": float(p["momentum"] or 0.1)})
    return (y, None, None) if isinstance(real, tuple) else y


@handles("_native_batch_norm_legit.no_stats", "_native_batch_norm_legit")
def batch_norm_batch_stats(cv, p, real):
    """Normalization by the batch's own statistics (no running stats, or training=True)."""
    x = tensor_arg(p["input"])
    axes = [a for a in range(x.rank) if a != 1]
    mean = cv.emit("mean", [x], {"axes": axes, "keepdim": True})
    var = cv.emit("var", [x], {"axes": axes, "keepdim": True, "correction": 0})
    shape = [1, x.shape[1]] + [1] * (x.rank - 2)
    y = cv.emit("mul", [cv.emit("sub", [x, mean]),
                        cv.emit("rsqrt", [cv.emit("add", [var, cv.scalar(float(p["eps"]), x)])])])
    if p["weight"] is not None:
        y = cv.emit("mul", [y, cv.emit("reshape", [p["weight"]], {"shape": shape})])
    if p["bias"] is not None:
        y = cv.emit("add", [y, cv.emit("reshape", [p["bias"]], {"shape": shape})])
    return (y, None, None)


@handles("scaled_dot_product_attention")
def sdpa(cv, p, real):
    """softmax(q @ k^T * scale + mask) @ v as matmuls: the channel analysis sees the head dims q and
    k share; a boolean mask becomes an additive bias (0 attend, -inf masked), as torch computes it."""
    q, k, v = tensor_arg(p["query"]), tensor_arg(p["key"]), tensor_arg(p["value"])
    if p["dropout_p"] or p.get("enable_gqa") or min(q.rank, k.rank, v.rank) < 2:
        raise Unhandled
    return attention(cv, q, k, v, p["attn_mask"], p["is_causal"], p["scale"])


@handles("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices")
def max_pool_(cv, p, real):
    x = tensor_arg(p["self"])
    with_indices = isinstance(real, tuple)
    if with_indices and any(u.args[1] == 1 and u.users for u in cv.current.users if u.target is operator.getitem):
        raise Unhandled  # the indices are used
    y = max_pool(cv, x, p["kernel_size"], p["stride"], p["padding"], p["dilation"], p["ceil_mode"])
    return (y, None) if with_indices else y


@handles("avg_pool1d", "avg_pool2d", "avg_pool3d")
def avg_pool_(cv, p, real):
    if p.get("divisor_override") is not None:
        raise Unhandled
    return avg_pool(cv, tensor_arg(p["self"]), p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                    p["count_include_pad"])


@handles("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
         "_adaptive_avg_pool3d")
def adaptive_avg(cv, p, real):
    return adaptive("adaptive_avg_pool", cv, tensor_arg(p["self"]), p["output_size"])


@handles("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
def adaptive_max(cv, p, real):
    if any(u.target is not operator.getitem or (u.args[1] == 1 and u.users) for u in cv.current.users):
        raise Unhandled  # the indices are used
    return (adaptive("adaptive_max_pool", cv, tensor_arg(p["self"]), p["output_size"]), None)


_RESIZE = {"nearest": "nearest", "linear": "linear", "bilinear": "linear", "trilinear": "linear", "bicubic": "cubic"}


@handles("upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec", "upsample_linear1d.vec",
         "upsample_bilinear2d.vec", "upsample_trilinear3d.vec", "upsample_bicubic2d.vec")
def upsample(cv, p, real):
    x = tensor_arg(p["input"])
    kind = cv.current.target.__name__.split(".")[0].removeprefix("upsample_")[:-2]
    attrs = {"mode": _RESIZE[kind], "size": list(real.shape[2:])}
    if kind != "nearest":
        attrs["align_corners"] = bool(p["align_corners"])
    if p.get("scale_factors") and not p.get("output_size"):
        attrs["scales"] = [float(s) for s in p["scale_factors"]]
    return cv.emit("resize", [x], attrs)


@handles("grid_sampler_2d", "grid_sampler")
def grid_sampler(cv, p, real):
    modes = {0: "bilinear", 1: "nearest", 2: "bicubic"}
    paddings = {0: "zeros", 1: "border", 2: "reflection"}
    return cv.emit("grid_sample", [tensor_arg(p["input"]), tensor_arg(p["grid"])], {
        "mode": modes[p["interpolation_mode"]], "padding_mode": paddings[p["padding_mode"]],
        "align_corners": bool(p["align_corners"])})


# ---------------------------------------------------------------------------- host values
@handles("sym_size.int")
def sym_size(cv, p, real):
    x, dim = p["self"], p["dim"]
    if isinstance(x, Value) and x.sym:
        return x.dim(dim % x.rank)
    if isinstance(x, Value) and dim % x.rank == 0 and not x.is_constant:
        return BatchDim(int(real), x)
    return int(real)


@handles("sym_numel", "sym_is_contiguous")
def sym_numel(cv, p, real):
    return real if isinstance(real, bool) else int(real)


@handles("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async.msg")
def assertion(cv, p, real):
    return None  # checked on the example inputs at trace time


@handles("_local_scalar_dense")
def local_scalar(cv, p, real):
    x = p["self"]
    if isinstance(x, Value) and not x.is_constant:
        raise Unhandled  # a value read back to Python: data-dependent
    return real


@handles("scalar_tensor", "full", "arange.start_step", "arange.default", "arange.start", "zeros", "ones")
def creation(cv, p, real):
    """A tensor made from sizes: a constant when they are known at import, else an arange or full
    node whose sizes are expressions over the graph's symbols."""
    name = cv.current.target.__name__.split(".")[0]
    sizes = p.get("size") or []
    bounds = [p.get(k) for k in ("start", "end", "step")]
    if not any(isinstance(d, SymDim) for d in (*sizes, *bounds)):
        return cv.graph.add_constant(cv.name, real.detach().clone())
    dtype = str(real.dtype).removeprefix("torch.")
    if name == "arange":
        start, end, step = (0 if bounds[0] is None else bounds[0]), bounds[1], (1 if bounds[2] is None else bounds[2])
        return cv.emit("arange", [], {"start": start, "end": end, "step": step, "dtype": dtype})
    value = {"zeros": 0, "ones": 1}.get(name, p.get("fill_value"))
    return cv.emit("full", [], {"shape": list(sizes), "value": value, "dtype": dtype})
