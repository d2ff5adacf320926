"""Cleanup passes: dead code elimination and identity removal."""

from __future__ import annotations

from dataclasses import dataclass

from slimgraph.ir import Graph, Node
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass


def eliminate_dead_code(graph: Graph) -> dict[str, int]:
    """Remove nodes none of whose outputs reach a graph output, then unused constants."""
    removed_nodes = removed_consts = 0
    outputs = {id(v) for v in graph.outputs}
    for node in reversed(graph.nodes):
        if all(not v.uses and id(v) not in outputs for v in node.outputs):
            graph.remove_node(node)
            removed_nodes += 1
    for value in list(graph.constants.values()):
        if not value.uses and id(value) not in outputs:
            graph.remove_constant(value)
            removed_consts += 1
    return {"nodes_removed": removed_nodes, "constants_removed": removed_consts}


@register_pass
@dataclass
class DeadCodeElimination(Pass):
    name = "dce"
    description = "remove nodes and constants that no graph output depends on"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = eliminate_dead_code(graph)
        return PassResult(any(stats.values()), stats)


def _is_scalar_const(node: Node, index: int, number: float) -> bool:
    v = node.inputs[index]
    return v is not None and v.is_constant and v.const_value.numel() == 1 and float(v.const_value) == number


def is_identity(node: Node) -> bool:
    """True when the node returns its first input unchanged (same shape, dtype and values)."""
    x = node.inputs[0] if node.inputs else None
    if x is None or len(node.outputs) != 1:
        return False
    y = node.outputs[0]
    if (x.shape, x.dtype) != (y.shape, y.dtype):
        return False
    op, a = node.op, node.attrs
    if op == "identity":
        return True
    if op in ("reshape", "flatten", "squeeze", "unsqueeze", "expand", "cast", "concat"):
        return len(node.inputs) == 1
    if op == "permute":
        return list(a["perm"]) == sorted(a["perm"])
    if op == "slice":
        return all(s == 0 and e >= x.shape[ax] and st == 1
                   for ax, s, e, st in zip(a["axes"], a["starts"], a["ends"], a["steps"]))
    if op in ("dropout", "stochastic_depth"):
        return a.get("p", 0.0) == 0.0
    if op in ("add", "sub"):
        return _is_scalar_const(node, 1, 0.0)
    if op == "div" and a.get("rounding_mode") and x.dtype.torch.is_floating_point:
        return False  # trunc(x / 1), floor(x / 1): x rounded
    if op in ("mul", "div"):
        return _is_scalar_const(node, 1, 1.0)
    return False


@register_pass
@dataclass
class RemoveIdentity(Pass):
    name = "remove-identity"
    description = "bypass nodes that return their input unchanged (identity, no-op reshapes, x*1, ...)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for node in graph.nodes:
            if node.graph is None or not is_identity(node):
                continue
            graph.replace_all_uses_with(node.outputs[0], node.inputs[0])
            graph.remove_node(node)
            removed += 1
        return PassResult(removed > 0, {"removed": removed})
