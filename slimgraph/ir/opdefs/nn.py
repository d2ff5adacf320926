"""Layers with weights and windows: conv, linear, matmul, norms, pooling, attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimgraph.ir.coupling import Coupling, frozen, inp, out, same
from slimgraph.ir.dtypes import DType
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


def pad_spatial(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    """x with ONNX-style [begin..., end...] pads on its trailing dims, filled with ``value``. As
    F.pad(x, torch_pad_arg(pads), value=value), but by cats: F.pad's meta kernel guards a symbolic
    batch to its traced size, and symbolic inference runs the references on fake tensors (a conv or
    pool with SAME_UPPER pads came back with a static batch)."""
    n = len(pads) // 2
    for d in range(n):
        axis, parts = x.dim() - n + d, []
        for width in (pads[d], pads[n + d]):
            parts.append(x.new_full((*x.shape[:axis], width, *x.shape[axis + 1:]), value) if width else None)
        if any(t is not None for t in parts):
            x = torch.cat([t for t in (parts[0], x, parts[1]) if t is not None], axis)
    return x


def _float_type(node):
    """The one floating dtype shared by every operand, else None (a closed form then defers to meta)."""
    dtypes = {v.dtype for v in node.inputs if v is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    return dtype if dtype is not None and dtype.is_float else None


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
        x = pad_spatial(x, pads)
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


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_transpose_ref(xs, a):
    x, w, b = xs[0], xs[1], xs[2] if len(xs) > 2 else None
    return _CONV_T[w.dim() - 2](x, w, b, a["stride"], a["padding"], a["output_padding"], a["groups"], a["dilation"])


def conv_transpose_coupling(node) -> list[Coupling]:
    """weight [in, out / groups, k...]: the input's channels are the weight's rows, the output's
    its columns (times the groups)."""
    groups = node.attrs["groups"]
    bias = [inp(2, 0)] if len(node.inputs) > 2 and node.inputs[2] is not None else []
    batch = same(inp(0, 0), out(0, 0))
    if groups == 1:
        return [batch, same(inp(0, 1), inp(1, 0)), same(out(0, 1), inp(1, 1), *bias)]
    return [batch, frozen(inp(0, 1), out(0, 1), inp(1, 0), inp(1, 1), *bias)]


def conv_transpose_infer(node) -> None:
    """Refuses a padding that crops the whole output away. torch's meta and float32 CPU kernels give an
    empty tensor there, but its float16 / float64 kernels and ONNX Runtime's ConvTranspose refuse it."""
    x, w = node.inputs[0], node.inputs[1]
    a = node.attrs
    nd = w.rank - 2
    for i in range(nd if x.rank == nd + 2 else 0):
        size = ((x.shape[2 + i] - 1) * a["stride"][i] - 2 * a["padding"][i]
                + a["dilation"][i] * (w.shape[2 + i] - 1) + a["output_padding"][i] + 1)
        if size < 1:
            raise ValueError(f"conv_transpose: output size {size} < 1 in spatial dim {i} (input {x.shape}, "
                             f"weight {w.shape}, stride {a['stride']}, padding {a['padding']})")
    return None  # the reference on meta tensors gives the types (and torch's checks of the rest)


register_op(
    "conv_transpose",
    conv_transpose_ref,
    description="N-d transposed convolution; attrs stride, padding, output_padding, dilation, groups (torch's)",
    num_inputs=(2, 3),
    coupling=conv_transpose_coupling,
    macs=lambda node: node.inputs[0].numel * _prod(node.inputs[1].shape[1:]),
    infer=conv_transpose_infer,
)


# ---------------------------------------------------------------------------- linear / matmul
def linear_coupling(node) -> list[Coupling]:
    rank = node.inputs[0].rank
    bias = [inp(2, 0)] if len(node.inputs) > 2 and node.inputs[2] is not None else []
    lead = [same(inp(0, a), out(0, a)) for a in range(rank - 1)]
    return lead + [same(inp(0, rank - 1), inp(1, 1)), same(out(0, rank - 1), inp(1, 0), *bias)]


def linear_infer(node) -> list | None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = _float_type(node)
    if dtype is None or x.rank < 1 or w.rank != 2 or x.shape[-1] != w.shape[1] \
            or (b is not None and b.shape != (w.shape[0],)):
        return None
    return [((*x.shape[:-1], w.shape[0]), dtype)]


