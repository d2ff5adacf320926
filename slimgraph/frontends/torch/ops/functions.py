"""Handlers for what torch.fx records: torch.* and torch.nn.functional calls, Tensor methods and
Python operators (which also do the int arithmetic on shapes).

Calls without a handler here are not lost: the converter decomposes them to Core ATen (aten.py).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from slimgraph.frontends.torch.dims import BatchDim, concrete
from slimgraph.frontends.torch.ops.registry import (
    FUNCTIONS,
    METHODS,
    Handler,
    Unhandled,
    arg,
    function,
    ints,
    method,
    pads_from,
    sizes_arg,
    tensor_arg,
)
from slimgraph.ir import DType, Value
from slimgraph.ir.opdefs.shape import BATCH
from slimgraph.ir.symbolic import SymDim


# ============================================================================ layers (shared with modules and aten)
def conv_attrs(stride, padding, dilation, groups, w: Value, nd: int) -> dict:
    dilation = ints(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0] * (2 * nd)
        else:  # "same" with stride 1: torch puts the odd extra pad at the end
            total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        pads = pads_from(padding, nd)
    return {"stride": ints(stride, nd), "pads": pads, "dilation": dilation, "groups": int(groups)}


def max_pool(cv, x: Value, kernel, stride, padding, dilation, ceil_mode):
    nd = x.rank - 2
    stride = stride if stride not in (None, []) else kernel
    return cv.emit("max_pool", [x], {"kernel": ints(kernel, nd), "stride": ints(stride, nd),
                                     "pads": pads_from(padding, nd), "dilation": ints(dilation, nd),
                                     "ceil_mode": bool(ceil_mode)})


def avg_pool(cv, x: Value, kernel, stride, padding, ceil_mode, count_include_pad):
    nd = x.rank - 2
    stride = stride if stride not in (None, []) else kernel
    return cv.emit("avg_pool", [x], {"kernel": ints(kernel, nd), "stride": ints(stride, nd),
                                     "pads": pads_from(padding, nd), "ceil_mode": bool(ceil_mode),
                                     "count_include_pad": bool(count_include_pad)})


def adaptive(op: str, cv, x: Value, output_size) -> Value:
    nd = x.rank - 2
    size = ints(output_size, nd)
    size = [x.shape[2 + i] if s is None else s for i, s in enumerate(size)]
    return cv.emit(op, [x], {"output_size": size})


# ============================================================================ element-wise functions
def _unary(op: str, attrs: Callable[[tuple, dict], dict] = lambda a, k: {}):
    def handler(cv, args, kwargs, real):
        return cv.emit(op, [tensor_arg(args[0])], attrs(args, kwargs))

    return handler


for _op, _targets in {
    "relu": [F.relu, torch.relu, "relu", "relu_"],
    "sigmoid": [F.sigmoid, torch.sigmoid, "sigmoid"],
    "tanh": [F.tanh, torch.tanh, "tanh"],
    "silu": [F.silu, "silu"],
    "hardswish": [F.hardswish],
    "hardsigmoid": [F.hardsigmoid],
    "erf": [torch.erf, "erf"],
    "exp": [torch.exp, "exp"],
    "log": [torch.log, "log"],
    "sqrt": [torch.sqrt, "sqrt"],
    "rsqrt": [torch.rsqrt, "rsqrt"],
    "neg": [torch.neg, operator.neg, "neg"],
    "abs": [torch.abs, operator.abs, "abs"],
    "identity": ["contiguous", "clone", "detach"],
}.items():
    for _t in _targets:
        (METHODS if isinstance(_t, str) else FUNCTIONS)[_t] = _unary(_op)

FUNCTIONS[F.relu6] = _unary("clip", lambda a, k: {"min": 0.0, "max": 6.0})
FUNCTIONS[F.hardtanh] = _unary("clip", lambda a, k: {"min": float(arg(a, k, 1, "min_val", -1.0)),
                                                     "max": float(arg(a, k, 2, "max_val", 1.0))})
FUNCTIONS[F.gelu] = METHODS["gelu"] = _unary("gelu", lambda a, k: {"approximate": k.get("approximate", "none")})
FUNCTIONS[F.leaky_relu] = _unary(
    "leaky_relu", lambda a, k: {"negative_slope": float(arg(a, k, 1, "negative_slope", 0.01))})
# the PyTorch backend's own forms, read back without exporting the call (which costs seconds)
for _op in ("mish", "softsign", "logsigmoid", "selu"):
    FUNCTIONS[getattr(F, _op)] = _unary(_op)
FUNCTIONS[F.elu] = _unary("elu", lambda a, k: {"alpha": float(arg(a, k, 1, "alpha", 1.0))})
FUNCTIONS[F.local_response_norm] = _unary("lrn", lambda a, k: {
    "size": int(arg(a, k, 1, "size")), "alpha": float(arg(a, k, 2, "alpha", 1e-4)),
    "beta": float(arg(a, k, 3, "beta", 0.75)), "k": float(arg(a, k, 4, "k", 1.0))})


@function(F.softplus)
def softplus_fn(cv, args, kwargs, real):
    if (arg(args, kwargs, 1, "beta", 1.0), arg(args, kwargs, 2, "threshold", 20.0)) != (1.0, 20.0):
        raise Unhandled  # aten's handler writes the general form
    return cv.emit("softplus", [tensor_arg(args[0])])


@function(F.grid_sample)
def grid_sample_fn(cv, args, kwargs, real):
    return cv.emit("grid_sample", [tensor_arg(args[0]), tensor_arg(arg(args, kwargs, 1, "grid"))], {
        "mode": arg(args, kwargs, 2, "mode", "bilinear"), "padding_mode": arg(args, kwargs, 3, "padding_mode", "zeros"),
        "align_corners": bool(arg(args, kwargs, 4, "align_corners", False))})


@function(torch.clamp, torch.clip)
@method("clamp", "clip", "clamp_")
def clamp(cv, args, kwargs, real):
    lo, hi = arg(args, kwargs, 1, "min"), arg(args, kwargs, 2, "max")
    if isinstance(lo, Value) or isinstance(hi, Value):
        raise Unhandled
    return cv.emit("clip", [tensor_arg(args[0])], {"min": None if lo is None else float(lo),
                                                   "max": None if hi is None else float(hi)})


@function(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
def dropout_fn(cv, args, kwargs, real):
    return cv.emit("dropout", [tensor_arg(args[0])], {"p": float(arg(args, kwargs, 1, "p", 0.5))})


def _binary(op: str, reverse: bool = False):
    def handler(cv, args, kwargs, real):
        a, b = args[0], arg(args, kwargs, 1, "other")
        if reverse:
            a, b = b, a
        if not isinstance(a, Value) and not isinstance(b, Value):
            raise Unhandled  # host arithmetic never reaches here (real is not a tensor)
        if kwargs.get("alpha", 1) != 1:
            raise Unhandled
        like = a if isinstance(a, Value) else b
        mode = kwargs.get("rounding_mode")  # torch.div's "floor" or "trunc" (None: true division)
        return cv.emit(op, [cv.as_value(a, like), cv.as_value(b, like)], {"rounding_mode": mode} if mode else None)

    return handler


for _op, _targets in {
    "add": [operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"],
    "sub": [operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__"],
    "mul": [operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__"],
    "div": [operator.truediv, operator.itruediv, torch.div, "div", "div_", "__truediv__"],
    "pow": [operator.pow, torch.pow, "pow"],
    "matmul": [operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"],
    "maximum": [torch.maximum], "minimum": [torch.minimum],
}.items():
    for _t in _targets:
        (METHODS if isinstance(_t, str) else FUNCTIONS)[_t] = _binary(_op)
METHODS["__radd__"] = _binary("add", reverse=True)
METHODS["__rmul__"] = _binary("mul", reverse=True)


def _host_or(handler: Handler) -> Handler:
    """Operators that also do int arithmetic on shapes: host values pass through, and a batch
    size times or divided by a constant stays a (scaled) batch size."""

    def wrapped(cv, args, kwargs, real):
        if not isinstance(real, torch.Tensor):
            return _batch_arithmetic(cv.current.target, args, real)
        if kwargs.get("rounding_mode") is not None:
            raise Unhandled
        return handler(cv, args, kwargs, real)

    return wrapped


def _batch_arithmetic(op: Any, args: tuple, real: Any) -> Any:
    if any(isinstance(a, SymDim) for a in args):  # sizes over the graph's symbols stay symbolic
        try:
            result = op(*args)
        except TypeError:
            raise Unhandled from None
        if result is NotImplemented or (isinstance(result, SymDim) and result.hint != real):
            raise Unhandled
        return result
    if len(args) != 2 or not isinstance(real, int):
        return real
    a, b = args
    if op is operator.mul and isinstance(a, BatchDim) and isinstance(b, int):
        return a.scaled(b)
    if op is operator.mul and isinstance(b, BatchDim) and isinstance(a, int):
        return b.scaled(a)
    if op is operator.floordiv and isinstance(a, BatchDim) and isinstance(b, int) and b > 0:
        return a.divided(b)
    return real


for _t in list(FUNCTIONS):
    if getattr(_t, "__module__", None) in ("_operator", "operator"):
        FUNCTIONS[_t] = _host_or(FUNCTIONS[_t])


def _compare(op: str):
    """Comparisons and logic on tensors (bool operands use the logical ops)."""
    plain = _binary(op)

    def handler(cv, args, kwargs, real):
        a, b = args[0], args[1]
        if op in ("bitwise_and", "bitwise_or", "bitwise_xor") and real.dtype == torch.bool:
            return _binary("logical" + op.removeprefix("bitwise"))(cv, args, kwargs, real)
        return plain(cv, (a, b), {}, real)

    return handler


for _t, _op in {operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.gt: "gt", operator.le: "le",
                operator.ge: "ge", operator.and_: "bitwise_and", operator.or_: "bitwise_or",
                operator.xor: "bitwise_xor", operator.mod: "remainder"}.items():
    FUNCTIONS[_t] = _host_or(_compare(_op))
    METHODS[f"__{_t.__name__.rstrip('_')}__"] = _compare(_op)


def _floordiv(cv, args, kwargs, real):
    a, b = args[0], args[1]
    like = a if isinstance(a, Value) else b
    return cv.emit("div", [cv.as_value(a, like), cv.as_value(b, like)], {"rounding_mode": "floor"})


FUNCTIONS[operator.floordiv] = _host_or(_floordiv)


@function(F.batch_norm)
def batch_norm_fn(cv, args, kwargs, real):
    """F.batch_norm as a subclass of nn.BatchNorm2d calls it (timm's BatchNormAct2d): the running
    statistics in eval mode make it a fixed per-channel affine map."""
    x, mean, var = tensor_arg(args[0]), arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    training, eps = arg(args, kwargs, 5, "training", False), arg(args, kwargs, 7, "eps", 1e-5)
    if training or not isinstance(mean, Value) or not isinstance(var, Value):
        raise Unhandled
    if w is None:
        w = cv.graph.add_constant(f"{cv.name}_weight", torch.ones(mean.shape, dtype=mean.dtype.torch))
    if b is None:
        b = cv.graph.add_constant(f"{cv.name}_bias", torch.zeros(mean.shape, dtype=mean.dtype.torch))
    momentum = arg(args, kwargs, 6, "momentum", 0.1)
    return cv.emit("batch_norm", [x, w, b, mean, var], {"eps": float(eps), "momentum": float(momentum or 0.1)})


@function(F.group_norm)
def group_norm_fn(cv, args, kwargs, real):
    attrs = {"num_groups": int(arg(args, kwargs, 1, "num_groups")), "eps": float(arg(args, kwargs, 4, "eps", 1e-5))}
    return cv.emit("group_norm", [tensor_arg(args[0]), arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")],
                   attrs)


def interpolate(cv, x: Value, real: torch.Tensor, mode: str, align_corners: Any, scale_factor: Any,
                recompute: Any, antialias: bool) -> Value:
    """F.interpolate as one resize op (torch's sizes and coordinate rules, kept as attributes)."""
    kinds = {"nearest": "nearest", "linear": "linear", "bilinear": "linear", "trilinear": "linear",
             "bicubic": "cubic"}
    if mode not in kinds or antialias:
        raise Unhandled  # nearest-exact, area, antialiased: decomposed instead
    attrs = {"mode": kinds[mode], "size": list(real.shape[2:])}
    if mode != "nearest":
        attrs["align_corners"] = bool(align_corners)
    if scale_factor is not None and not recompute:
        attrs["scales"] = [float(s) for s in ints(scale_factor, x.rank - 2)] if not isinstance(scale_factor, float) \
            else [float(scale_factor)] * (x.rank - 2)
    return cv.emit("resize", [x], attrs)


@function(F.interpolate, F.upsample)
def interpolate_fn(cv, args, kwargs, real):
    return interpolate(cv, tensor_arg(args[0]), real, arg(args, kwargs, 3, "mode", "nearest"),
                       arg(args, kwargs, 4, "align_corners"), arg(args, kwargs, 2, "scale_factor"),
                       arg(args, kwargs, 5, "recompute_scale_factor"), arg(args, kwargs, 6, "antialias", False))


@function(F.embedding)
def embedding_fn(cv, args, kwargs, real):
    if arg(args, kwargs, 3, "max_norm") is not None:
        raise Unhandled  # renormalizes the table in place
    return cv.emit("embedding", [tensor_arg(arg(args, kwargs, 1, "weight")), tensor_arg(args[0])])


@function(torch.flip)
@method("flip")
def flip_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    return cv.emit("flip", [x], {"dims": [int(d) % x.rank for d in sizes_arg(args, kwargs, "dims")]})


@function(torch.sort)
@method("sort")
def sort_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    return cv.emit("sort", [x], {"axis": arg(args, kwargs, 1, "dim", -1) % max(x.rank, 1),
                                 "descending": bool(arg(args, kwargs, 2, "descending", False))})


def roll(cv, x: Value, shifts: list[int], dims: list[int]) -> Value:
    """torch.roll; with no dims it rolls the flattened tensor, which keeps its shape."""
    if dims:
        return cv.emit("roll", [x], {"shifts": shifts, "dims": [d % x.rank for d in dims]})
    if x.rank == 0:
        raise Unhandled
    flat = x if x.rank == 1 else cv.emit("flatten", [x], {"start": 0, "end": x.rank - 1})
    rolled = cv.emit("roll", [flat], {"shifts": shifts, "dims": [0]})
    if x.rank == 1:
        return rolled
    return cv.emit("reshape", [rolled], {"shape": reshape_target(x, [x.dim(i) for i in range(x.rank)])})


@function(torch.roll)
@method("roll")
def roll_fn(cv, args, kwargs, real):
    dims = arg(args, kwargs, 2, "dims")
    return roll(cv, tensor_arg(args[0]), ints(arg(args, kwargs, 1, "shifts"), 1), [] if dims is None else ints(dims, 1))


@function(torch.cumsum)
@method("cumsum")
def cumsum_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    if arg(args, kwargs, 2, "dtype") is not None:
        raise Unhandled
    return cv.emit("cumsum", [x], {"axis": arg(args, kwargs, 1, "dim") % max(x.rank, 1)})


@function(torch.where)
@method("where")
def where_fn(cv, args, kwargs, real):
    if len(args) + len(kwargs) < 3:
        raise Unhandled  # the one-argument form is nonzero: data-dependent
    cond, a, b = (arg(args, kwargs, i, n) for i, n in enumerate(("condition", "input", "other")))
    if cv.current.op == "call_method":  # x.where(cond, other)
        a, cond = cond, a
    like = a if isinstance(a, Value) else b if isinstance(b, Value) else None
    if like is None or not isinstance(cond, Value):
        raise Unhandled
    return cv.emit("where", [cond, cv.as_value(a, like), cv.as_value(b, like)])


@function(torch.softmax, F.softmax)
@method("softmax")
def softmax_fn(cv, args, kwargs, real):
    dim = arg(args, kwargs, 1, "dim")
    if dim is None or real.dtype != tensor_arg(args[0]).dtype.torch:  # a dtype= conversion
        raise Unhandled
    return cv.emit("softmax", [tensor_arg(args[0])], {"axis": dim})


@function(F.scaled_dot_product_attention)
def sdpa_fn(cv, args, kwargs, real):
    """softmax(q @ k^T * scale) @ v over heads already split ([..., heads, L, dim]), as matmuls: the
    channel analysis then sees the head dims q and k share (as in swin's inlined attention). The
    scale is fixed at import, so pruning head dims keeps the arithmetic of the original."""
    q, k, v = (tensor_arg(arg(args, kwargs, i, n)) for i, n in enumerate(("query", "key", "value")))
    mask, dropout = arg(args, kwargs, 3, "attn_mask"), arg(args, kwargs, 4, "dropout_p", 0.0)
    causal, scale = arg(args, kwargs, 5, "is_causal", False), kwargs.get("scale")
    if dropout or kwargs.get("enable_gqa") or min(q.rank, k.rank, v.rank) < 2:
        raise Unhandled  # dropout (a functional call: it drops in eval mode too) stays opaque
    return attention(cv, q, k, v, mask, causal, scale)


def attention(cv, q: Value, k: Value, v: Value, mask: Any, causal: bool, scale: float | None) -> Value:
    """softmax(q @ k^T * scale + bias) @ v over heads already split ([..., heads, L, dim])."""
    bias = attention_bias(cv, mask, causal, q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    swap = list(range(k.rank))
    swap[-2], swap[-1] = swap[-1], swap[-2]
    scores = cv.emit("mul", [cv.emit("matmul", [q, cv.emit("permute", [k], {"perm": swap})]), cv.scalar(scale, q)])
    if bias is not None:
        scores = cv.emit("add", [scores, bias])
    probs = cv.emit("softmax", [scores], {"axis": -1})
    if bias is not None and not (bias.is_constant and not torch.isneginf(bias.const_value).all(-1).any()):
        # torch's attention is 0 for a query that attends to nothing (a left-padded prompt under a
        # causal mask), where softmax alone is NaN, which the cache would spread to every later token
        peak = cv.emit("amax", [scores], {"axes": [scores.rank - 1], "keepdim": True})
        dead = cv.emit("eq", [peak, cv.scalar(float("-inf"), scores)])
        probs = cv.emit("where", [dead, cv.scalar(0.0, scores), probs])
    return cv.emit("matmul", [probs, v])


def attention_bias(cv, mask: Any, causal: bool, q: Value, k: Value) -> Value | None:
    """sdpa's mask as an additive bias: a float mask as it is; a boolean one as 0 (attend) and -inf
    (masked), as torch computes it: a constant when the mask is, else a where() on the mask."""
    bias = None
    if causal:
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        bias = cv.graph.add_constant(f"{cv.name}_causal", torch.zeros(tril.shape, dtype=q.dtype.torch)
                                     .masked_fill(~tril, float("-inf")))
    if mask is None:
        return bias
    if isinstance(mask, torch.Tensor):
        mask = cv.graph.add_constant(f"{cv.name}_mask", mask.detach().clone())
    if not isinstance(mask, Value):
        raise Unhandled
    if mask.dtype == DType.bool and mask.is_constant:
        mask = cv.graph.add_constant(f"{cv.name}_bias", torch.zeros(mask.shape, dtype=q.dtype.torch)
                                     .masked_fill(~mask.const_value, float("-inf")))
    elif mask.dtype == DType.bool:
        zero = cv.graph.add_constant(f"{cv.name}_attend", torch.tensor(0.0, dtype=q.dtype.torch))
        masked = cv.graph.add_constant(f"{cv.name}_masked", torch.tensor(float("-inf"), dtype=q.dtype.torch))
        mask = cv.emit("where", [mask, zero, masked], name=f"{cv.name}_bias")
    elif not mask.dtype.is_float:
        raise Unhandled
    return mask if bias is None else cv.emit("add", [bias, mask], name=f"{cv.name}_bias")


@function(F.log_softmax, torch.log_softmax)
@method("log_softmax")
def log_softmax_fn(cv, args, kwargs, real):
    dim = arg(args, kwargs, 1, "dim")
    if dim is None:
        raise Unhandled
    return cv.emit("log_softmax", [tensor_arg(args[0])], {"axis": dim})


# ============================================================================ layers as functions
@function(F.linear)
def linear_fn(cv, args, kwargs, real):
    return cv.emit("linear", [tensor_arg(args[0]), tensor_arg(arg(args, kwargs, 1, "weight")),
                              arg(args, kwargs, 2, "bias")])


@function(F.conv1d, F.conv2d, F.conv3d)
def conv_fn(cv, args, kwargs, real):
    x, w = tensor_arg(args[0]), tensor_arg(arg(args, kwargs, 1, "weight"))
    b = arg(args, kwargs, 2, "bias")
    attrs = conv_attrs(arg(args, kwargs, 3, "stride", 1), arg(args, kwargs, 4, "padding", 0),
                       arg(args, kwargs, 5, "dilation", 1), arg(args, kwargs, 6, "groups", 1), w, x.rank - 2)
    return cv.emit("conv", [x, w, b], attrs)


@function(F.layer_norm)
def layer_norm_fn(cv, args, kwargs, real):
    shape = list(concrete(arg(args, kwargs, 1, "normalized_shape")))
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    return cv.emit("layer_norm", [tensor_arg(args[0]), w, b],
                   {"normalized_shape": shape, "eps": float(arg(args, kwargs, 4, "eps", 1e-5))})


@function(F.max_pool1d, F.max_pool2d, F.max_pool3d)
def max_pool_fn(cv, args, kwargs, real):
    if arg(args, kwargs, 6, "return_indices", False):
        raise Unhandled
    return max_pool(cv, tensor_arg(args[0]), arg(args, kwargs, 1, "kernel_size"), arg(args, kwargs, 2, "stride"),
                    arg(args, kwargs, 3, "padding", 0), arg(args, kwargs, 4, "dilation", 1),
                    arg(args, kwargs, 5, "ceil_mode", False))


@function(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def avg_pool_fn(cv, args, kwargs, real):
    if arg(args, kwargs, 6, "divisor_override") is not None:
        raise Unhandled
    return avg_pool(cv, tensor_arg(args[0]), arg(args, kwargs, 1, "kernel_size"), arg(args, kwargs, 2, "stride"),
                    arg(args, kwargs, 3, "padding", 0), arg(args, kwargs, 4, "ceil_mode", False),
                    arg(args, kwargs, 5, "count_include_pad", True))


@function(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def adaptive_avg_fn(cv, args, kwargs, real):
    return adaptive("adaptive_avg_pool", cv, tensor_arg(args[0]), arg(args, kwargs, 1, "output_size"))


@function(F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
def adaptive_max_fn(cv, args, kwargs, real):
    if arg(args, kwargs, 2, "return_indices", False):
        raise Unhandled
    return adaptive("adaptive_max_pool", cv, tensor_arg(args[0]), arg(args, kwargs, 1, "output_size"))


@function(F.pad)
def pad_fn(cv, args, kwargs, real):
    value = arg(args, kwargs, 3, "value", 0.0)
    return cv.emit("pad", [tensor_arg(args[0])], {"pads": ints(arg(args, kwargs, 1, "pad"), 0),
                                                  "mode": arg(args, kwargs, 2, "mode", "constant"),
                                                  "value": float(value or 0.0)})


try:
    from torchvision.ops.stochastic_depth import stochastic_depth as _tv_stochastic_depth

    @function(_tv_stochastic_depth)
    def stochastic_depth_fn(cv, args, kwargs, real):
        return cv.emit("stochastic_depth", [tensor_arg(args[0])],
                       {"p": float(arg(args, kwargs, 1, "p")), "mode": arg(args, kwargs, 2, "mode")})
except ImportError:  # torchvision is optional
    pass


# ============================================================================ shapes and indexing
@function(getattr)
def getattr_fn(cv, args, kwargs, real):
    obj, attr = args[0], args[1]
    if isinstance(obj, Value) and attr == "shape":
        return _shape_of(obj)
    if isinstance(obj, Value) and attr in ("dtype", "device", "ndim", "is_cuda"):
        return real
    raise Unhandled


def _shape_of(x: Value) -> tuple:
    """x's sizes as the model reads them: symbolic dims as SymDims; without any, the batch (dim 0)
    as a BatchDim."""
    if x.sym:
        return tuple(x.dim(a) for a in range(x.rank))
    dims = list(x.shape)
    if dims and not x.is_constant:
        dims[0] = BatchDim(dims[0], x)
    return tuple(dims)


@method("size")
def size_method(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    dim = arg(args, kwargs, 1, "dim")
    shape = _shape_of(x)
    return shape if dim is None else shape[dim]


@method("dim")
def dim_method(cv, args, kwargs, real):
    return real


@function(torch._assert)
def assert_fn(cv, args, kwargs, real):
    return None  # checked on the example inputs at trace time


@function(operator.getitem)
def getitem_fn(cv, args, kwargs, real):
    obj, index = args[0], args[1]
    if not isinstance(obj, Value):
        if isinstance(obj, (tuple, list)):
            return obj[index]
        raise Unhandled
    return index_tensor(cv, obj, index if isinstance(index, tuple) else (index,))


def index_tensor(cv, x: Value, index: tuple) -> Value:
    """Basic indexing (ints, slices, None, Ellipsis) as slice / select / unsqueeze nodes."""
    if any(isinstance(i, (Value, list, torch.Tensor)) for i in index):
        return gather_index(cv, x, index)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (x.rank - n_real)
        else:
            expanded.append(i)
    axes, starts, ends, steps = [], [], [], []
    selects, unsqueezes = [], []
    axis = out_axis = 0
    for i in expanded:
        if i is None:
            unsqueezes.append(out_axis)
            out_axis += 1
            continue
        if isinstance(i, slice):
            start, stop, step = concrete(i.start), concrete(i.stop), concrete(i.step)
            if (start, stop, step) != (None, None, None):
                size = x.shape[axis]
                s, e, st = slice(start, stop, step).indices(size)
                axes.append(axis)
                starts.append(s)
                ends.append(e)
                steps.append(st)
            out_axis += 1
        else:
            selects.append((axis, int(concrete(i))))
        axis += 1
    y = x
    if axes:
        y = cv.emit("slice", [y], {"axes": axes, "starts": starts, "ends": ends, "steps": steps})
    for axis, idx in reversed(selects):
        y = cv.emit("select", [y], {"axis": axis, "index": idx})
    if unsqueezes:
        y = cv.emit("unsqueeze", [y], {"axes": unsqueezes})
    if y is x:
        y = cv.emit("identity", [x])
    return y


def gather_index(cv, x: Value, index: tuple) -> Value:
    """x[:, ..., idx] with one constant 1-D integer index after whole-dim slices: a gather (a
    relative-position table read through an index buffer stays a trainable table this way)."""
    whole = slice(None)
    entries = list(index)
    while entries and entries[-1] == whole:  # trailing whole dims: untouched
        entries.pop()
    if not entries or len(entries) > x.rank or any(i != whole for i in entries[:-1]):
        raise Unhandled
    idx = entries[-1]
    if isinstance(idx, Value):
        if not idx.is_constant:
            raise Unhandled
        idx = idx.const_value
    if not isinstance(idx, (torch.Tensor, list)):
        raise Unhandled
    idx = torch.as_tensor(idx)
    if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise Unhandled
    axis = len(entries) - 1
    if x.sym and x.sym[axis] is not None:  # a negative index counts from a size known at run time only
        return cv.emit("take", [x, cv.graph.add_constant(f"{cv.name}_indices", idx.long())], {"axis": axis})
    return cv.emit("gather", [x], {"axis": axis, "indices": [int(i) % x.shape[axis] for i in idx.tolist()]})


def reshape_target(x: Value, shape: Any) -> list:
    """Target dims for reshape: the batch stays symbolic when it is dim 0 of both."""
    if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)):
        shape = shape[0]
    def keeps_batch(i: int, d: Any) -> bool:  # "N": the input's own leading dim
        return i == 0 and d.factor == 1 and x.shape[0] == d.value and not x.is_constant

    out: list = []
    symbolic = [i for i, d in enumerate(shape) if isinstance(d, BatchDim) and not keeps_batch(i, d)]
    for i, d in enumerate(shape):
        if isinstance(d, Value):
            raise Unhandled
        if isinstance(d, SymDim):
            out.append(d)
        elif isinstance(d, BatchDim) and keeps_batch(i, d):
            out.append(BATCH)
        elif isinstance(d, BatchDim) and symbolic == [i] and -1 not in shape and not x.is_constant:
            out.append(-1)  # a multiple of the batch: the one dim reshape infers
        else:
            out.append(int(concrete(d)))
    symbolic = any(isinstance(d, SymDim) for d in out) or any(e is not None for e in x.sym or ())
    if -1 in out and BATCH not in out and symbolic:
        # torch.export spells one reshape two ways: view keeps the -1, reshape's decomposition (of an input
        # that is not contiguous) writes the traced size. One form: the size, where no symbol moves it.
        numel = math.prod((x.dim(i) for i in range(x.rank)), start=1)
        known = math.prod((d for d in out if d != -1), start=1)
        size = numel // known if known != 0 else None
        out = [size if d == -1 and isinstance(size, int) else d for d in out]
    return out


@method("view", "reshape")
@function(torch.reshape)
def reshape_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    shape = args[1:] if len(args) > 1 else (kwargs.get("shape"),)
    return cv.emit("reshape", [x], {"shape": reshape_target(x, shape)})


@method("view_as", "reshape_as")
def reshape_as(cv, args, kwargs, real):
    x, other = tensor_arg(args[0]), tensor_arg(args[1])
    return cv.emit("reshape", [x], {"shape": reshape_target(x, _shape_of(other))})



@function(torch.flatten)
@method("flatten")
def flatten_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    start, end = arg(args, kwargs, 1, "start_dim", 0), arg(args, kwargs, 2, "end_dim", -1)
    if x.rank == 0:
        raise Unhandled
    return cv.emit("flatten", [x], {"start": start % x.rank, "end": end % x.rank})


@function(torch.permute)
@method("permute")
def permute_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    return cv.emit("permute", [x], {"perm": [int(p) % x.rank for p in sizes_arg(args, kwargs, "dims")]})


@function(torch.transpose)
@method("transpose")
def transpose_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    d0, d1 = arg(args, kwargs, 1, "dim0") % x.rank, arg(args, kwargs, 2, "dim1") % x.rank
    perm = list(range(x.rank))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return cv.emit("permute", [x], {"perm": perm})


@method("t")
def t_method(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    return cv.emit("permute", [x], {"perm": list(reversed(range(x.rank)))})


@function(torch.squeeze)
@method("squeeze")
def squeeze_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    dim = arg(args, kwargs, 1, "dim")
    axes = [a for a in range(x.rank) if x.shape[a] == 1] if dim is None else ints(dim, 1)
    axes = [a % x.rank for a in axes if x.shape[a % x.rank] == 1]
    return cv.emit("squeeze", [x], {"axes": axes}) if axes else cv.emit("identity", [x])


@function(torch.unsqueeze)
@method("unsqueeze")
def unsqueeze_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    return cv.emit("unsqueeze", [x], {"axes": [arg(args, kwargs, 1, "dim") % (x.rank + 1)]})


@function(torch.cat, torch.concat, torch.concatenate)
def cat_fn(cv, args, kwargs, real):
    tensors = arg(args, kwargs, 0, "tensors")
    if not all(isinstance(t, Value) for t in tensors):
        raise Unhandled
    axis = arg(args, kwargs, 1, "dim", 0)
    return cv.emit("concat", list(tensors), {"axis": axis % tensors[0].rank})


@function(torch.stack)
def stack_fn(cv, args, kwargs, real):
    tensors = arg(args, kwargs, 0, "tensors")
    if not all(isinstance(t, Value) for t in tensors):
        raise Unhandled
    axis = arg(args, kwargs, 1, "dim", 0) % (tensors[0].rank + 1)
    parts = [cv.emit("unsqueeze", [t], {"axes": [axis]}, name=f"{cv.name}_unsqueeze") for t in tensors]
    return cv.emit("concat", parts, {"axis": axis})


def split_outputs(cv, x: Value, sizes: list[int], axis: int) -> tuple:
    outs = cv.emit("split", [x], {"axis": axis % x.rank, "sizes": sizes})
    return outs if isinstance(outs, tuple) else (outs,)


@function(torch.split)
@method("split")
def split_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    axis = arg(args, kwargs, 2, "dim", 0)
    return split_outputs(cv, x, [t.shape[axis] for t in real], axis)


@function(torch.chunk)
@method("chunk")
def chunk_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    axis = arg(args, kwargs, 2, "dim", 0)
    return split_outputs(cv, x, [t.shape[axis] for t in real], axis)


@function(torch.unbind)
@method("unbind")
def unbind_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    axis = arg(args, kwargs, 1, "dim", 0) % x.rank
    parts = split_outputs(cv, x, [1] * x.shape[axis], axis)
    return tuple(cv.emit("squeeze", [p], {"axes": [axis]}, name=f"{cv.name}_squeeze") for p in parts)


@method("expand")
def expand_method(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    sizes = args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = sizes[0]
    batch = [s for s in sizes if isinstance(s, BatchDim)]
    shape = [BATCH if isinstance(s, BatchDim) else int(concrete(s)) for s in sizes]
    if batch and shape.index(BATCH) == 0 and len(batch) == 1:
        return cv.emit("expand_batch", [x, batch[0].source], {"shape": shape})
    return cv.emit("expand", [x], {"shape": [int(concrete(s)) for s in sizes]})


def _reduce(op: str):
    def handler(cv, args, kwargs, real):
        x = tensor_arg(args[0])
        dim = arg(args, kwargs, 1, "dim")
        if arg(args, kwargs, 3, "dtype") is not None:
            raise Unhandled
        axes = list(range(x.rank)) if dim is None else [d % x.rank for d in ints(dim, 1)]
        return cv.emit(op, [x], {"axes": axes, "keepdim": bool(arg(args, kwargs, 2, "keepdim", False))})

    return handler


FUNCTIONS[torch.mean] = METHODS["mean"] = _reduce("mean")
FUNCTIONS[torch.sum] = METHODS["sum"] = _reduce("sum")
