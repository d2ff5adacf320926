"""Channel-coupling analysis: which tensor channels must be removed together.

Built only from the op registry's coupling declarations (``ir/coupling.py``); no op names.

A *space* is a channel dimension of one value: ``(value, axes)``, usually one axis (a conv's
output channels, axis 1), sometimes several (a reshape that splits channels into
``[groups, channels per group]`` for a channel shuffle or attention heads). Each index of a
space is an *atom*. Couplings union atoms into *classes*: removing a channel means removing
every atom of its class, so the graph stays consistent by construction:

  same     atom i of one dim is atom i of the others (residual adds, BatchNorm, permutes, ...)
  concat   output atom offset_j + i is atom i of input j; split is the inverse
  group    a grouped conv: filters, inputs and bias per channel, plus the weight's within-group
           axis tied to position c % (C / groups), so every group keeps the same positions
  reshape  probed with an index tensor: merging channels with trailing dims (flatten ->
           linear) maps many atoms to one channel; splitting them ties the rows, so the kept
           channels always form a rectangle
  heads    attention: each head's dims across q, k, v and the output are one class, so heads
           go as whole units
  normalized  a LayerNorm's normalized channels: linked like ``same`` when the analysis is asked
           to (``normalized=True``; removing one changes the statistics of the rest, so the
           result is no longer exact), else frozen
  anything else (reductions over the channel, group statistics, slices, opaque ops, graph
  inputs and outputs) *freezes* the class: it is never pruned.

Exploration starts from the output channels of every conv and linear weight and walks the
graph space by space.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from slimgraph.ir import OPAQUE, Graph, Node, Value, get_op
from slimgraph.ir.coupling import Coupling, DimRef

SpaceKey = tuple[int, tuple[int, ...]]  # (id(value), axes)


@dataclass
class Space:
    value: Value
    axes: tuple[int, ...]
    base: int  # id of atom 0
    size: int

    def atoms(self) -> range:
        return range(self.base, self.base + self.size)


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: list[bool] = []
        self.reasons: dict[int, str] = {}  # frozen root -> why

    def add(self, n: int) -> int:
        base = len(self.parent)
        self.parent.extend(range(base, base + n))
        self.frozen.extend([False] * n)
        return base

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if self.frozen[rb] and not self.frozen[ra]:
                self.reasons[ra] = self.reasons.get(rb, "")
            self.frozen[ra] = self.frozen[ra] or self.frozen[rb]

    def union_many(self, pairs: Iterable[tuple[int, int]]) -> None:
        """``union(a, b)`` for every pair, in order (the same result), with find inlined: the
        analysis of a deep network makes tens of thousands of these."""
        parent, frozen, reasons = self.parent, self.frozen, self.reasons
        for a, b in pairs:
            ra = a
            while parent[ra] != ra:
                ra = parent[ra]
            while parent[a] != ra:
                parent[a], a = ra, parent[a]
            rb = b
            while parent[rb] != rb:
                rb = parent[rb]
            while parent[b] != rb:
                parent[b], b = rb, parent[b]
            if ra != rb:
                parent[rb] = ra
                if frozen[rb] and not frozen[ra]:
                    reasons[ra] = reasons.get(rb, "")
                frozen[ra] = frozen[ra] or frozen[rb]

    def freeze(self, a: int, reason: str = "") -> None:
        root = self.find(a)
        if not self.frozen[root]:
            self.reasons[root] = reason
        self.frozen[root] = True

    def reason(self, a: int) -> str:
        return self.reasons.get(self.find(a), "") if self.is_frozen(a) else ""

    def is_frozen(self, a: int) -> bool:
        return self.frozen[self.find(a)]


@dataclass
class ChannelGroups:
    """The result: spaces, atom classes, frozen flags, and the prunable seeds (layer outputs)."""

    graph: Graph
    spaces: dict[SpaceKey, Space]
    uf: UnionFind
    seeds: list[tuple[Node, Space]]  # conv/linear nodes and their weight's output-channel space
    by_value: dict[int, list[Space]]  # id(value) -> its spaces

    def root(self, atom: int) -> int:
        return self.uf.find(atom)

    def roots(self) -> np.ndarray:
        """The class root of every atom (computed once; the analysis is read-only afterwards)."""
        if getattr(self, "_roots", None) is None or len(self._roots) != len(self.uf.parent):
            roots = np.array(self.uf.parent, dtype=np.int64)
            while True:  # pointer jumping: each step doubles the distance climbed; a root points to itself
                up = roots[roots]
                if np.array_equal(up, roots):
                    break
                roots = up
            self._roots = roots
        return self._roots

    def frozen(self, atom: int) -> bool:
        return self.uf.is_frozen(atom)

    def frozen_mask(self) -> np.ndarray:
        """``frozen(atom)`` for every atom at once (read now: ``ignore`` freezes after the analysis)."""
        return np.asarray(self.uf.frozen, dtype=bool)[self.roots()]

    def reason(self, atom: int) -> str:
        """Why the atom's class is frozen ("" if it is not)."""
        return self.uf.reason(atom)

    def spaces_of(self, value: Value) -> list[Space]:
        return self.by_value.get(id(value), [])


