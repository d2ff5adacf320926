"""Handlers mapping torch calls (modules, functions, tensor methods, aten ops) to canonical IR ops.

Each handler gets the converter, the call's IR-side args/kwargs (Values, Python values,
BatchDims) and torch's concrete result; it returns the IR-side result or raises Unhandled,
which makes the call an opaque node.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimgraph.frontends.pytorch import BatchDim, Unhandled, concrete
from slimgraph.ir import Value
from slimgraph.ir.opdefs.shape import BATCH

Handler = Callable[..., Any]
MODULES: dict[type, Handler] = {}
FUNCTIONS: dict[Any, Handler] = {}
METHODS: dict[str, Handler] = {}


def find_handler(kind: str, target: Any) -> Handler | None:
    if kind == "call_module":
        return MODULES.get(type(target))
    if kind == "call_method":
        return METHODS.get(target)
    try:
        return FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


def module(*types: type):
    def deco(fn: Handler) -> Handler:
        for t in types:
            MODULES[t] = fn
        return fn

    return deco


def function(*targets: Any):
    def deco(fn: Handler) -> Handler:
        for t in targets:
            FUNCTIONS[t] = fn
        return fn

    return deco


def method(*names: str):
    def deco(fn: Handler) -> Handler:
        for n in names:
            METHODS[n] = fn
        return fn

    return deco


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def tensor_arg(x: Any) -> Value:
    if not isinstance(x, Value):
        raise Unhandled
    return x


def ints(x: Any, n: int) -> list[int]:
    x = concrete(x)
    return list(x) if isinstance(x, (list, tuple)) else [x] * n


def pads_from(padding: Any, n: int) -> list[int]:
    p = ints(padding, n)
    return p + p


# ============================================================================ modules
def _module_params(cv, mod: nn.Module, names: list[str], path: str | None = None) -> list[Value | None]:
    path = path or cv.module_path()
    out = []
    for n in names:
        t = getattr(mod, n, None)
        out.append(None if t is None else cv.constant(t, f"{path}.{n}"))
    return out


@module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(cv, args, kwargs, real):
    mod = cv.gm.get_submodule(cv.current.target)
    if mod.padding_mode != "zeros":
        raise Unhandled
    x = tensor_arg(args[0])
    nd = x.rank - 2
    w, b = _module_params(cv, mod, ["weight", "bias"])
    return cv.emit("conv", [x, w, b], conv_attrs(mod.stride, mod.padding, mod.dilation, mod.groups, w, nd))


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


@module(nn.Linear)
def linear_module(cv, args, kwargs, real):
    mod = cv.gm.get_submodule(cv.current.target)
    w, b = _module_params(cv, mod, ["weight", "bias"])
    return cv.emit("linear", [tensor_arg(args[0]), w, b])


@module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm_module(cv, args, kwargs, real):
    mod = cv.gm.get_submodule(cv.current.target)
    if mod.running_mean is None:  # batch statistics even at inference: not a fixed affine map
        raise Unhandled
    w, b, m, v = _module_params(cv, mod, ["weight", "bias", "running_mean", "running_var"])
    if w is None:
        w = cv.constant(torch.ones_like(mod.running_mean), f"{cv.module_path()}.weight")
        b = cv.constant(torch.zeros_like(mod.running_mean), f"{cv.module_path()}.bias")
    momentum = mod.momentum if mod.momentum is not None else 0.1
    attrs = {"eps": float(mod.eps), "momentum": float(momentum)}
    return cv.emit("batch_norm", [tensor_arg(args[0]), w, b, m, v], attrs)


@module(nn.LayerNorm)
def layer_norm_module(cv, args, kwargs, real):
    mod = cv.gm.get_submodule(cv.current.target)
    w, b = _module_params(cv, mod, ["weight", "bias"])
    return cv.emit("layer_norm", [tensor_arg(args[0]), w, b],
                   {"normalized_shape": list(mod.normalized_shape), "eps": float(mod.eps)})


@module(nn.GroupNorm)
def group_norm_module(cv, args, kwargs, real):
    mod = cv.gm.get_submodule(cv.current.target)
    w, b = _module_params(cv, mod, ["weight", "bias"])
    return cv.emit("group_norm", [tensor_arg(args[0]), w, b], {"num_groups": mod.num_groups, "eps": float(mod.eps)})


def _simple_module(op: str, attrs: Callable[[nn.Module], dict] = lambda m: {}):
    def handler(cv, args, kwargs, real):
        mod = cv.gm.get_submodule(cv.current.target)
        return cv.emit(op, [tensor_arg(args[0])], attrs(mod))

    return handler


MODULES.update({
    nn.ReLU: _simple_module("relu"),
    nn.ReLU6: _simple_module("clip", lambda m: {"min": 0.0, "max": 6.0}),
    nn.Hardtanh: _simple_module("clip", lambda m: {"min": float(m.min_val), "max": float(m.max_val)}),
    nn.Sigmoid: _simple_module("sigmoid"),
    nn.Tanh: _simple_module("tanh"),
    nn.GELU: _simple_module("gelu", lambda m: {"approximate": m.approximate}),
    nn.SiLU: _simple_module("silu"),
    nn.Hardswish: _simple_module("hardswish"),
    nn.Hardsigmoid: _simple_module("hardsigmoid"),
    nn.LeakyReLU: _simple_module("leaky_relu", lambda m: {"negative_slope": float(m.negative_slope)}),
    nn.ELU: _simple_module("elu", lambda m: {"alpha": float(m.alpha)}),
    nn.Identity: _simple_module("identity"),
    nn.Softmax: _simple_module("softmax", lambda m: {"axis": m.dim}),
    nn.LogSoftmax: _simple_module("log_softmax", lambda m: {"axis": m.dim}),
    nn.Dropout: _simple_module("dropout", lambda m: {"p": float(m.p)}),
    nn.Dropout1d: _simple_module("dropout", lambda m: {"p": float(m.p), "channelwise": True}),
    nn.Dropout2d: _simple_module("dropout", lambda m: {"p": float(m.p), "channelwise": True}),
    nn.LocalResponseNorm: _simple_module(
        "lrn", lambda m: {"size": m.size, "alpha": float(m.alpha), "beta": float(m.beta), "k": float(m.k)}),
})


@module(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def max_pool_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    if m.return_indices:
        raise Unhandled
    return max_pool(cv, tensor_arg(args[0]), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def max_pool(cv, x: Value, kernel, stride, padding, dilation, ceil_mode):
    nd = x.rank - 2
    stride = stride if stride not in (None, []) else kernel
    return cv.emit("max_pool", [x], {"kernel": ints(kernel, nd), "stride": ints(stride, nd),
                                     "pads": pads_from(padding, nd), "dilation": ints(dilation, nd),
                                     "ceil_mode": bool(ceil_mode)})


@module(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def avg_pool_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    if getattr(m, "divisor_override", None):
        raise Unhandled
    return avg_pool(cv, tensor_arg(args[0]), m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)


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


@module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def adaptive_avg_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    return adaptive("adaptive_avg_pool", cv, tensor_arg(args[0]), m.output_size)


@module(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def adaptive_max_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    if m.return_indices:
        raise Unhandled
    return adaptive("adaptive_max_pool", cv, tensor_arg(args[0]), m.output_size)


def _in_projection(cv, m: nn.MultiheadAttention, i: int, path: str) -> list[Value | None]:
    """Rows i*E:(i+1)*E of the packed in-projection, as the weight and bias of a linear (cached
    per parameter, so a module called twice keeps one copy; the parameter outlives the cache)."""
    rows = slice(i * m.embed_dim, (i + 1) * m.embed_dim)
    values = []
    for kind in ("weight", "bias"):
        packed = getattr(m, f"in_proj_{kind}")
        if packed is None:
            values.append(None)
            continue
        key = (id(packed), i)
        if key not in cv.const_cache:
            cv.const_cache[key] = cv.graph.add_constant(f"{path}.{'qkv'[i]}_proj.{kind}", packed.detach()[rows].clone(),
                                                        trainable=id(packed) in cv.params)
        values.append(cv.const_cache[key])
    return values


@module(nn.MultiheadAttention)
def mha_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    q, k, v = (tensor_arg(arg(args, kwargs, i, n)) for i, n in enumerate(["query", "key", "value"]))
    extras = {n: arg(args, kwargs, i, n) for i, n in
              [(3, "key_padding_mask"), (5, "attn_mask"), (6, "average_attn_weights"), (7, "is_causal")]}
    need_weights = arg(args, kwargs, 4, "need_weights", True)
    if (not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn or need_weights
            or extras["key_padding_mask"] is not None or extras["attn_mask"] is not None or extras["is_causal"]):
        raise Unhandled
    path = cv.module_path()
    if not m.batch_first:  # [L, B, E] -> [B, L, E]: the attention op wants batch first
        moved: dict[int, Value] = {}
        for t in (q, k, v):  # self-attention: one permute for the shared input
            if id(t) not in moved:
                moved[id(t)] = cv.emit("permute", [t], {"perm": [1, 0, 2]})
        q, k, v = (moved[id(t)] for t in (q, k, v))
    projected = [cv.emit("linear", [t, *_in_projection(cv, m, i, path)], name=f"{cv.name}_{'qkv'[i]}_proj")
                 for i, t in enumerate((q, k, v))]
    head_dim = m.embed_dim // m.num_heads
    context = cv.emit("attention", projected, {"num_heads": m.num_heads, "scale": 1.0 / math.sqrt(head_dim),
                                               "dropout": float(m.dropout)}, name=f"{cv.name}_attention")
    w_out, b_out = _module_params(cv, m.out_proj, ["weight", "bias"], f"{path}.out_proj")
    y = cv.emit("linear", [context, w_out, b_out], name=f"{cv.name}_out_proj")
    if not m.batch_first:
        y = cv.emit("permute", [y], {"perm": [1, 0, 2]})
    return (y, None)


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
        return cv.emit(op, [cv.as_value(a, like), cv.as_value(b, like)])

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
def _tensor_unhandled(cv, args, kwargs, real):
    raise Unhandled


for _t in (operator.floordiv, operator.mod, operator.eq, operator.ne, operator.lt, operator.gt,
           operator.le, operator.ge):
    FUNCTIONS[_t] = _host_or(_tensor_unhandled)


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
    bias = _attention_bias(cv, mask, causal, q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    swap = list(range(k.rank))
    swap[-2], swap[-1] = swap[-1], swap[-2]
    scores = cv.emit("mul", [cv.emit("matmul", [q, cv.emit("permute", [k], {"perm": swap})]), cv.scalar(scale, q)])
    if bias is not None:
        scores = cv.emit("add", [scores, bias])
    return cv.emit("matmul", [cv.emit("softmax", [scores], {"axis": -1}), v])


def _attention_bias(cv, mask: Any, causal: bool, q: Value, k: Value) -> Value | None:
    """sdpa's mask as an additive bias: a float mask as it is; a boolean one, or is_causal, as a
    constant of 0 (attend) and -inf (masked), as torch computes it."""
    if causal:
        if mask is not None:
            raise Unhandled
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    elif isinstance(mask, Value) and mask.is_constant:
        mask = mask.const_value
    if mask is None or (isinstance(mask, Value) and mask.dtype.is_float):
        return mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise Unhandled
    bias = torch.zeros(mask.shape, dtype=q.dtype.torch).masked_fill(~mask, float("-inf"))
    return cv.graph.add_constant(f"{cv.name}_mask", bias)


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
        if isinstance(d, BatchDim) and keeps_batch(i, d):
            out.append(BATCH)
        elif isinstance(d, BatchDim) and symbolic == [i] and -1 not in shape and not x.is_constant:
            out.append(-1)  # a multiple of the batch: the one dim reshape infers
        else:
            out.append(int(concrete(d)))
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


@module(nn.Flatten)
def flatten_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    return flatten_fn(cv, (args[0], m.start_dim, m.end_dim), {}, real)


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
    perm = args[1:] if len(args) > 1 else (kwargs.get("dims"),)
    if len(perm) == 1 and isinstance(perm[0], (list, tuple)):
        perm = perm[0]
    return cv.emit("permute", [x], {"perm": [int(p) % x.rank for p in perm]})


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


def _split(cv, x: Value, sizes: list[int], axis: int) -> tuple:
    outs = cv.emit("split", [x], {"axis": axis % x.rank, "sizes": sizes})
    return outs if isinstance(outs, tuple) else (outs,)


@function(torch.split)
@method("split")
def split_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    axis = arg(args, kwargs, 2, "dim", 0)
    return _split(cv, x, [t.shape[axis] for t in real], axis)


@function(torch.chunk)
@method("chunk")
def chunk_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    axis = arg(args, kwargs, 2, "dim", 0)
    return _split(cv, x, [t.shape[axis] for t in real], axis)


@function(torch.unbind)
@method("unbind")
def unbind_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    axis = arg(args, kwargs, 1, "dim", 0) % x.rank
    parts = _split(cv, x, [1] * x.shape[axis], axis)
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


# ============================================================================ aten ops (torch.export)
def _aten(*names: str) -> list:
    """OpOverloads by "name.overload", skipping ones this torch does not have."""
    found = []
    for full in names:
        name, _, overload = full.partition(".")
        packet = getattr(torch.ops.aten, name, None)
        op = getattr(packet, overload or "default", None) if packet is not None else None
        if op is not None:
            found.append(op)
    return found


def _alias(handler: Handler, *names: str) -> None:
    for op in _aten(*names):
        FUNCTIONS[op] = handler


_alias(conv_fn, "conv1d", "conv2d", "conv3d")
_alias(linear_fn, "linear")
_alias(FUNCTIONS[F.relu], "relu", "relu_")
_alias(FUNCTIONS[torch.sigmoid], "sigmoid", "sigmoid_")
_alias(FUNCTIONS[torch.tanh], "tanh")
_alias(FUNCTIONS[F.silu], "silu", "silu_")
_alias(FUNCTIONS[F.hardswish], "hardswish", "hardswish_")
_alias(FUNCTIONS[F.hardsigmoid], "hardsigmoid", "hardsigmoid_")
_alias(FUNCTIONS[F.gelu], "gelu")
_alias(FUNCTIONS[F.hardtanh], "hardtanh", "hardtanh_")
_alias(_binary("add"), "add.Tensor", "add_.Tensor")
_alias(_binary("sub"), "sub.Tensor")
_alias(_binary("mul"), "mul.Tensor", "mul_.Tensor")
_alias(_binary("div"), "div.Tensor")
_alias(_binary("matmul"), "matmul", "bmm")
_alias(max_pool_fn, "max_pool1d", "max_pool2d", "max_pool3d")
_alias(avg_pool_fn, "avg_pool1d", "avg_pool2d", "avg_pool3d")
_alias(adaptive_avg_fn, "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
_alias(_reduce("mean"), "mean.dim")
_alias(_reduce("sum"), "sum.dim_IntList")
_alias(flatten_fn, "flatten.using_ints")
_alias(reshape_fn, "view", "reshape", "_unsafe_view")
_alias(cat_fn, "cat")
_alias(permute_fn, "permute")
_alias(transpose_fn, "transpose.int")
_alias(t_method, "t")
_alias(softmax_fn, "softmax.int", "_softmax")
_alias(sdpa_fn, "scaled_dot_product_attention")
_alias(layer_norm_fn, "layer_norm")
_alias(dropout_fn, "dropout")
_alias(_unary("identity"), "clone", "contiguous", "detach", "alias")
_alias(unsqueeze_fn, "unsqueeze")
_alias(squeeze_fn, "squeeze.dim", "squeeze.dims")


def _aten_batch_norm(training_index: int, eps_index: int, momentum_index: int, returns_tuple: bool):
    def handler(cv, args, kwargs, real):
        if training_index >= 0 and args[training_index]:
            raise Unhandled
        x, w, b, m, v = (args[i] for i in range(5))
        if not all(isinstance(t, Value) for t in (w, b, m, v)):
            raise Unhandled
        y = cv.emit("batch_norm", [tensor_arg(x), w, b, m, v],
                    {"eps": float(args[eps_index]), "momentum": float(args[momentum_index] or 0.1)})
        return (y, None, None) if returns_tuple else y

    return handler


_alias(_aten_batch_norm(5, 7, 6, False), "batch_norm")
_alias(_aten_batch_norm(-1, 6, 5, True), "_native_batch_norm_legit_no_training")


def _aten_select(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    return cv.emit("select", [x], {"axis": args[1] % x.rank, "index": int(args[2]) % x.shape[args[1]]})


def _aten_slice(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    dim = arg(args, kwargs, 1, "dim", 0) % x.rank
    end = arg(args, kwargs, 3, "end")
    if isinstance(end, BatchDim) and end.value >= x.shape[dim]:
        end = None  # up to a batch size that is the whole dim: to the end, at any batch
    start, step = concrete(arg(args, kwargs, 2, "start")), concrete(arg(args, kwargs, 4, "step", 1))
    if (start or 0) == 0 and step == 1 and (end is None or concrete(end) >= x.shape[dim]):
        return cv.emit("identity", [x])  # the whole dim (at any batch size): nothing to slice
    s, e, st = slice(start, concrete(end), step).indices(x.shape[dim])
    return cv.emit("slice", [x], {"axes": [dim], "starts": [s], "ends": [e], "steps": [st]})


def _aten_index(cv, args, kwargs, real):  # x[idx]: a list with None for the dims not indexed
    return gather_index(cv, tensor_arg(args[0]), tuple(slice(None) if i is None else i for i in args[1]))


_alias(_aten_index, "index.Tensor")
_alias(_aten_select, "select.int")
_alias(_aten_slice, "slice.Tensor")


@function(torch.roll)
@method("roll")
def roll_fn(cv, args, kwargs, real):
    x = tensor_arg(args[0])
    shifts, dims = arg(args, kwargs, 1, "shifts"), arg(args, kwargs, 2, "dims")
    if dims is None or dims == []:
        raise Unhandled  # a roll of the flattened tensor
    shifts, dims = ints(shifts, 1), ints(dims, 1)
    return cv.emit("roll", [x], {"shifts": shifts, "dims": [d % x.rank for d in dims]})


_alias(roll_fn, "roll")
_alias(pad_fn, "pad", "constant_pad_nd")


def _aten_sym_size(cv, args, kwargs, real):
    x, dim = args[0], args[1]
    if isinstance(x, Value) and dim % x.rank == 0 and not x.is_constant:
        return BatchDim(int(real), x)
    return int(real)


_alias(_aten_sym_size, "sym_size.int")
