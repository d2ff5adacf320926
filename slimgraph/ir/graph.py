"""Graph: ordered nodes, inputs, outputs and constants, with the only mutation API.

Every mutation keeps use-def chains consistent by construction and bumps ``version`` so
cached analyses know to recompute. Iterating ``graph.nodes`` yields a snapshot, so a pass may
insert or remove nodes while it walks them (removed nodes have ``node.graph is None``).
"""

from __future__ import annotations

import itertools
import keyword
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from slimgraph.errors import VerificationError
from slimgraph.ir.axes import normalize_axes
from slimgraph.ir.dtypes import DType
from slimgraph.ir.node import Node
from slimgraph.ir.ops import OPAQUE, TensorType, get_op, infer_types
from slimgraph.ir.symbolic import has_symbols, infer_syms
from slimgraph.ir.value import Shape, Value

_NOT_IDENT = re.compile(r"[^0-9A-Za-z_]+")


def clean_name(name: str) -> str:
    """A readable identifier made from any string (names in models are data, never code)."""
    if type(name) is str and len(name) <= 80 and name.isascii() and name.isidentifier() and name[0] != "_" \
            and name[-1] != "_" and not keyword.iskeyword(name):
        return name  # already clean (most names): what the rules below would return
    base = _NOT_IDENT.sub("_", str(name)).strip("_") or "v"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = "v_" + base
    return base[:80]


