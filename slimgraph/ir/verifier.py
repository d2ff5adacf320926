"""verify(graph): the IR's invariants, checked from scratch."""

from __future__ import annotations

from slimgraph.errors import VerificationError
from slimgraph.ir.graph import Graph
from slimgraph.ir.ops import OPAQUE, get_op, infer_types
from slimgraph.ir.value import Use


def verify(graph: Graph, check_shapes: bool = True) -> None:
    """Raise VerificationError on the first broken invariant, naming the node.

    Checks: every input is defined before use (so the order is topological and acyclic),
    every use is recorded on both sides, names are unique, ops are registered, and each
    canonical node's output types match what the registry infers.
    """
    defined: set[int] = {id(v) for v in graph.inputs}
    names: set[str] = set()
    for v in list(graph.inputs) + list(graph.constants.values()):
        if v.name in names:
            raise VerificationError(f"duplicate value name %{v.name}")
        names.add(v.name)
    for name, v in graph.constants.items():
        if v.const_value is None or v.name != name:
            raise VerificationError(f"constant table entry {name!r} is not a constant named so")
        defined.add(id(v))

    expected_uses: dict[int, list[Use]] = {}
    for node in graph.nodes:
        if node.graph is not graph:
            raise VerificationError(f"node {node.name} does not point back to its graph")
        if node.op != OPAQUE and get_op(node.op) is None:
            raise VerificationError(f"node {node.name}: unknown op {node.op!r}")
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                where = "later in the graph (cycle or bad order)" if v.producer else "nowhere"
                raise VerificationError(f"node {node.name}: input {i} %{v.name} is defined {where}")
            expected_uses.setdefault(id(v), []).append(Use(node, i))
        for j, v in enumerate(node.outputs):
            if v.producer is not node or v.output_index != j:
                raise VerificationError(f"node {node.name}: output %{v.name} has a wrong producer")
            if v.name in names:
                raise VerificationError(f"duplicate value name %{v.name}")
            names.add(v.name)
            defined.add(id(v))
        if check_shapes and node.op != OPAQUE:
            inferred = infer_types(node)
            actual = [(v.shape, v.dtype) for v in node.outputs]
            if inferred != actual:
                raise VerificationError(
                    f"node {node.name} ({node.op}): output types {actual} differ from inferred {inferred}"
                )

    for v in graph.values():
        want = expected_uses.get(id(v), [])
        if sorted(map(_key, v.uses)) != sorted(map(_key, want)):
            raise VerificationError(f"value %{v.name}: recorded uses differ from the graph's")
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerificationError(f"graph output %{v.name} is not defined in the graph")


def _key(use: Use) -> tuple[int, int]:
    return (id(use.node), use.index)
