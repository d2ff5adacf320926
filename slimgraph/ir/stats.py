"""Size and cost of a graph: parameters, MACs, nodes, bytes of constants."""

from __future__ import annotations

from slimgraph.ir.graph import Graph
from slimgraph.ir.ops import OPAQUE, get_op


def graph_stats(graph: Graph) -> dict[str, int]:
    params = sum(v.numel for v in graph.constants.values() if v.uses)
    nbytes = sum(v.const_value.numel() * v.const_value.element_size() for v in graph.constants.values() if v.uses)
    macs = 0
    opaque = 0
    for node in graph.nodes:
        if node.op == OPAQUE:
            opaque += 1
            continue
        opdef = get_op(node.op)
        if opdef is not None and opdef.macs is not None:
            macs += opdef.macs(node)
    return {"params": params, "macs": macs, "nodes": len(graph), "bytes": nbytes, "opaque": opaque}


def opaque_ops(graph: Graph) -> dict[str, int]:
    """What stayed opaque: each original op (its import path or ONNX type) and how many nodes call it,
    most frequent first."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == OPAQUE:
            target = repr(node.attrs["impl"])
            counts[target] = counts.get(target, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_opaque(counts: dict[str, int]) -> str:
    return ", ".join(f"{target} x{n}" if n > 1 else target for target, n in counts.items())