register_op(
    "linear",
    lambda xs, a: F.linear(xs[0], xs[1], xs[2] if len(xs) > 2 else None),
    description="x @ W.T + b (torch.nn.Linear)",
    num_inputs=(2, 3),
    coupling=linear_coupling,
    macs=lambda node: node.outputs[0].numel * node.inputs[1].shape[1],
    infer=linear_infer,
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
    shape_reference=lambda xs, a: torch.empty_like(xs[0]),  # its constant pad guards the batch on fake tensors
)


# ---------------------------------------------------------------------------- pooling
def spatial_coupling(node) -> list[Coupling]:
    """Pooling keeps batch and channel axes; spatial axes are resampled."""
    return [same(inp(0, 0), out(0, 0)), same(inp(0, 1), out(0, 1))]


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _inside(y: torch.Tensor, x: torch.Tensor, a) -> torch.Tensor:
    """A pool of x padded ahead (pads torch cannot take) without a last ceil-mode window that starts in
    the right padding: torch keeps it there (it is inside the padded input), ONNX and x's own pool not."""
    if not a.get("ceil_mode"):
        return y
    for i, (stride, pad) in enumerate(zip(a["stride"], a["pads"])):
        if (y.shape[2 + i] - 1) * stride >= x.shape[2 + i] + pad:
            y = y.narrow(2 + i, 0, y.shape[2 + i] - 1)
    return y


def max_pool_ref(xs, a):
    x, pads = xs[0], a["pads"]
    padding = symmetric_padding(pads)
    fn = _MAX_POOL[len(a["kernel"])]
    if padding is None or any(2 * p > k for p, k in zip(padding, a["kernel"])):  # torch pads no such way
        padded = pad_spatial(x, pads, float("-inf"))
        return _inside(fn(padded, a["kernel"], a["stride"], [0] * len(a["kernel"]), a.get("dilation", 1),
                          a.get("ceil_mode", False)), x, a)
    return fn(x, a["kernel"], a["stride"], padding, a.get("dilation", 1), a.get("ceil_mode", False))


def avg_pool_ref(xs, a):
    x, pads = xs[0], a["pads"]
    padding = symmetric_padding(pads)
    count_include_pad = a.get("count_include_pad", True)
    fn = _AVG_POOL[len(a["kernel"])]
    if padding is None or any(2 * p > k for p, k in zip(padding, a["kernel"])):  # torch pads no such way
        nd = len(a["kernel"])
        total = _inside(fn(pad_spatial(x, pads), a["kernel"], a["stride"], [0] * nd, a.get("ceil_mode", False),
                           True), x, a)
        if count_include_pad:
            return total
        # the padding counts for nothing: the mean over the window's elements of x alone
        ones = pad_spatial(torch.ones_like(x[:1, :1]), pads)
        return total / _inside(fn(ones, a["kernel"], a["stride"], [0] * nd, a.get("ceil_mode", False), True), x, a)
    return fn(x, a["kernel"], a["stride"], padding, a.get("ceil_mode", False), count_include_pad)


def window_macs(node) -> int:
    return node.outputs[0].numel * _prod(node.attrs["kernel"])


def _int_list(xs, n: int) -> bool:
    return isinstance(xs, (list, tuple)) and len(xs) == n and all(type(x) is int for x in xs)