def _couplings(node: Node) -> list[Coupling]:
    if node.op == OPAQUE:
        return []
    opdef = get_op(node.op)
    return opdef.coupling(node) if opdef is not None and opdef.coupling is not None else []


def _port_value(node: Node, ref: DimRef) -> Value | None:
    values = node.inputs if ref.port == "in" else node.outputs
    return values[ref.index] if ref.index < len(values) else None


class _Builder:
    def __init__(self, graph: Graph, normalized: bool = False) -> None:
        self.graph = graph
        self.normalized = normalized
        self.uf = UnionFind()
        self.spaces: dict[SpaceKey, Space] = {}
        self.by_value: dict[int, list[Space]] = {}
        self.queue: deque[Space] = deque()
        self.outputs = {id(v) for v in graph.outputs}
        self.inputs = {id(v) for v in graph.inputs}
        self.coupling_cache: dict[int, list[Coupling]] = {}
        self.reshaped: set[tuple[int, SpaceKey]] = set()  # (reshape node, space it created)

    # ------------------------------------------------------------------ spaces and atoms
    def space(self, value: Value, axes: tuple[int, ...], alias: Space | None = None) -> Space:
        """The space of ``value`` over ``axes``; a new one may share ``alias``'s atoms (an identity
        mapping: no unions needed, which keeps the union-find small on deep networks)."""
        key = (id(value), axes)
        space = self.spaces.get(key)
        if space is None:
            size = math.prod(value.shape[a] for a in axes)
            base = alias.base if alias is not None and alias.size == size else self.uf.add(size)
            space = Space(value, axes, base, size)
            self.spaces[key] = space
            self.by_value.setdefault(id(value), []).append(space)
            self.queue.append(space)
        return space

    def freeze(self, space: Space, reason: str) -> None:
        for atom in space.atoms():
            self.uf.freeze(atom, reason)

    def union_spaces(self, a: Space, b: Space, mapping: np.ndarray | None = None) -> None:
        """Union atom i of ``a`` with atom mapping[i] of ``b`` (identity by default)."""
        if mapping is None and a.base == b.base:
            return  # shared atoms
        targets = range(b.base, b.base + b.size) if mapping is None else [b.base + j for j in mapping.tolist()]
        self.uf.union_many(zip(range(a.base, a.base + a.size), targets))

    # ------------------------------------------------------------------ walk
    def run(self) -> ChannelGroups:
        seeds = []
        for node in self.graph.nodes:
            if node.op in ("conv", "linear") and node.inputs[1] is not None and node.inputs[1].is_constant:
                seeds.append((node, self.space(node.inputs[1], (0,))))
        while self.queue:
            self.visit(self.queue.popleft())
        return ChannelGroups(self.graph, self.spaces, self.uf, seeds, self.by_value)

    def visit(self, space: Space) -> None:
        value = space.value
        if id(value) in self.outputs:
            self.freeze(space, f"%{value.name} is a graph output")
        if id(value) in self.inputs:
            self.freeze(space, f"%{value.name} is a graph input")
        if value.is_constant and len(space.axes) > 1:
            self.freeze(space, f"constant %{value.name} would be cut along several axes")
        if value.producer is not None:
            self.link(space, value.producer, "out", value.output_index)
        for use in value.uses:
            self.link(space, use.node, "in", use.index)

    def couplings(self, node: Node) -> list[Coupling]:
        key = id(node)
        if key not in self.coupling_cache:
            self.coupling_cache[key] = _couplings(node)
        return self.coupling_cache[key]

    def link(self, space: Space, node: Node, port: str, index: int) -> None:
        """Carry ``space`` (on ``node``'s port) to the node's other ports, or freeze it."""
        found: dict[int, Coupling] = {}
        for coupling in self.couplings(node):
            for ref in coupling.dims:
                if ref.port == port and ref.index == index and ref.axis in space.axes:
                    found[ref.axis] = coupling
        if node.op == OPAQUE:
            return self.freeze(space, f"node {node.name} is opaque")
        me = DimRef(port, index, space.axes[0])  # type: ignore[arg-type]
        if len(space.axes) == 1 and any(c.kind == "group" and c.params[1] == me for c in self.couplings(node)):
            return  # a grouped conv's within-group weight axis: linked when its channels were
        if len(found) != len(space.axes):
            return self.freeze(space, f"node {node.name} ({node.op}) does not declare these channels")
        kinds = {c.kind for c in found.values()}
        if kinds == {"unused"}:
            return  # only the operand's shape matters along these channels
        if self.normalized:
            kinds = {"same" if k == "normalized" else k for k in kinds}
        if any(c.kind == "select" for c in self.couplings(node)):
            return self.link_select(space, node, port, found)
        if kinds == {"same"}:
            return self.link_same(space, node, port, index, found)
        if kinds == {"reshape"}:
            return self.link_reshape(space, node, port, index)
        if len(space.axes) != 1 or len(kinds) != 1:
            return self.freeze(space, f"node {node.name} ({node.op}) mixes couplings on these channels")
        coupling = found[space.axes[0]]
        if coupling.kind in ("concat", "split"):
            return self.link_offsets(space, node, coupling, me)
        if coupling.kind == "group":
            return self.link_group(space, node, coupling, me)
        if coupling.kind == "heads":
            return self.link_heads(space, node, coupling)
        return self.freeze(space, f"node {node.name} ({node.op}): {coupling.kind} channels")

    def link_same(self, space: Space, node: Node, port: str, index: int, found: dict[int, Coupling]) -> None:
        """Each axis maps to one axis on every other port: same flat indices there."""
        targets: dict[tuple[str, int], list[int]] = {}
        for axis in space.axes:
            for ref in found[axis].dims:
                if (ref.port, ref.index) != (port, index):
                    targets.setdefault((ref.port, ref.index), []).append(ref.axis)
        for (p, i), axes in targets.items():
            value = _port_value(node, DimRef(p, i, 0))  # type: ignore[arg-type]
            if value is None:
                continue
            if len(axes) != len(space.axes):
                # the port sees some of the axes (matmul over attention heads: the heads axis goes
                # on, the head dim is contracted): those axes keep their size, the port is unchanged
                seen = [k for k, a in enumerate(space.axes) if any(ref.port == p and ref.index == i
                                                                   for ref in found[a].dims)]
                self.tie_along(space, seen)
                continue
            other = self.space(value, tuple(axes), alias=space)
            if other.size != space.size:
                return self.freeze(space, f"node {node.name} ({node.op}): channel counts differ")
            self.union_spaces(space, other)

    def tie_along(self, space: Space, positions: list[int]) -> None:
        """Union atoms that differ only along ``space.axes[k]`` for k in ``positions``: those axes
        then always keep their whole size (the rectangle rule, for an axis that must not shrink)."""
        grid = np.arange(space.size).reshape([space.value.shape[a] for a in space.axes])
        anchor = grid
        for k in positions:
            anchor = anchor.take([0], axis=k)
        for atom, first in zip(grid.reshape(-1), np.broadcast_to(anchor, grid.shape).reshape(-1)):
            if atom != first:
                self.uf.union(space.base + int(atom), space.base + int(first))

    def link_select(self, space: Space, node: Node, port: str, found: dict[int, Coupling]) -> None:
        """select: the output is one index of the input's axis. A space over that axis and others
        (swin's q, k, v taken from one [3, heads, dim] projection) maps its slice at the index; the
        axis keeps its size, so the index stays valid. A channel space selected from is frozen."""
        x, y = node.inputs[0], node.outputs[0]
        axis, index = next((c.dims[0].axis, c.params[0]) for c in self.couplings(node) if c.kind == "select")
        if port == "in":
            if axis not in space.axes or len(space.axes) == 1:
                if axis in space.axes:
                    return self.freeze(space, f"node {node.name} selects one of these channels")
                return self.link_same(space, node, port, 0, found)
            whole = space
        else:
            in_axes = {a if a < axis else a + 1 for a in space.axes} | {axis}
            whole = next((sp for sp in self.spaces_of(x) if set(sp.axes) == in_axes), None)
            if whole is None:
                return self.link_same(space, node, port, 0, found)
        position = whole.axes.index(axis)
        self.tie_along(whole, [position])
        part_axes = tuple(a if a < axis else a - 1 for a in whole.axes if a != axis)
        part = space if port == "out" and space.axes == part_axes else self.space(y, part_axes)
        grid = np.arange(whole.size).reshape([x.shape[a] for a in whole.axes])
        self.union_spaces(part, whole, grid.take(index, axis=position).reshape(-1))

    def spaces_of(self, value: Value) -> list[Space]:
        return self.by_value.get(id(value), [])

    def link_offsets(self, space: Space, node: Node, coupling: Coupling, me: DimRef) -> None:
        """concat / split: the whole dim is the parts laid end to end."""
        whole, parts = coupling.dims[0], coupling.dims[1:]
        offsets = coupling.params
        if me == whole:
            for ref, offset in zip(parts, offsets):
                part = self.space(_port_value(node, ref), (ref.axis,))
                self.union_spaces(part, space, np.arange(offset, offset + part.size))
        else:
            k = parts.index(me)
            whole_space = self.space(_port_value(node, whole), (whole.axis,))
            self.union_spaces(space, whole_space, np.arange(offsets[k], offsets[k] + space.size))

    def link_group(self, space: Space, node: Node, coupling: Coupling, me: DimRef) -> None:
        """Grouped conv: the channel dims move together; the weight's within-group axis follows
        position c % (C / groups), which ties the same position in every group."""
        groups, within = coupling.params
        channel_dims = coupling.dims
        for ref in channel_dims:
            if ref != me:
                self.union_spaces(space, self.space(_port_value(node, ref), (ref.axis,), alias=space))
        per_group = space.size // groups
        inner = self.space(_port_value(node, within), (within.axis,))
        self.union_spaces(space, inner, np.arange(space.size) % per_group)

    def link_heads(self, space: Space, node: Node, coupling: Coupling) -> None:
        """Attention: every dim of head h (in q, k, v and the output) joins head h's first atom here."""
        heads = coupling.params[0]
        dims = [self.space(_port_value(node, ref), (ref.axis,), alias=space) for ref in coupling.dims]
        if any(d.size % heads for d in dims):
            return self.freeze(space, f"node {node.name} ({node.op}): {heads} heads do not divide the channels")
        head_size = space.size // heads
        for dim in dims:
            per_head = dim.size // heads
            for atom in range(dim.size):
                self.uf.union(dim.base + atom, space.base + atom // per_head * head_size)

    def link_reshape(self, space: Space, node: Node, port: str, index: int) -> None:
        """Probe the reshape with a tensor of channel indices to see where each channel lands."""
        if (id(node), (id(space.value), space.axes)) in self.reshaped:
            return  # this space was made by probing this very reshape: already linked
        x, y = node.inputs[0], node.outputs[0]
        src, dst = (x, y) if port == "in" else (y, x)
        # probe[coords] = flat index over the space's axes, in the space's axis order
        sizes = [src.shape[a] for a in space.axes]
        grid = np.arange(space.size).reshape(sizes).transpose(np.argsort(space.axes))
        expand = [1] * len(src.shape)
        for a, n in zip(space.axes, sizes):
            expand[a] = n
        landed = np.broadcast_to(grid.reshape(expand), src.shape).reshape(dst.shape)
        varying = tuple(a for a in range(len(dst.shape))
                        if dst.shape[a] > 1 and not (landed == landed.take([0], axis=a)).all())
        if not varying:
            return self.freeze(space, f"node {node.name}: reshape loses the channels")
        mapped = landed[tuple(slice(None) if a in varying else slice(0, 1) for a in range(len(dst.shape)))]
        if not (np.broadcast_to(mapped, dst.shape) == landed).all():
            return self.freeze(space, f"node {node.name}: channels mix with other dims")
        # the dims may already carry a space in another axis order (a channel shuffle's transpose,
        # reached again from the far side): reuse it, so one tensor never holds two overlapping spaces
        existing = next((sp for sp in self.spaces_of(dst) if set(sp.axes) == set(varying)), None)
        other = existing or self.space(dst, varying)
        self.reshaped.add((id(node), (id(dst), other.axes)))
        grid = mapped.reshape([dst.shape[a] for a in varying])
        flat = grid.transpose([varying.index(a) for a in other.axes]).reshape(-1)
        if existing is None and len(varying) > 1 and other.size == space.size:
            # channels split over several axes: tie the rows so kept channels stay a rectangle
            inner = dst.shape[varying[-1]]
            for atom in range(other.size):
                self.uf.union(other.base + atom, other.base + atom % inner)
        for atom, channel in enumerate(flat):
            self.uf.union(other.base + atom, space.base + int(channel))


def analyze(graph: Graph, normalized: bool = False) -> ChannelGroups:
    """The channel classes of ``graph``; ``normalized`` lets LayerNorm'd channels be pruned."""
    return _Builder(graph, normalized).run()