class Graph:
    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self._nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self._names: set[str] = set()
        self._counters: dict[str, itertools.count] = {}
        self.version = 0
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ queries
    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for node in self._nodes:
            yield from node.outputs

    def find_node(self, name: str) -> Node | None:
        return next((n for n in self._nodes if n.name == name), None)

    def index_of(self, node: Node) -> int:
        return self._nodes.index(node)

    # ------------------------------------------------------------------ naming
    def unique_name(self, base: str) -> str:
        base = clean_name(base)
        if base not in self._names:
            self._names.add(base)
            return base
        counter = self._counters.setdefault(base, itertools.count(1))
        while True:
            name = f"{base}_{next(counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    def touch(self) -> None:
        self.version += 1

    # ------------------------------------------------------------------ creation
    def add_input(self, name: str, shape: Shape, dtype: DType, sym: Sequence | None = None) -> Value:
        """A graph input; ``sym`` names its symbolic dims (per dim: a symbol name or None)."""
        value = Value(self.unique_name(name), shape, dtype)
        if sym is not None and any(s is not None for s in sym):
            import sympy

            value.sym = tuple(None if s is None else sympy.Symbol(s) if isinstance(s, str) else s for s in sym)
        self.inputs.append(value)
        self.touch()
        return value

    def add_constant(self, name: str, tensor: torch.Tensor, trainable: bool = False) -> Value:
        """Register a constant tensor. It is owned by the graph: passes replace, never mutate it."""
        tensor = tensor.detach()
        value = Value(self.unique_name(name), tuple(tensor.shape), DType.from_torch(tensor.dtype), tensor)
        value.meta["trainable"] = trainable
        self.constants[value.name] = value
        self.touch()
        return value

    def create_node(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        output_names: Sequence[str] | None = None,
        output_types: Sequence[TensorType] | None = None,
        before: Node | None = None,
        after: Node | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Node:
        """Create a node, infer its output types (unless given) and insert it.

        Position: before/after an existing node, else at the end of the graph.
        """
        if op != OPAQUE and get_op(op) is None:
            raise VerificationError(f"unknown op {op!r} (register it or use an opaque node)")
        for v in inputs:
            if v is not None and not self._owns(v):
                raise VerificationError(f"op {op}: input %{v.name} does not belong to this graph")
        node = Node(op, self.unique_name(name or op), attrs)
        node.meta.update(meta or {})
        node._attach_inputs(list(inputs))
        try:
            types = list(output_types) if output_types is not None else infer_types(node)
        except Exception:
            node._detach_inputs()
            self._names.discard(node.name)
            raise
        names = list(output_names or [])
        outs = []
        for i, (shape, dtype) in enumerate(types):
            base = names[i] if i < len(names) else (node.name if len(types) == 1 else f"{node.name}_{i}")
            value = Value(self.unique_name(base) if base != node.name else node.name, shape, dtype)
            value.producer, value.output_index = node, i
            outs.append(value)
        node.outputs = tuple(outs)
        normalize_axes(node)  # one sign for axis attrs, whichever frontend or pass wrote them
        if op != OPAQUE and (any(v is not None and v.sym for v in inputs) or has_symbols(node.attrs)):
            opdef = get_op(op)
            syms = infer_syms(node, opdef.shape_reference or opdef.reference)
            for value, sym in zip(outs, syms or ()):
                value.sym = sym
        node.graph = self
        if before is not None:
            self._nodes.insert(self.index_of(before), node)
        elif after is not None:
            self._nodes.insert(self.index_of(after) + 1, node)
        else:
            self._nodes.append(node)
        self.touch()
        return node

    def _owns(self, value: Value) -> bool:
        if value.producer is not None:
            return value.producer.graph is self
        return value in self.inputs or self.constants.get(value.name) is value

    # ------------------------------------------------------------------ mutation
    def replace_all_uses_with(self, old: Value, new: Value) -> None:
        """Point every consumer of ``old`` (graph outputs included) at ``new``."""
        if old is new:
            return
        for use in list(old.uses):
            use.node.set_input(use.index, new)
        self.outputs = [new if o is old else o for o in self.outputs]
        self.touch()

    def set_outputs(self, outputs: Sequence[Value]) -> None:
        self.outputs = list(outputs)
        self.touch()

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are unused (rewire them first)."""
        for v in node.outputs:
            if v.uses or v in self.outputs:
                raise VerificationError(f"cannot remove {node.name}: output %{v.name} is still used")
        node._detach_inputs()
        self._nodes.remove(node)
        node.graph = None
        self.touch()

    def take_name(self, node: Node, removed: Node) -> None:
        """Give ``node`` the names of ``removed`` (already out of the graph), output by output: a
        rewrite that replaces one node by another keeps the names diffs and round trips see."""
        if removed.graph is not None or len(removed.outputs) != len(node.outputs):
            raise VerificationError(f"{node.name} cannot take the names of {removed.name}")
        node.name = removed.name
        for new, old in zip(node.outputs, removed.outputs):
            new.name = old.name
        self.touch()

    def remove_constant(self, value: Value) -> None:
        if value.uses or value in self.outputs:
            raise VerificationError(f"cannot remove constant %{value.name}: still used")
        del self.constants[value.name]
        self.touch()

    def move_before(self, node: Node, anchor: Node) -> None:
        self._nodes.remove(node)
        self._nodes.insert(self.index_of(anchor), node)
        self.touch()

    # ------------------------------------------------------------------ whole-graph
    def clone(self) -> Graph:
        """A structural copy. Constant tensors are shared: the IR never mutates them in place."""
        g = Graph(self.name)
        g.meta = dict(self.meta)
        g._names = set(self._names)
        mapping: dict[int, Value] = {}

        def copy_value(v: Value) -> Value:
            c = Value(v.name, v.shape, v.dtype, v.const_value)
            c.meta, c.sym = dict(v.meta), v.sym
            mapping[id(v)] = c
            return c

        g.inputs = [copy_value(v) for v in self.inputs]
        g.constants = {k: copy_value(v) for k, v in self.constants.items()}
        for node in self._nodes:
            n = Node(node.op, node.name, dict(node.attrs))
            n.meta = dict(node.meta)
            n._attach_inputs([mapping[id(v)] if v is not None else None for v in node.inputs])
            outs = []
            for v in node.outputs:
                c = copy_value(v)
                c.producer, c.output_index = n, v.output_index
                outs.append(c)
            n.outputs = tuple(outs)
            n.graph = g
            g._nodes.append(n)
        g.outputs = [mapping[id(v)] for v in self.outputs]
        return g

    def verify(self) -> None:
        from slimgraph.ir.verifier import verify

        verify(self)

    def __str__(self) -> str:
        from slimgraph.ir.printer import print_graph

        return print_graph(self)