def pool_infer(node) -> list | None:
    """max_pool / avg_pool sizes as the references compute them (torch's pooling_output_shape)."""
    x, a = node.inputs[0], node.attrs
    kernel, stride, pads = a["kernel"], a["stride"], a["pads"]
    nd = len(kernel) if isinstance(kernel, (list, tuple)) else 0
    dilation = a.get("dilation", 1) if node.op == "max_pool" else 1
    dilation = [dilation] * nd if type(dilation) is int else dilation
    ceil_mode = a.get("ceil_mode", False)
    if _float_type(node) is None or nd == 0 or x.rank != nd + 2 or min(x.shape[1:]) < 1 \
            or not (_int_list(kernel, nd) and _int_list(stride, nd) and _int_list(dilation, nd)
                    and _int_list(pads, 2 * nd) and type(ceil_mode) is bool) \
            or min(*kernel, *stride, *dilation) < 1 or min(pads) < 0:
        return None
    padding = symmetric_padding(pads)
    explicit = padding is None or any(2 * p > k for p, k in zip(padding, kernel))  # as the references pad
    spatial = []
    for i in range(nd):
        size, pad = x.shape[2 + i], pads[i]
        if explicit:
            size, pad = size + pads[i] + pads[nd + i], 0
        out = (size + 2 * pad - dilation[i] * (kernel[i] - 1) - 1 + (stride[i] - 1 if ceil_mode else 0)) \
            // stride[i] + 1
        if ceil_mode and (out - 1) * stride[i] >= x.shape[2 + i] + pads[i]:  # the last window must start inside
            out -= 1
        if out < 1 or (node.op == "avg_pool" and nd == 3 and size < kernel[i]):
            return None  # torch's own error (avg_pool3d also wants the input >= the kernel), from the reference
        spatial.append(out)
    return [((*x.shape[:2], *spatial), x.dtype)]


def ceil_adds_no_window(node) -> bool:
    """Whether a ceil-mode max_pool / avg_pool has floor mode's windows in every spatial dim (static
    sizes): ceil mode then at most drops a last window that starts in the padding, which floor mode
    never has, and the node computes what it computes with ceil_mode False."""
    x, y, a = node.inputs[0], node.outputs[0], node.attrs
    if not a.get("ceil_mode") or any((x.sym or ())[2:]) or any((y.sym or ())[2:]):
        return False
    nd = len(a["kernel"])
    dilation = a.get("dilation", 1) if node.op == "max_pool" else 1
    dilation = [dilation] * nd if type(dilation) is int else dilation
    for i in range(nd):
        span = dilation[i] * (a["kernel"][i] - 1) + 1
        if (x.shape[2 + i] + a["pads"][i] + a["pads"][nd + i] - span) // a["stride"][i] + 1 != y.shape[2 + i]:
            return False
    return True


register_op("max_pool", max_pool_ref, description="max pooling; attrs kernel, stride, pads, dilation, ceil_mode",
            coupling=spatial_coupling, infer=pool_infer)
register_op("avg_pool", avg_pool_ref, description="average pooling; attrs kernel, stride, pads, ceil_mode",
            coupling=spatial_coupling, macs=window_macs, infer=pool_infer)


def adaptive_infer(node) -> list | None:
    x, size = node.inputs[0], node.attrs["output_size"]
    nd = len(size) if isinstance(size, (list, tuple)) else 0
    if nd and any(type(s) is int and s < 1 for s in size):  # torch's meta kernel gives an empty output
        raise ValueError(f"{node.op}: output size {list(size)} < 1 (neither onnxruntime nor the pooling "
                         "windows have a form for an empty output)")
    if _float_type(node) is None or nd == 0 or x.rank != nd + 2 or min(x.shape[1:]) < 1 \
            or not _int_list(size, nd) or min(size) < 1:
        return None
    return [((*x.shape[:2], *size), x.dtype)]


_ADAPTIVE_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
register_op(
    "adaptive_avg_pool",
    lambda xs, a: _ADAPTIVE_AVG[len(a["output_size"])](xs[0], a["output_size"]),
    description="adaptive average pooling to output_size (global pooling when 1)",
    coupling=spatial_coupling,
    macs=lambda node: node.inputs[0].numel,
    infer=adaptive_infer,
)
register_op(
    "adaptive_max_pool",
    lambda xs, a: _ADAPTIVE_MAX[len(a["output_size"])](xs[0], a["output_size"]),
    description="adaptive max pooling to output_size",
    coupling=spatial_coupling,
    infer=adaptive_infer,
)


# ---------------------------------------------------------------------------- resampling
_INTERPOLATE = {"nearest": "nearest", "linear": {1: "linear", 2: "bilinear", 3: "trilinear"}, "cubic": "bicubic"}


