"""Ops that read or write by computed indices: embedding lookups, gathers, scatters, sorting, and
the reorderings that go with them (flip, tile, cumulative sums).

Indexed axes are frozen for pruning: which channel lands where depends on index values.
"""

from __future__ import annotations

import torch

from slimgraph.ir.coupling import Coupling, frozen, inp, out, same
from slimgraph.ir.opdefs.elementwise import reduce_coupling as mixing_coupling
from slimgraph.ir.ops import register_op


def _all_frozen(node) -> list[Coupling]:
    dims = [inp(i, a) for i, v in enumerate(node.inputs) if v is not None for a in range(v.rank)]
    dims += [out(i, a) for i, v in enumerate(node.outputs) for a in range(v.rank)]
    return [frozen(*dims)] if dims else []


def embedding_coupling(node) -> list[Coupling]:
    """weight [num, dim] and ids [...]: the output is ids' dims then dim, which prunes with the
    table's columns; the rows (the vocabulary) are indexed, so frozen."""
    weight, ids = node.inputs
    lead = [same(inp(1, a), out(0, a)) for a in range(ids.rank)]
    return lead + [same(inp(0, 1), out(0, ids.rank)), frozen(inp(0, 0))]


register_op(
    "embedding",
    lambda xs, a: torch.nn.functional.embedding(xs[1], xs[0]),
    description="rows of table input 0 at the integer ids of input 1 (nn.Embedding)",
    num_inputs=(2, 2),
    coupling=embedding_coupling,
    macs=lambda node: 0,
)


def take_coupling(node) -> list[Coupling]:
    x, idx = node.inputs
    axis = node.attrs["axis"] % x.rank
    couplings = [same(inp(0, a), out(0, a if a < axis else a + idx.rank - 1)) for a in range(x.rank) if a != axis]
    return couplings + [frozen(inp(0, axis), *[inp(1, a) for a in range(idx.rank)],
                               *[out(0, axis + a) for a in range(idx.rank)])]


def take_ref(xs, a):
    x, idx = xs
    return x[_index_tuple(x, [a["axis"] % x.dim()], [idx])]  # negative indices count from the end


register_op("take", take_ref, description="x indexed along axis by an integer tensor (its dims replace the axis, "
            "negative indices count from the end: ONNX Gather)", num_inputs=(2, 2), coupling=take_coupling)
register_op("gather_elements", lambda xs, a: torch.gather(xs[0], a["axis"], xs[1].long()),
            description="torch.gather: out[i][j] = x[index[i][j]][j] along axis", num_inputs=(2, 2),
            coupling=_all_frozen)


def _index_tuple(x: torch.Tensor, axes: list[int], indices: list[torch.Tensor]) -> tuple:
    index: list = [slice(None)] * x.dim()
    for axis, idx in zip(axes, indices):
        index[axis] = idx if idx.dtype == torch.bool else idx.long()
    return tuple(index)


register_op(
    "index",
    lambda xs, a: xs[0][_index_tuple(xs[0], a["axes"], xs[1:])],
    description="advanced indexing x[..., i0, ..., i1, ...]: integer tensors inputs 1.. at attr axes",
    num_inputs=(2, -1),
    coupling=_all_frozen,
)


def index_put_ref(xs, a):
    """The axes it does not index are None up to the last it does (aten's index_put takes those;
    Tensor.index_put takes neither None nor slices)."""
    x, values, indices = xs[0], xs[1], xs[2:]
    index: list = [None] * (max(a["axes"]) + 1)
    for axis, idx in zip(a["axes"], indices):
        index[axis] = idx if idx.dtype == torch.bool else idx.long()
    return torch.ops.aten.index_put(x, index, values.to(x.dtype), a.get("accumulate", False))


register_op(
    "index_put",
    index_put_ref,
    description="x with x[..., i0, ...] = values (or += with accumulate); inputs x, values, indices at attr axes",
    num_inputs=(3, -1),
    coupling=_all_frozen,
)

_SCATTER_REDUCE = {"sum": "sum", "prod": "prod", "amax": "amax", "amin": "amin"}


def scatter_ref(xs, a):
    x, index, src = xs[0], xs[1].long(), xs[2]
    reduce = a.get("reduce", "none")
    if reduce == "none":
        return torch.scatter(x, a["axis"], index, src)
    return torch.scatter_reduce(x, a["axis"], index, src, _SCATTER_REDUCE[reduce], include_self=True)


register_op("scatter", scatter_ref, description="torch.scatter / scatter_reduce along axis; attr reduce "
            "none|sum|prod|amax|amin (ONNX ScatterElements)", num_inputs=(3, 3), coupling=_all_frozen)

register_op("cumsum", lambda xs, a: torch.cumsum(xs[0], a["axis"]), description="cumulative sum along axis",
            coupling=mixing_coupling("axis"))


def flip_coupling(node) -> list[Coupling]:
    flipped = {d % node.inputs[0].rank for d in node.attrs["dims"]}
    return [frozen(inp(0, a), out(0, a)) if a in flipped else same(inp(0, a), out(0, a))
            for a in range(node.inputs[0].rank)]


register_op("flip", lambda xs, a: torch.flip(xs[0], a["dims"]), description="reverse along dims",
            coupling=flip_coupling)
register_op("tile", lambda xs, a: xs[0].repeat(a["repeats"]),
            description="Tensor.repeat: tile by repeats (leading new dims allowed)", coupling=_all_frozen)


def _topk(xs, a):
    values, indices = torch.topk(xs[0], a["k"], a["axis"], a.get("largest", True), True)
    return values, indices


def _sort(xs, a):
    values, indices = torch.sort(xs[0], dim=a["axis"], descending=a.get("descending", False), stable=True)
    return values, indices


register_op("topk", _topk, description="k largest (or smallest) along axis, sorted; outputs values, indices",
            coupling=_all_frozen)
register_op("sort", _sort, description="stable sort along axis; outputs values, indices", coupling=_all_frozen)
register_op(
    "diagonal",
    lambda xs, a: torch.diagonal(xs[0], a.get("offset", 0), a["dim1"], a["dim2"]),
    description="the diagonal of dims dim1, dim2 (moved last), shifted by offset",
    coupling=_all_frozen,
)
