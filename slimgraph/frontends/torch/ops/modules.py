"""Handlers for torch.nn modules that torch.fx keeps as leaf calls, by exact class: a subclass with
a forward of its own is traced into instead, so it imports as what it computes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from slimgraph.frontends.torch.ops.functions import (
    adaptive,
    avg_pool,
    conv_attrs,
    flatten_fn,
    interpolate,
    max_pool,
)
from slimgraph.frontends.torch.ops.registry import MODULES, Unhandled, arg, module, tensor_arg
from slimgraph.ir import DType, Value


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


@module(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def avg_pool_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    if getattr(m, "divisor_override", None):
        raise Unhandled
    return avg_pool(cv, tensor_arg(args[0]), m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)


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


def _mha_mask(cv, m: nn.MultiheadAttention, key_padding_mask, attn_mask, like: Value) -> Value | None:
    """nn.MultiheadAttention's masks as the attention op's one mask. True in its boolean masks means
    *masked* (the opposite of scaled_dot_product_attention's attn_mask); float masks are added.
    key_padding_mask [batch, seq_k] becomes [batch, 1, 1, seq_k]; attn_mask [seq_q, seq_k] stays,
    [batch * heads, seq_q, seq_k] becomes [batch, heads, seq_q, seq_k]. One boolean mask becomes a
    keep-mask; two masks are summed as float masks (-inf where masked), as torch merges them. Masks
    of another dtype or rank stay opaque (Unhandled)."""
    parts = []
    for mask, padding in ((key_padding_mask, True), (attn_mask, False)):
        if mask is None:
            continue
        value = cv.as_value(mask)
        if value.dtype not in (DType.bool, like.dtype) or value.rank not in ((2,) if padding else (2, 3)):
            raise Unhandled
        if padding:
            value = cv.emit("unsqueeze", [value], {"axes": [1, 2]}, name=f"{cv.name}_key_padding")
        elif value.rank == 3:
            value = cv.emit("reshape", [value], {"shape": [-1, m.num_heads, value.dim(1), value.dim(2)]},
                            name=f"{cv.name}_attn_mask")
        parts.append(value)
    if not parts:
        return None
    if len(parts) == 1 and parts[0].dtype == DType.bool:
        return cv.emit("logical_not", parts, name=f"{cv.name}_keep")
    floats = []
    for value in parts:
        if value.dtype == DType.bool:
            masked = cv.graph.add_constant(f"{cv.name}_masked", torch.tensor(float("-inf"), dtype=like.dtype.torch))
            attend = cv.graph.add_constant(f"{cv.name}_attend", torch.tensor(0.0, dtype=like.dtype.torch))
            value = cv.emit("where", [value, masked, attend], name=f"{cv.name}_bias")
        floats.append(value)
    return floats[0] if len(floats) == 1 else cv.emit("add", floats, name=f"{cv.name}_mask")


@module(nn.MultiheadAttention)
def mha_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    q, k, v = (tensor_arg(arg(args, kwargs, i, n)) for i, n in enumerate(["query", "key", "value"]))
    extras = {n: arg(args, kwargs, i, n) for i, n in
              [(3, "key_padding_mask"), (5, "attn_mask"), (6, "average_attn_weights"), (7, "is_causal")]}
    need_weights = arg(args, kwargs, 4, "need_weights", True)
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn or need_weights \
            or (extras["is_causal"] and extras["attn_mask"] is None):  # torch refuses is_causal without the mask
        raise Unhandled
    mask = _mha_mask(cv, m, extras["key_padding_mask"], extras["attn_mask"], q)
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
    context = cv.emit("attention", projected + ([mask] if mask is not None else []),
                      {"num_heads": m.num_heads, "scale": 1.0 / math.sqrt(head_dim), "dropout": float(m.dropout)},
                      name=f"{cv.name}_attention")
    w_out, b_out = _module_params(cv, m.out_proj, ["weight", "bias"], f"{path}.out_proj")
    y = cv.emit("linear", [context, w_out, b_out], name=f"{cv.name}_out_proj")
    if not m.batch_first:
        y = cv.emit("permute", [y], {"perm": [1, 0, 2]})
    return (y, None)



@module(nn.Flatten)
def flatten_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    return flatten_fn(cv, (args[0], m.start_dim, m.end_dim), {}, real)




@module(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def upsample_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    align = True if isinstance(m, nn.UpsamplingBilinear2d) else m.align_corners
    return interpolate(cv, tensor_arg(args[0]), real, m.mode, align, m.scale_factor, m.recompute_scale_factor, False)


@module(nn.Embedding)
def embedding_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    if m.max_norm is not None:
        raise Unhandled
    (w,) = _module_params(cv, m, ["weight"])
    return cv.emit("embedding", [w, tensor_arg(args[0])])


@module(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose_module(cv, args, kwargs, real):
    m = cv.gm.get_submodule(cv.current.target)
    x = tensor_arg(args[0])
    if m.padding_mode != "zeros" or len(args) > 1 or kwargs:
        raise Unhandled  # an output_size argument
    nd = x.rank - 2
    w, b = _module_params(cv, m, ["weight", "bias"])
    return cv.emit("conv_transpose", [x, w, b], {
        "stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation),
        "output_padding": list(m.output_padding), "groups": int(m.groups)}) if nd == len(m.stride) else None