def resize_ref(xs, a):
    x, mode = xs[0], a["mode"]
    torch_mode = _INTERPOLATE[mode] if mode != "linear" else _INTERPOLATE["linear"][x.dim() - 2]
    align = a.get("align_corners") if mode != "nearest" else None
    if a.get("scales"):
        return F.interpolate(x, scale_factor=a["scales"], mode=torch_mode, align_corners=align)
    return F.interpolate(x, size=a["size"], mode=torch_mode, align_corners=align)


def resize_shape(xs, a):
    """resize's output alone, leading dims as they come (symbolic too: torch's upsampling kernels
    guard the batch to its traced size on fake tensors, which left resize's output static)."""
    x = xs[0]
    if a.get("scales"):
        size = [math.floor(d * s) for d, s in zip(x.shape[2:], a["scales"])]
    else:
        size = list(a["size"])
    return x.new_empty((*x.shape[:2], *size))


register_op(
    "resize",
    resize_ref,
    description="F.interpolate: attrs mode nearest|linear|cubic, size (spatial) or scales, align_corners",
    coupling=spatial_coupling,
    shape_reference=resize_shape,
)
register_op(
    "grid_sample",
    lambda xs, a: F.grid_sample(xs[0], xs[1], a["mode"], a["padding_mode"], a["align_corners"]),
    description="sample input 0 at the normalized coordinates of input 1 (F.grid_sample)",
    num_inputs=(2, 2),
    coupling=lambda node: [same(inp(0, 0), inp(1, 0), out(0, 0)), same(inp(0, 1), out(0, 1))],
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
# torch.nn.MultiheadAttention is imported as three linear projections, this core op and an output
# linear: the projections are then ordinary layers (pruning, low rank, quantization, fp16 see them).
def attention_ref(xs, a):
    """Heads split off the last dim of q, k, v; the mask (xs[3], where given) as torch's
    scaled_dot_product_attention takes attn_mask: added to the scaled scores, or a boolean keep-mask."""
    q, k, v = (t.unflatten(-1, (a["num_heads"], -1)).transpose(-3, -2) for t in xs[:3])
    mask = xs[3] if len(xs) > 3 else None
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a["scale"])
    return y.transpose(-3, -2).flatten(-2)


def attention_coupling(node) -> list[Coupling]:
    """q and k share head dims, v and the output theirs; heads go as whole units across all four,
    and across the mask's head dim where it has one of num_heads (one mask per head: pruning a
    head slices it, or freezes the heads where the mask cannot be sliced, a graph input's)."""
    heads = node.attrs["num_heads"]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    per_head = mask is not None and mask.rank >= 3 and heads > 1 and mask.shape[-3] == heads
    return _head_couplings(node.inputs[0].rank, heads, [inp(3, mask.rank - 3)] if per_head else [])


def _head_couplings(rank: int, num_heads: int, mask_heads: list | None = None) -> list[Coupling]:
    couplings = [same(inp(0, a), inp(1, a), inp(2, a), out(0, a)) for a in range(rank - 2)]
    couplings += [same(inp(0, rank - 2), out(0, rank - 2)), same(inp(1, rank - 2), inp(2, rank - 2))]
    heads = (inp(0, rank - 1), inp(1, rank - 1), inp(2, rank - 1), out(0, rank - 1), *(mask_heads or []))
    return couplings + [Coupling("heads", heads, (num_heads,))]


def _broadcasts(shape: tuple, target: tuple) -> bool:
    return len(shape) <= len(target) and all(d in (1, t) for d, t in zip(reversed(shape), reversed(target)))


