"""Deterministic text form of a graph, one line per node, made to be diffed.

Names are the values' own names (never renumbered), so changing one node changes only its lines.
"""

from __future__ import annotations

import hashlib
from typing import Any

from slimgraph.ir.graph import Graph
from slimgraph.ir.node import Node
from slimgraph.ir.ops import OPAQUE
from slimgraph.ir.symbolic import SymDim

LONG = 16  # lists longer than this print their head, length and a digest (a change still shows)


def format_attr(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 8))
    if isinstance(value, (list, tuple)):
        items = [format_attr(v) for v in value]
        if len(items) > LONG:
            digest = hashlib.sha1(",".join(items).encode()).hexdigest()[:8]
            return "[" + ",".join(items[:8]) + f",... {len(items)} items #{digest}]"
        return "[" + ",".join(items) + "]"
    if isinstance(value, str):
        return value
    if isinstance(value, SymDim):  # as shapes print: the expression, not the traced example's size
        return str(value).replace(" ", "")
    return repr(value)


def format_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type_str()}" for v in node.outputs)
    args = ", ".join("_" if v is None else f"%{v.name}" for v in node.inputs)
    attrs = {k: v for k, v in node.attrs.items() if k != "impl"}
    op = node.op
    if node.op == OPAQUE:
        op = f"opaque<{node.attrs['impl'].target}>"
    text = f"{outs} = {op}({args})"
    if attrs:
        text += " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(attrs.items())) + "}"
    return text


def _constants_by_first_use(graph: Graph) -> list:
    """Constants in the order the nodes first read them, then those only returned in the order of
    the outputs, then unread ones: the printout does not depend on the order a frontend or pass
    happened to create them in."""
    order = {id(v): i for i, v in enumerate(graph.constants.values())}
    first: dict[int, tuple[int, int]] = {}
    for position, node in enumerate(graph.nodes):
        for index, v in enumerate(node.inputs):
            if v is not None and id(v) in order:
                first.setdefault(id(v), (position, index))
    for index, v in enumerate(graph.outputs):
        if id(v) in order:
            first.setdefault(id(v), (len(graph.nodes), index))
    return sorted(graph.constants.values(), key=lambda v: (first.get(id(v), (len(graph.nodes) + 1, 0)), order[id(v)]))


def print_graph(graph: Graph, constants: bool = True) -> str:
    lines = [f"graph {graph.name}("]
    lines += [f"    %{v.name}: {v.type_str()}," for v in graph.inputs]
    lines.append(") {")
    if constants:
        lines += [f"  const %{v.name}: {v.type_str()}" for v in _constants_by_first_use(graph)]
    lines += [f"  {format_node(n)}" for n in graph.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
