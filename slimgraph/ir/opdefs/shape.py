"""Ops that move data without arithmetic: reshape, permute, concat, split, slice, pad, reductions.

Target shapes may hold "N": the input's leading (batch) dim, so a graph traced at batch 1
still runs at any batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimgraph.ir.coupling import Coupling, frozen, inp, out, same, unused
from slimgraph.ir.opdefs.nn import passthrough_coupling
from slimgraph.ir.ops import register_op

BATCH = "N"


def resolve_shape(target: list, x: torch.Tensor) -> list[int]:
    return [x.shape[0] if d == BATCH else d for d in target]


def reshape_coupling(node) -> list[Coupling]:
    x, y = node.inputs[0], node.outputs[0]
    # leading dims that survive unchanged pass through; the rest is a structured reshape
    k = 0
    while k < min(x.rank, y.rank) and x.shape[k] == y.shape[k]:
        k += 1
    couplings = [same(inp(0, a), out(0, a)) for a in range(k)]
    rest = tuple([inp(0, a) for a in range(k, x.rank)] + [out(0, a) for a in range(k, y.rank)])
    if rest:
        couplings.append(Coupling("reshape", rest, (tuple(x.shape), tuple(y.shape))))
    return couplings


# Closed-form inference (``OpDef.infer``) for the hot ops: None defers to the reference on meta
# tensors, which also raises torch's own error for operands that do not fit.
def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _axis(axis, rank: int) -> int | None:
    return axis % rank if type(axis) is int and -rank <= axis < rank else None


def reshape_infer(node) -> list | None:
    x, target = node.inputs[0], node.attrs["shape"]
    if not isinstance(target, (list, tuple)) or (BATCH in target and x.rank == 0):
        return None
    target = [x.shape[0] if d == BATCH else d for d in target]
    if not all(type(d) is int and d >= -1 for d in target) or target.count(-1) > 1:
        return None
    numel, known = _prod(x.shape), _prod(d for d in target if d != -1)
    if -1 in target:
        if known == 0 or numel % known:
            return None
        target = [numel // known if d == -1 else d for d in target]
    elif known != numel:
        return None
    return [(tuple(target), x.dtype)]


def flatten_infer(node) -> list | None:
    x = node.inputs[0]
    start, end = _axis(node.attrs["start"], x.rank), _axis(node.attrs["end"], x.rank)
    if start is None or end is None or start > end:
        return None
    return [((*x.shape[:start], _prod(x.shape[start:end + 1]), *x.shape[end + 1:]), x.dtype)]


register_op(
    "reshape",
    lambda xs, a: xs[0].reshape(resolve_shape(a["shape"], xs[0])),
    description="reshape to attr shape (-1 inferred, N = input batch)",
    coupling=reshape_coupling,
    infer=reshape_infer,
)
register_op(
    "flatten",
    lambda xs, a: torch.flatten(xs[0], a["start"], a["end"]),
    description="merge dims start..end",
    coupling=reshape_coupling,
    infer=flatten_infer,
)


def permute_coupling(node) -> list[Coupling]:
    return [same(inp(0, p), out(0, i)) for i, p in enumerate(node.attrs["perm"])]


def permute_infer(node) -> list | None:
    x, perm = node.inputs[0], node.attrs["perm"]
    if not isinstance(perm, (list, tuple)) or len(perm) != x.rank:
        return None
    perm = [_axis(p, x.rank) for p in perm]
    if None in perm or sorted(perm) != list(range(x.rank)):
        return None
    return [(tuple(x.shape[p] for p in perm), x.dtype)]


register_op(
    "permute",
    lambda xs, a: xs[0].permute(a["perm"]),
    description="reorder dims by perm",
    coupling=permute_coupling,
    infer=permute_infer,
)


def _squeeze(x, axes):
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


register_op("squeeze", lambda xs, a: _squeeze(xs[0], a["axes"]), description="drop size-1 dims",
            coupling=reshape_coupling)
register_op("unsqueeze", lambda xs, a: _unsqueeze(xs[0], a["axes"]), description="insert size-1 dims",
            coupling=reshape_coupling)


def concat_coupling(node) -> list[Coupling]:
    y = node.outputs[0]
    axis = node.attrs["axis"] % y.rank
    offsets, acc = [], 0
    for v in node.inputs:
        offsets.append(acc)
        acc += v.shape[axis]
    cat = Coupling("concat", (out(0, axis), *[inp(i, axis) for i in range(len(node.inputs))]), tuple(offsets))
    rest = [same(out(0, a), *[inp(i, a) for i in range(len(node.inputs))]) for a in range(y.rank) if a != axis]
    return [cat] + rest


def concat_infer(node) -> list | None:
    first = node.inputs[0]
    rank, axis = first.rank, _axis(node.attrs["axis"], first.rank) if first.rank else None
    if axis is None or any(v is None or v.rank != rank or v.dtype != first.dtype for v in node.inputs):
        return None  # torch.cat's type promotion and legacy empty operands: the reference decides
    if any(v.shape[a] != first.shape[a] for v in node.inputs for a in range(rank) if a != axis):
        return None
    shape = list(first.shape)
    shape[axis] = sum(v.shape[axis] for v in node.inputs)
    return [(tuple(shape), first.dtype)]


register_op(
    "concat",
    lambda xs, a: torch.cat(xs, a["axis"]),
    description="concatenate along axis",
    num_inputs=(1, -1),
    coupling=concat_coupling,
    infer=concat_infer,
)


def split_coupling(node) -> list[Coupling]:
    x = node.inputs[0]
    axis = node.attrs["axis"] % x.rank
    offsets, acc = [], 0
    for size in node.attrs["sizes"]:
        offsets.append(acc)
        acc += size
    n = len(node.outputs)
    split = Coupling("split", (inp(0, axis), *[out(i, axis) for i in range(n)]), tuple(offsets))
    rest = [same(inp(0, a), *[out(i, a) for i in range(n)]) for a in range(x.rank) if a != axis]
    return [split] + rest


def split_infer(node) -> list | None:
    x, sizes = node.inputs[0], node.attrs["sizes"]
    axis = _axis(node.attrs["axis"], x.rank) if x.rank else None
    if axis is None or not isinstance(sizes, (list, tuple)) or not sizes \
            or not all(type(n) is int and n >= 0 for n in sizes) or sum(sizes) != x.shape[axis]:
        return None
    return [((*x.shape[:axis], n, *x.shape[axis + 1:]), x.dtype) for n in sizes]


register_op(
    "split",
    lambda xs, a: torch.split(xs[0], a["sizes"], a["axis"]),
    description="split along axis into sizes (one output each)",
    coupling=split_coupling,
    infer=split_infer,
)


def slice_ref(xs, a):
    x = xs[0]
    index = [slice(None)] * x.dim()
    for axis, start, end, step in zip(a["axes"], a["starts"], a["ends"], a["steps"]):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def slice_coupling(node) -> list[Coupling]:
    sliced = {a % node.inputs[0].rank for a in node.attrs["axes"]}
    return [
        Coupling("slice", (inp(0, a), out(0, a))) if a in sliced else same(inp(0, a), out(0, a))
        for a in range(node.inputs[0].rank)
    ]


register_op("slice", slice_ref, description="strided slice; attrs axes, starts, ends, steps",
            coupling=slice_coupling)


def select_coupling(node) -> list[Coupling]:
    axis = node.attrs["axis"] % node.inputs[0].rank
    couplings = [Coupling("select", (inp(0, axis),), (node.attrs["index"],))]
    for a in range(node.inputs[0].rank):
        if a != axis:
            couplings.append(same(inp(0, a), out(0, a if a < axis else a - 1)))
    return couplings


register_op(
    "select",
    lambda xs, a: xs[0].select(a["axis"], a["index"]),
    description="take one index along axis (the axis is removed)",
    coupling=select_coupling,
)


def expand_coupling(node) -> list[Coupling]:
    x, y = node.inputs[0], node.outputs[0]
    lead = y.rank - x.rank
    return [
        same(inp(0, a), out(0, a + lead)) if x.shape[a] == y.shape[a + lead] else frozen(inp(0, a))
        for a in range(x.rank)
    ]


register_op(
    "expand",
    lambda xs, a: xs[0].expand(a["shape"]),
    description="broadcast to shape (-1 keeps a dim)",
    coupling=expand_coupling,
)


def expand_like_ref(xs, a):
    """expand whose batch size comes from a second input (class tokens in ViT)."""
    shape = [xs[1].shape[0] if d == BATCH else d for d in a["shape"]]
    return xs[0].expand(shape)


register_op(
    "expand_batch",
    expand_like_ref,
    description="broadcast to shape, N taken from input 1's leading dim",
    num_inputs=(2, 2),
    coupling=lambda node: expand_coupling(node) + [
        frozen(inp(1, 0)), unused(*[inp(1, a) for a in range(1, node.inputs[1].rank)])],
)

def pad_coupling(node) -> list[Coupling]:
    """Padded axes change size; untouched axes (usually the channels) pass straight through."""
    rank, pads = node.inputs[0].rank, node.attrs["pads"]
    padded = {rank - 1 - i // 2 for i, p in enumerate(pads) if p}
    return [frozen(inp(0, a), out(0, a)) if a in padded else same(inp(0, a), out(0, a)) for a in range(rank)]


def pad_shape(xs, a):
    """pad's output alone: a constant pad (aten.constant_pad_nd) guards the batch to its traced size
    on fake tensors, which left the output static."""
    x, pads = xs[0], a["pads"]
    shape = list(x.shape)
    for i in range(len(pads) // 2):
        shape[-1 - i] = shape[-1 - i] + pads[2 * i] + pads[2 * i + 1]
    return x.new_empty(shape)


register_op(
    "pad",
    lambda xs, a: F.pad(xs[0], a["pads"], a.get("mode", "constant"), a.get("value", 0.0)),
    description="pad (torch F.pad order: last dim first)",
    coupling=pad_coupling,
    shape_reference=pad_shape,
)


def reduce_coupling(node) -> list[Coupling]:
    x = node.inputs[0]
    axes = {a % x.rank for a in node.attrs["axes"]}
    keep = node.attrs.get("keepdim", False)
    couplings, j = [], 0
    for a in range(x.rank):
        if a in axes:
            couplings.append(frozen(inp(0, a)))
            j += keep
        else:
            couplings.append(same(inp(0, a), out(0, j)))
            j += 1
    return couplings


def reduce_infer(node) -> list | None:
    """Floating mean / sum over a non-empty list of distinct axes (ints promote in sum: meta decides)."""
    x, axes, keep = node.inputs[0], node.attrs["axes"], node.attrs.get("keepdim", False)
    if not x.dtype.is_float or x.rank == 0 or not isinstance(axes, (list, tuple)) or not axes \
            or type(keep) is not bool:
        return None
    reduced = {_axis(a, x.rank) for a in axes}
    if None in reduced or len(reduced) != len(axes):
        return None
    if keep:
        return [(tuple(1 if a in reduced else d for a, d in enumerate(x.shape)), x.dtype)]
    return [(tuple(d for a, d in enumerate(x.shape) if a not in reduced), x.dtype)]


register_op("mean", lambda xs, a: xs[0].mean(a["axes"], keepdim=a.get("keepdim", False)),
            description="mean over axes", coupling=reduce_coupling, macs=lambda n: n.inputs[0].numel,
            infer=reduce_infer)
register_op("sum", lambda xs, a: xs[0].sum(a["axes"], keepdim=a.get("keepdim", False)),
            description="sum over axes", coupling=reduce_coupling, infer=reduce_infer)



def _reduce_all(fn):
    """torch reductions that take one dim at a time (prod, any): applied axis by axis."""
    def ref(xs, a):
        x, keep = xs[0], a.get("keepdim", False)
        for axis in sorted((d % x.dim() for d in a["axes"]), reverse=True):
            x = fn(x, axis, keepdim=keep)
        return x
    return ref


register_op("amax", lambda xs, a: torch.amax(xs[0], a["axes"], keepdim=a.get("keepdim", False)),
            description="max over axes", coupling=reduce_coupling)
register_op("amin", lambda xs, a: torch.amin(xs[0], a["axes"], keepdim=a.get("keepdim", False)),
            description="min over axes", coupling=reduce_coupling)
register_op("prod", _reduce_all(torch.prod), description="product over axes", coupling=reduce_coupling)
register_op("any", _reduce_all(torch.any), description="logical or over axes (bool result)",
            coupling=reduce_coupling)
register_op("var", lambda xs, a: torch.var(xs[0], a["axes"], correction=a.get("correction", 1),
                                           keepdim=a.get("keepdim", False)),
            description="variance over axes; attr correction (1: unbiased)", coupling=reduce_coupling)
register_op("argmax", lambda xs, a: torch.argmax(xs[0], a["axes"][0], keepdim=a.get("keepdim", False)),
            description="index of the max along axes[0] (int64)", coupling=reduce_coupling)
register_op("argmin", lambda xs, a: torch.argmin(xs[0], a["axes"][0], keepdim=a.get("keepdim", False)),
            description="index of the min along axes[0] (int64)", coupling=reduce_coupling)

register_op(
    "cast",
    lambda xs, a: xs[0].to(getattr(torch, a["dtype"])),
    description="convert element type (attr dtype: torch dtype name)",
    coupling=passthrough_coupling,
)


def gather_coupling(node) -> list[Coupling]:
    axis = node.attrs["axis"] % node.inputs[0].rank
    return [frozen(inp(0, axis), out(0, axis))] + [
        same(inp(0, a), out(0, a)) for a in range(node.inputs[0].rank) if a != axis
    ]


register_op(
    "gather",
    lambda xs, a: torch.index_select(xs[0], a["axis"], torch.tensor(a["indices"], dtype=torch.long,
                                                                     device=xs[0].device)),
    description="take a constant list of indices along axis (index_select)",
    coupling=gather_coupling,
)


def roll_coupling(node) -> list[Coupling]:
    rolled = {d % node.inputs[0].rank for d in node.attrs["dims"]}
    return [frozen(inp(0, a), out(0, a)) if a in rolled else same(inp(0, a), out(0, a))
            for a in range(node.inputs[0].rank)]


register_op(
    "roll",
    lambda xs, a: torch.roll(xs[0], a["shifts"], a["dims"]),
    description="cyclic shift along dims (shifted-window attention)",
    coupling=roll_coupling,
)


# Tensors made from sizes alone: only where a size is symbolic (otherwise the frontend folds them
# to constants), e.g. the positions of a sequence, arange(seq).
register_op("arange", lambda xs, a: torch.arange(a["start"], a["end"], a["step"], dtype=getattr(torch, a["dtype"])),
            description="start, start + step, ... below end; attrs start, end, step, dtype", num_inputs=(0, 0))
register_op("full", lambda xs, a: torch.full(a["shape"], a["value"], dtype=getattr(torch, a["dtype"])),
            description="a tensor of attr shape filled with value; attrs shape, value, dtype", num_inputs=(0, 0))
register_op("sizes", lambda xs, a: torch.tensor(a["values"], dtype=torch.int64).reshape(a["shape"]),
            description="an int64 tensor of sizes (expressions over the graph's symbols); attrs values, shape",
            num_inputs=(0, 0))