def attention_infer(node) -> list:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    heads = node.attrs["num_heads"]
    ok = (q.rank == k.rank == v.rank >= 3 and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]
          and q.shape[-1] % heads == 0 and v.shape[-1] % heads == 0 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2])
    if not ok:
        raise ValueError(f"attention over {heads} heads: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    scores = (*q.shape[:-2], heads, q.shape[-2], k.shape[-2])
    if mask is not None and (mask.dtype not in (DType.bool, q.dtype) or mask.rank < 2  # as torch's attn_mask
                             or not _broadcasts(tuple(mask.shape), scores)):
        raise ValueError(f"attention: the mask {mask.type_str()} is neither bool nor {q.dtype.short}, or not of rank "
                         f">= 2 broadcasting to the scores [{','.join(str(d) for d in scores)}]")
    return [((*q.shape[:-1], v.shape[-1]), q.dtype)]


def attention_macs(node) -> int:
    q, k, v = node.inputs[:3]
    return q.numel // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


register_op(
    "attention",
    attention_ref,
    description="scaled dot-product attention over num_heads heads of the last dim of q, k, v, with an optional "
                "mask (as torch's attn_mask: added to the scaled scores, or a boolean keep-mask; broadcast to "
                "[..., heads, seq_q, seq_k]); attrs num_heads, scale, dropout (on the attention weights, in training)",
    num_inputs=(3, 4),
    coupling=attention_coupling,
    macs=attention_macs,
    infer=attention_infer,
)


# ---------------------------------------------------------------------------- onnxruntime's kernels
# The `fuse{target=onnxruntime}` pass rewrites canonical subgraphs into these: each is one kernel of
# onnxruntime's CPU provider (com.microsoft domain) and computes exactly what it replaces.
def multi_head_attention_infer(node) -> list:
    q, k, v = node.inputs[:3]
    heads = node.attrs["num_heads"]
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    ok = (q.rank == k.rank == v.rank == 3 and q.shape[-1] == k.shape[-1] and k.shape[1] == v.shape[1]
          and q.shape[-1] % heads == 0 and v.shape[-1] % heads == 0
          and (bias is None or (bias.rank == 4 and tuple(bias.shape[2:]) == (q.shape[1], k.shape[1])
                                and bias.shape[0] in (1, q.shape[0]) and bias.shape[1] in (1, heads))))
    if not ok:
        raise ValueError(f"multi_head_attention over {heads} heads: q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"bias {None if bias is None else bias.shape} do not fit")
    return [((*q.shape[:-1], v.shape[-1]), q.dtype)]


def multi_head_attention_coupling(node) -> list[Coupling]:
    """As attention's; the bias's batch and sequence dims are not channels (pruning leaves them)."""
    return attention_coupling(node)


register_op(
    "multi_head_attention",
    attention_ref,
    description="onnxruntime's MultiHeadAttention: attention over num_heads heads of [batch, seq, heads * dim] "
                "q, k, v with an optional additive bias [batch or 1, heads or 1, seq_q, seq_k]; attrs num_heads, scale",
    num_inputs=(3, 4),
    coupling=multi_head_attention_coupling,
    macs=attention_macs,
    infer=multi_head_attention_infer,
)


def skip_layer_norm_ref(xs, a):
    x, skip, gamma, beta = xs[:4]
    total = x + skip if len(xs) < 5 or xs[4] is None else x + skip + xs[4]
    return F.layer_norm(total, gamma.shape, gamma, beta, a["eps"]), total


def skip_layer_norm_infer(node) -> list:
    x, skip, gamma = node.inputs[:3]
    params = [v for v in node.inputs[2:] if v is not None]
    if x.rank != 3 or skip.shape != x.shape or any(p.shape != (x.shape[-1],) for p in params):
        raise ValueError(f"skip_layer_norm: input {x.shape}, skip {skip.shape} and 1-D parameters of the "
                         f"hidden size {[p.shape for p in params]} do not fit")
    return [(x.shape, x.dtype), (x.shape, x.dtype)]


def skip_layer_norm_coupling(node) -> list[Coupling]:
    """The residual sum's dims are shared by both operands and both outputs; the normalized (last)
    dim is frozen, as layer norm's statistics change when a channel leaves."""
    rank = node.inputs[0].rank
    couplings = [same(inp(0, a), inp(1, a), out(0, a), out(1, a)) for a in range(rank - 1)]
    last = [inp(0, rank - 1), inp(1, rank - 1), out(0, rank - 1), out(1, rank - 1)]
    last += [inp(i, 0) for i in range(2, len(node.inputs)) if node.inputs[i] is not None]
    return couplings + [frozen(*last)]


register_op(
    "skip_layer_norm",
    skip_layer_norm_ref,
    description="onnxruntime's SkipLayerNormalization: layer norm of x + skip (+ bias) over the last dim, and "
                "that sum as a second output (the next residual reads it); inputs x, skip, gamma, beta, bias; "
                "attr eps",
    num_inputs=(4, 5),
    coupling=skip_layer_norm_coupling,
    infer=skip_layer_norm_infer,
)
