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
