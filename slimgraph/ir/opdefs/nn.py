"""Layers with weights and windows: conv, linear, matmul, norms, pooling, attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimgraph.ir.coupling import Coupling, frozen, inp, out, same
from slimgraph.ir.ops import register_op


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def symmetric_padding(pads: list[int]) -> list[int] | None:
    """ONNX-style [begin..., end...] pads as torch's per-dim padding, or None if asymmetric."""
    n = len(pads) // 2
    return list(pads[:n]) if list(pads[:n]) == list(pads[n:]) else None


def torch_pad_arg(pads: list[int]) -> list[int]:
    """[begin..., end...] over spatial dims -> F.pad's (last dim first) order."""
    n = len(pads) // 2
    arg: list[int] = []
    for d in reversed(range(n)):
        arg += [pads[d], pads[n + d]]
    return arg


def _checked_same(node, ok: bool) -> list:
    if not ok:
        raise ValueError(f"{node.op}: operands {[v.shape for v in node.inputs if v is not None]} do not fit")
    x = node.inputs[0]
    return [(tuple(x.shape), x.dtype)]


# ---------------------------------------------------------------------------- conv
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_ref(xs, a):
    x, w, b = xs[0], xs[1], xs[2] if len(xs) > 2 else None
    pads = a["pads"]
    padding = symmetric_padding(pads)
    if padding is None:
        x = F.pad(x, torch_pad_arg(pads))
        padding = [0] * (len(pads) // 2)
    return _CONV[w.dim() - 2](x, w, b, a["stride"], padding, a["dilation"], a["groups"])


def conv_coupling(node) -> list[Coupling]:
    x, w = node.inputs[0], node.inputs[1]
    groups = node.attrs["groups"]
    cin, cout = x.shape[1], w.shape[0]
    bias = [inp(2, 0)] if len(node.inputs) > 2 and node.inputs[2] is not None else []
    batch = same(inp(0, 0), out(0, 0))
    if groups == 1:
        return [batch, same(inp(0, 1), inp(1, 1)), same(out(0, 1), inp(1, 0), *bias)]
    if groups == cin == cout:  # depthwise: one filter per channel, all dims move together
        return [batch, same(inp(0, 1), out(0, 1), inp(1, 0), *bias)]
    if cin == cout:
        # grouped, as wide in as out: channel c of the input, output, filters and bias move
        # together, and params[1] (the weight's within-group axis) holds position c % (cin / groups)
        return [batch, Coupling("group", (inp(0, 1), out(0, 1), inp(1, 0), *bias), (groups, inp(1, 1)))]
    return [batch, frozen(inp(0, 1), out(0, 1), inp(1, 0), inp(1, 1), *bias)]


def conv_infer(node) -> list:
    x, w = node.inputs[0], node.inputs[1]
    a = node.attrs
    nd = w.rank - 2
    if x.rank != nd + 2 or x.shape[1] != w.shape[1] * a["groups"]:
        raise ValueError(f"conv: input {x.shape} does not fit weight {w.shape} with groups={a['groups']}")
    spatial = []
    for i in range(nd):
        size = x.shape[2 + i] + a["pads"][i] + a["pads"][nd + i] - a["dilation"][i] * (w.shape[2 + i] - 1) - 1
        if size < 0:
            raise ValueError(f"conv: input {x.shape} is smaller than the kernel {w.shape}")
        spatial.append(size // a["stride"][i] + 1)
    return [((x.shape[0], w.shape[0], *spatial), x.dtype)]


def conv_macs(node) -> int:
    w = node.inputs[1]
    return node.outputs[0].numel * _prod(w.shape[1:])


register_op(
    "conv",
    conv_ref,
    description="N-d convolution; attrs stride, pads [begin..., end...], dilation, groups",
    num_inputs=(2, 3),
    coupling=conv_coupling,
    macs=conv_macs,
    infer=conv_infer,
)


# ---------------------------------------------------------------------------- linear / matmul
def linear_coupling(node) -> list[Coupling]:
    rank = node.inputs[0].rank
    bias = [inp(2, 0)] if len(node.inputs) > 2 and node.inputs[2] is not None else []
    lead = [same(inp(0, a), out(0, a)) for a in range(rank - 1)]
    return lead + [same(inp(0, rank - 1), inp(1, 1)), same(out(0, rank - 1), inp(1, 0), *bias)]


register_op(
    "linear",
    lambda xs, a: F.linear(xs[0], xs[1], xs[2] if len(xs) > 2 else None),
    description="x @ W.T + b (torch.nn.Linear)",
    num_inputs=(2, 3),
    coupling=linear_coupling,
    macs=lambda node: node.outputs[0].numel * node.inputs[1].shape[1],
)


def matmul_coupling(node) -> list[Coupling]:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if a.rank < 2 or b.rank < 2:
        return [frozen(*[inp(0, i) for i in range(a.rank)], *[inp(1, i) for i in range(b.rank)])]
    couplings = [
        same(inp(0, a.rank - 1), inp(1, b.rank - 2)),
        same(inp(0, a.rank - 2), out(0, y.rank - 2)),
        same(inp(1, b.rank - 1), out(0, y.rank - 1)),
    ]
    for axis in range(y.rank - 2):
        dims = [out(0, axis)]
        for i, v in enumerate((a, b)):
            k = axis - (y.rank - v.rank)
            if k >= 0:
                dims.append(inp(i, k))
        couplings.append(same(*dims))
    return couplings


register_op(
    "matmul",
    lambda xs, a: torch.matmul(xs[0], xs[1]),
    description="batched matrix product (broadcasting)",
    num_inputs=(2, 2),
    coupling=matmul_coupling,
    macs=lambda node: node.outputs[0].numel * node.inputs[0].shape[-1],
)


# ---------------------------------------------------------------------------- normalization
def channel_param_coupling(node) -> list[Coupling]:
    """Per-channel parameters (axis 0 of inputs 1..) follow the channel axis 1."""
    params = [inp(i, 0) for i, v in enumerate(node.inputs) if i > 0 and v is not None]
    rank = node.inputs[0].rank
    rest = [same(inp(0, a), out(0, a)) for a in range(rank) if a != 1]
    return [same(inp(0, 1), out(0, 1), *params)] + rest


register_op(
    "batch_norm",
    lambda xs, a: F.batch_norm(xs[0], xs[3], xs[4], xs[1], xs[2], False, 0.0, a["eps"]),
    description="inference batch norm; inputs x, weight, bias, running_mean, running_var",
    num_inputs=(5, 5),
    coupling=channel_param_coupling,
    stateful=True,
    infer=lambda node: _checked_same(node, node.inputs[0].rank >= 2 and all(
        v.shape == (node.inputs[0].shape[1],) for v in node.inputs[1:])),
)


def layer_norm_coupling(node) -> list[Coupling]:
    rank = node.inputs[0].rank
    k = len(node.attrs["normalized_shape"])
    couplings = [same(inp(0, a), out(0, a)) for a in range(rank - k)]
    for j in range(k):  # removing a normalized channel changes the statistics of the rest
        params = [inp(i, j) for i, v in enumerate(node.inputs) if i > 0 and v is not None]
        couplings.append(Coupling("normalized", (inp(0, rank - k + j), out(0, rank - k + j), *params)))
    return couplings


register_op(
    "layer_norm",
    lambda xs, a: F.layer_norm(xs[0], a["normalized_shape"], xs[1], xs[2] if len(xs) > 2 else None, a["eps"]),
    description="layer norm over the trailing normalized_shape dims",
    num_inputs=(1, 3),
    coupling=layer_norm_coupling,
)

register_op(
    "group_norm",
    lambda xs, a: F.group_norm(xs[0], a["num_groups"], xs[1], xs[2] if len(xs) > 2 else None, a["eps"]),
    description="group norm over channel groups",
    num_inputs=(1, 3),
    # group statistics change when a channel leaves: frozen, like layer norm's normalized dims
    coupling=lambda node: [frozen(inp(0, 1), out(0, 1), *[inp(i, 0) for i in (1, 2)
                                                        if i < len(node.inputs) and node.inputs[i] is not None])],
)

register_op(
    "lrn",
    lambda xs, a: F.local_response_norm(xs[0], a["size"], a["alpha"], a["beta"], a["k"]),
    description="local response normalization across channels",
    coupling=lambda node: [frozen(inp(0, 1), out(0, 1))],
)


# ---------------------------------------------------------------------------- pooling
def spatial_coupling(node) -> list[Coupling]:
    """Pooling keeps batch and channel axes; spatial axes are resampled."""
    return [same(inp(0, 0), out(0, 0)), same(inp(0, 1), out(0, 1))]


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def max_pool_ref(xs, a):
    x, pads = xs[0], a["pads"]
    padding = symmetric_padding(pads)
    if padding is None or any(2 * p > k for p, k in zip(padding, a["kernel"])):
        x = F.pad(x, torch_pad_arg(pads), value=float("-inf"))
        padding = [0] * len(a["kernel"])
    fn = _MAX_POOL[len(a["kernel"])]
    return fn(x, a["kernel"], a["stride"], padding, a.get("dilation", 1), a.get("ceil_mode", False))


def avg_pool_ref(xs, a):
    x, pads = xs[0], a["pads"]
    padding = symmetric_padding(pads)
    count_include_pad = a.get("count_include_pad", True)
    if padding is None or any(2 * p > k for p, k in zip(padding, a["kernel"])):
        x = F.pad(x, torch_pad_arg(pads))
        padding = [0] * len(a["kernel"])
    fn = _AVG_POOL[len(a["kernel"])]
    return fn(x, a["kernel"], a["stride"], padding, a.get("ceil_mode", False), count_include_pad)


def window_macs(node) -> int:
    return node.outputs[0].numel * _prod(node.attrs["kernel"])


register_op("max_pool", max_pool_ref, description="max pooling; attrs kernel, stride, pads, dilation, ceil_mode",
            coupling=spatial_coupling)
register_op("avg_pool", avg_pool_ref, description="average pooling; attrs kernel, stride, pads, ceil_mode",
            coupling=spatial_coupling, macs=window_macs)

_ADAPTIVE_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
register_op(
    "adaptive_avg_pool",
    lambda xs, a: _ADAPTIVE_AVG[len(a["output_size"])](xs[0], a["output_size"]),
    description="adaptive average pooling to output_size (global pooling when 1)",
    coupling=spatial_coupling,
    macs=lambda node: node.inputs[0].numel,
)
register_op(
    "adaptive_max_pool",
    lambda xs, a: _ADAPTIVE_MAX[len(a["output_size"])](xs[0], a["output_size"]),
    description="adaptive max pooling to output_size",
    coupling=spatial_coupling,
)


# ---------------------------------------------------------------------------- regularizers
def passthrough_coupling(node) -> list[Coupling]:
    return [same(inp(0, a), out(0, a)) for a in range(node.inputs[0].rank)]


register_op("dropout", lambda xs, a: xs[0], description="dropout (identity at inference)",
            coupling=passthrough_coupling, stateful=True, infer=lambda node: _checked_same(node, True))
register_op("stochastic_depth", lambda xs, a: xs[0],
            description="stochastic depth / drop path (identity at inference); attrs p, mode",
            coupling=passthrough_coupling, stateful=True, infer=lambda node: _checked_same(node, True))


# ---------------------------------------------------------------------------- attention
def mha_ref(xs, a):
    q, k, v, w_in, b_in, w_out, b_out = xs
    if a["batch_first"]:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    embed = q.shape[-1]
    y, _ = F.multi_head_attention_forward(
        q, k, v, embed, a["num_heads"], w_in, b_in, None, None, False, 0.0, w_out, b_out,
        training=False, need_weights=False,
    )
    return y.transpose(0, 1) if a["batch_first"] else y


def mha_coupling(node) -> list[Coupling]:
    """Heads are pruned as whole units by the pruning pass; until then embed dims are frozen."""
    seq, batch = (1, 0) if node.attrs["batch_first"] else (0, 1)
    return [
        same(inp(0, batch), inp(1, batch), inp(2, batch), out(0, batch)),
        same(inp(0, seq), out(0, seq)),
        same(inp(1, seq), inp(2, seq)),
        Coupling("heads", (inp(3, 0), inp(4, 0), inp(5, 1)), (node.attrs["num_heads"],)),
        frozen(inp(0, 2), inp(1, 2), inp(2, 2), inp(3, 1), inp(5, 0), inp(6, 0), out(0, 2)),
    ]


def mha_macs(node) -> int:
    q, k = node.inputs[0], node.inputs[1]
    seq_axis = 1 if node.attrs["batch_first"] else 0
    lq, lk, e = q.shape[seq_axis], k.shape[seq_axis], q.shape[2]
    batch = q.shape[1 - seq_axis]
    return batch * (lq * e * e + 2 * lk * e * e + 2 * lq * lk * e + lq * e * e)


register_op(
    "multihead_attention",
    mha_ref,
    description="multi-head attention (torch.nn.MultiheadAttention); inputs q, k, v, in/out weights",
    num_inputs=(7, 7),
    coupling=mha_coupling,
    macs=mha_macs,
)
