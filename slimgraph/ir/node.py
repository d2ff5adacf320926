"""Node: one operation. Its inputs and outputs are Values; mutate through Graph or set_input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimgraph.ir.value import Use, Value

if TYPE_CHECKING:
    from slimgraph.ir.graph import Graph


class Node:
    """An op applied to input Values, producing output Values.

    ``attrs`` holds plain Python data (ints, floats, strings, lists); ``meta`` records origin
    (the frontend node or the pass that created it) and is never interpreted by the IR.
    An input may be None for an omitted optional operand (a conv without bias).
    """

    __slots__ = ("op", "name", "_inputs", "outputs", "attrs", "meta", "graph")

    def __init__(self, op: str, name: str, attrs: dict[str, Any] | None = None) -> None:
        self.op = op
        self.name = name
        self._inputs: list[Value | None] = []
        self.outputs: tuple[Value, ...] = ()
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def output(self) -> Value:
        """The single output; raises for multi-output nodes to catch mistakes early."""
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.name} ({self.op}) has {len(self.outputs)} outputs")
        return self.outputs[0]

    def set_input(self, index: int, value: Value | None) -> None:
        """Rewire one input, keeping both use lists consistent."""
        old = self._inputs[index]
        if old is not None:
            old.uses.remove(Use(self, index))
        self._inputs[index] = value
        if value is not None:
            value.uses.append(Use(self, index))
        if self.graph is not None:
            self.graph.touch()

    def _attach_inputs(self, inputs: list[Value | None]) -> None:
        self._inputs = list(inputs)
        for i, v in enumerate(self._inputs):
            if v is not None:
                v.uses.append(Use(self, i))

    def _detach_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v.uses.remove(Use(self, i))
        self._inputs = [None] * len(self._inputs)

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op})"
