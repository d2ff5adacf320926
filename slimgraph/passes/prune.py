"""Structured channel pruning with dependency propagation.

``prune{ratio=0.5, criterion=l1, scope=uniform, round_to=1, ignore=[...], min_channels=1}``

1. The channel analysis (``channels.py``) puts every channel of every tensor into a class of
   channels that must go together, and freezes what cannot be removed safely.
2. A *group* is a set of layers (conv/linear outputs) whose channels share classes: a residual
   stream, a dense block's concatenations, a grouped conv and its neighbours.
3. Importance per class: the criterion over every weight slice in the class, averaged. The
   ``activation`` criterion looks at the data too (Wanda, Sun et al. 2024, made structured): a
   channel that a linear or conv reads scores |W[:, j]|₂ |x_j|₂, its weight column times how
   much signal it carries on the calibration inputs; a head or an FFN channel is only as
   important as what it feeds forward.
4. Selection: the lowest ``ratio`` of each group's prunable classes (``uniform``) or of all
   classes with importance normalized per group (``global``); every layer keeps at least
   ``min_channels`` and, with ``round_to``, a multiple of it.
5. The plan removes indices from constants by value name; applying it slices the constants,
   rewrites the attributes that spell sizes (reshape targets, split sizes, depthwise groups)
   and re-infers every shape. ``zero_plan`` is the exactness oracle: zeroing the same slices in
   the original gives the pruned model's outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from slimgraph.errors import PassError, SlimgraphError
from slimgraph.ir import Graph, Node, run
from slimgraph.ir.ops import infer_types
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.calibration import check_batches
from slimgraph.passes.channels import ChannelGroups, Space, analyze

Criterion = Literal["l1", "l2", "std", "mean", "bn_gamma", "random", "activation"]
CRITERIA = ("l1", "l2", "std", "mean", "bn_gamma", "random", "activation")


@dataclass
class PrunePlan:
    """What to remove: per value name, per axis group, the removed flat indices."""

    removed: dict[str, dict[tuple[int, ...], list[int]]] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)  # report for the trace
    frozen_by_opaque: dict[str, int] = field(default_factory=dict)  # opaque op -> layers it keeps whole

    @property
    def empty(self) -> bool:
        return not any(any(v for v in axes.values()) for axes in self.removed.values())


# ============================================================================ importance
def _weight_scores(tensor: torch.Tensor, axis: int, criterion: Criterion) -> torch.Tensor:
    """Per-index score of a weight along ``axis``, reduced over every other axis."""
    w = tensor.detach().float()
    dims = tuple(d for d in range(w.dim()) if d != axis)
    if criterion == "l1":
        return w.abs().sum(dims)
    if criterion == "l2":
        return torch.linalg.vector_norm(w, 2, dims)
    if criterion == "std":
        return w.std(dims, unbiased=False)
    return w.mean(dims).abs()  # "mean"


@dataclass
class ActivationNorms:
    """|x_j|₂ over the calibration batches, by id of the weight of the linear or (ungrouped) conv:
    of the channels it reads (``inputs``) and of those it writes (``outputs``)."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


def activation_norms(graph: Graph, batches: list) -> ActivationNorms:
    layers = [n for n in graph.nodes if n.op in ("linear", "conv") and n.inputs[1].is_constant
              and (n.op == "linear" or n.attrs["groups"] == 1) and not n.inputs[0].is_constant]
    values = list({id(v): v for n in layers for v in (n.inputs[0], n.outputs[0])}.values())
    sums = ActivationNorms()
    for batch in batches:
        _, captured = run(graph, list(batch), capture=values)
        for n in layers:
            for x, into in ((n.inputs[0], sums.inputs), (n.outputs[0], sums.outputs)):
                t = captured[x].detach().double().square()  # channels: last dim of a linear's, dim 1 of a conv's
                per_channel = (t.reshape(-1, t.shape[-1]).sum(0) if n.op == "linear"
                               else t.transpose(0, 1).flatten(1).sum(1))
                into[id(n.inputs[1])] = into.get(id(n.inputs[1]), 0) + per_channel
    root = lambda sums: {k: v.sqrt() for k, v in sums.items()}  # noqa: E731
    return ActivationNorms(root(sums.inputs), root(sums.outputs))


def class_importance(cg: ChannelGroups, criterion: Criterion, seed: int = 0,
                     norms: ActivationNorms | None = None) -> dict[int, float]:
    """Importance of every class: the criterion averaged over the class's weight slices. For
    ``activation``: over the slices some layer reads (|W[:, j]|₂ |x_j|₂); a class no layer reads
    as such (q and k dims, which a matmul of activations reads) by the norms of the outputs it
    is made of, which the whole group then shares."""
    if criterion == "activation":
        norms = norms or ActivationNorms()
        read = _mean_by_class(cg, norms.inputs, 1, lambda value, n: _weight_scores(value.const_value, 1, "l2") * n)
        made = _mean_by_class(cg, norms.outputs, 0, lambda value, n: n)
        return {**made, **read}
    parts: list[tuple[np.ndarray, np.ndarray]] = []  # (class of each index, its score), space by space
    bn_gammas = {id(n.inputs[1]) for n in cg.graph.nodes if n.op == "batch_norm" and n.inputs[1] is not None}
    for space in cg.spaces.values():
        value = space.value
        if not value.is_constant or len(space.axes) != 1 or not value.const_value.is_floating_point():
            continue
        if criterion == "bn_gamma":
            if id(value) not in bn_gammas:
                continue
            scores = value.const_value.detach().double().abs()
        elif criterion == "random":
            continue
        else:
            if value.rank < 2:
                continue  # biases and norm parameters: a different scale, and no filter shape
            scores = _weight_scores(value.const_value, space.axes[0], criterion)
        parts.append((cg.roots()[space.base:space.base + space.size], scores.detach().double().numpy()))
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        roots = sorted({cg.root(a) for space in cg.spaces.values() for a in space.atoms()})
        return dict(zip(roots, torch.rand(len(roots), generator=gen, dtype=torch.float64).tolist()))
    return _class_means(parts)


def _mean_by_class(cg: ChannelGroups, norms: dict[int, torch.Tensor], axis: int, score) -> dict[int, float]:
    """The mean of ``score(weight value, norms)`` per class over the weight slices along ``axis``
    of the layers ``norms`` holds."""
    parts = []
    for space in cg.spaces.values():
        value = space.value
        n = norms.get(id(value))
        if n is None or not value.is_constant or space.axes != (axis,) or n.shape[0] != value.shape[axis]:
            continue
        parts.append((cg.roots()[space.base:space.base + space.size], score(value, n).detach().double().numpy()))
    return _class_means(parts)


def _class_means(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[int, float]:
    if not parts:
        return {}
    roots = np.concatenate([r for r, _ in parts])
    # bincount adds the scores one by one in this order: the same sums as a running Python total
    totals = np.bincount(roots, weights=np.concatenate([s for _, s in parts]))
    counts = np.bincount(roots)
    classes, first = np.unique(roots, return_index=True)
    classes = classes[np.argsort(first, kind="stable")].tolist()  # in order of first appearance
    return {root: total / n for root, total, n in zip(classes, totals[classes].tolist(), counts[classes].tolist())}


# ============================================================================ groups and selection
@dataclass
class _Group:
    layers: list[tuple[Node, Space]]
    classes: list[int]  # prunable class roots


def pruning_groups(cg: ChannelGroups) -> list[_Group]:
    """Layers whose output channels share classes form one group."""
    parent = list(range(len(cg.seeds)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # every prunable output channel of every layer: its class, and the layer (seed) it belongs to
    atoms = np.concatenate([np.arange(space.base, space.base + space.size, dtype=np.int64)
                            for _, space in cg.seeds] + [np.zeros(0, dtype=np.int64)])
    layer = np.repeat(np.arange(len(cg.seeds)), [space.size for _, space in cg.seeds])
    prunable = ~cg.frozen_mask()[atoms]
    classes, layer = cg.roots()[atoms][prunable], layer[prunable]
    # a class is owned by the first layer holding it; every other layer holding it joins that group
    distinct, first, which = np.unique(classes, return_index=True, return_inverse=True)
    owner_of = layer[first]
    order = np.argsort(first, kind="stable")  # classes in order of discovery
    owned: dict[int, list[int]] = {}  # seed -> the classes it owns, in order of discovery
    for root, k in zip(distinct[order].tolist(), owner_of[order].tolist()):
        owned.setdefault(k, []).append(root)
    for k, o in set(zip(layer.tolist(), owner_of[which].tolist())):
        if k != o:
            parent[find(k)] = find(o)
    groups: dict[int, _Group] = {}
    for k, (node, space) in enumerate(cg.seeds):
        classes = owned.get(k, [])
        group = groups.setdefault(find(k), _Group([], []))
        group.layers.append((node, space))
        group.classes.extend(classes)
    return [g for g in groups.values() if g.classes]


def select(cg: ChannelGroups, groups: list[_Group], importance: dict[int, float], ratio: float,
           scope: str, round_to: int, min_channels: int) -> tuple[set[int], list[dict[str, Any]]]:
    """The classes to remove, and a report per group."""
    targets, ranking = _targets(groups, importance, ratio, round_to, normalized=scope == "global")
    budget = _Budget(cg, groups, min_channels)
    if scope == "uniform":
        _select_uniform(budget, ranking, targets)
    else:
        _select_global(budget, ranking, ratio)
    return budget.removed, _report(cg, groups, budget)


@dataclass
class _Ranking:
    """Every scored class, group after group: its score, its group's index and the class.

    The scores stay the Python floats they were made as: with a NaN, Python's sort decides the order (see ``order``),
    and it compares floats by identity before value."""

    scores: list[float]
    group_of: list[int]
    class_of: list[int]

    def order(self, by_group: bool = False) -> np.ndarray:
        """Positions in the order of ``sorted(zip(scores, group_of, class_of))``: lowest score first, ties by group,
        then class. With ``by_group``, the same order regrouped: group by group, each by score then class.

        The triples are distinct, so without NaN numpy's lexsort finds the one order there is. Python's sort leaves
        NaN unordered and its result depends on the whole list: with a NaN, Python sorts, over every group at once."""
        score = np.asarray(self.scores, dtype=np.float64)
        group = np.asarray(self.group_of, dtype=np.int64)
        if np.isnan(score).any():
            order = np.array(sorted(range(len(score)), key=lambda i: (self.scores[i], self.group_of[i],
                                                                      self.class_of[i])), dtype=np.int64)
            return order[np.argsort(group[order], kind="stable")] if by_group else order
        cls = np.asarray(self.class_of, dtype=np.int64)
        return np.lexsort((cls, score, group) if by_group else (cls, group, score))

    def per_group(self, n_groups: int) -> list[list[int]]:
        """Each group's classes, lowest ranked first."""
        order = self.order(by_group=True)
        bounds = np.searchsorted(np.asarray(self.group_of, dtype=np.int64)[order], np.arange(n_groups + 1)).tolist()
        classes = np.asarray(self.class_of, dtype=np.int64)[order].tolist()
        return [classes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _targets(groups: list[_Group], importance: dict[int, float], ratio: float, round_to: int,
             normalized: bool) -> tuple[list[int], _Ranking]:
    """Per group, how many classes the uniform scope removes: ``ratio`` of its scored classes, fewer where needed
    for the number kept to be a multiple of ``round_to`` (or all of them). And the ranking of every scored class;
    ``normalized`` (the global scope) divides the scores by their group's mean so that groups compare."""
    targets: list[int] = []
    ranking = _Ranking([], [], [])
    for gi, g in enumerate(groups):
        scored = [c for c in g.classes if c in importance]
        values = [importance[c] for c in scored]
        n = len(scored)
        keep = n - math.floor(ratio * n)
        keep = min(n, math.ceil(keep / round_to) * round_to)
        targets.append(n - keep)
        if normalized:
            mean = (sum(values) / n if n else 1.0) or 1.0
            values = [v / mean for v in values]
        ranking.scores += values
        ranking.group_of += [gi] * n
        ranking.class_of += scored
    return targets, ranking


class _Budget:
    """The removed classes, and what each layer may still lose: every layer keeps at least ``min_channels`` of the
    classes it holds (frozen and unscored ones count as kept). Groups share no layer: all is kept per group."""

    def __init__(self, cg: ChannelGroups, groups: list[_Group], min_channels: int) -> None:
        roots = cg.roots()
        self.min_channels = min_channels
        self.layer_classes = [[set(roots[s.base:s.base + s.size].tolist()) for _, s in g.layers] for g in groups]
        self.remaining = [[len(cs) for cs in layers] for layers in self.layer_classes]  # what each layer still holds
        self.removed: set[int] = set()
        self.removed_in = [0] * len(groups)  # per group
        self.clamped = [0] * len(groups)  # per group: classes left in place for min_channels
        self._holders: dict[int, dict[int, list[int]]] = {}  # group -> class -> its layers holding it, on first use

    def take(self, gi: int, cls: int) -> bool:
        """Remove class ``cls`` of group ``gi`` unless a layer holding it would keep fewer than min_channels."""
        if gi not in self._holders:
            self._holders[gi] = {}
            for k, cs in enumerate(self.layer_classes[gi]):
                for c in cs:
                    self._holders[gi].setdefault(c, []).append(k)
        holders = self._holders[gi].get(cls, [])
        remaining = self.remaining[gi]
        if any(remaining[k] - 1 < self.min_channels for k in holders):
            self.clamped[gi] += 1
            return False
        for k in holders:
            remaining[k] -= 1
        self.removed.add(cls)
        self.removed_in[gi] += 1
        return True

    def take_all(self, gi: int, classes: list[int]) -> bool:
        """Remove all of ``classes`` (distinct, of group ``gi``) if every layer holding one of them keeps
        min_channels: what ``take`` one by one would do then. Otherwise remove none."""
        gone = set(classes)
        lost = [len(cs & gone) for cs in self.layer_classes[gi]]
        remaining = self.remaining[gi]
        if any(n and remaining[k] - n < self.min_channels for k, n in enumerate(lost)):
            return False
        self.remaining[gi] = [r - n for r, n in zip(remaining, lost)]
        self.removed |= gone
        self.removed_in[gi] += len(gone)
        return True


def _select_uniform(budget: _Budget, ranking: _Ranking, targets: list[int]) -> None:
    """Each group removes its lowest-ranked classes until it reaches its target, passing over (clamping) those
    ``budget`` refuses. Groups share no layer: each goes on its own."""
    for gi, ranked in enumerate(ranking.per_group(len(targets))):
        # fast path: one by one, the first `target` classes would all go, none clamped, exactly when removing them
        # together leaves every layer min_channels; take_all checks that once, and only groups that clamp loop
        if budget.take_all(gi, ranked[:targets[gi]]):
            continue
        for cls in ranked:
            if budget.removed_in[gi] >= targets[gi]:
                break
            budget.take(gi, cls)


def _select_global(budget: _Budget, ranking: _Ranking, ratio: float) -> None:
    """The lowest-ranked classes of all groups go, ``ratio`` of every scored class, passing over (clamping) those
    ``budget`` refuses."""
    total = math.floor(ratio * len(ranking.class_of))
    order = ranking.order()
    for gi, cls in zip(np.asarray(ranking.group_of)[order].tolist(), np.asarray(ranking.class_of)[order].tolist()):
        if len(budget.removed) >= total:
            break
        budget.take(gi, cls)


def _report(cg: ChannelGroups, groups: list[_Group], budget: _Budget) -> list[dict[str, Any]]:
    """Per group: its layers, its classes, how many were removed and clamped, and each layer's removed channels."""
    roots = cg.roots()
    removed_mask = np.zeros(len(roots), dtype=bool)
    removed_mask[list(budget.removed)] = True
    return [{
        "layers": [n.name for n, _ in g.layers],
        "channels": len(g.classes),
        "removed": budget.removed_in[gi],
        "clamped": budget.clamped[gi],
        # a layer's classes are its group's: the layer's removed channels are those in the group's removed classes
        "removed_per_layer": {n.name: np.flatnonzero(removed_mask[roots[s.base:s.base + s.size]]).tolist()
                              for n, s in g.layers},
    } for gi, g in enumerate(groups)]


def make_plan(graph: Graph, removed_classes: set[int], cg: ChannelGroups, reports: list[dict]) -> PrunePlan:
    plan = PrunePlan(groups=reports)
    roots = cg.roots()
    removed_mask = np.zeros(len(roots), dtype=bool)
    removed_mask[list(removed_classes)] = True
    for space in cg.spaces.values():
        gone = np.flatnonzero(removed_mask[roots[space.base:space.base + space.size]]).tolist()
        if gone:
            plan.removed.setdefault(space.value.name, {})[space.axes] = gone
    return plan


# ============================================================================ applying a plan
def _kept(size: int, gone: list[int]) -> torch.Tensor:
    mask = np.ones(size, dtype=bool)
    mask[gone] = False
    return torch.from_numpy(np.flatnonzero(mask).astype(np.int64))


def _new_shape(value_shape: tuple[int, ...], axes_removed: dict[tuple[int, ...], list[int]]) -> list[int]:
    shape = list(value_shape)
    touched: set[int] = set()
    for axes, gone in axes_removed.items():
        if touched & set(axes):
            raise SlimgraphError(f"two channel spaces overlap on axes {axes}")
        touched |= set(axes)
        size = math.prod(value_shape[a] for a in axes)
        kept = size - len(gone)
        outer = size // value_shape[axes[-1]]
        if kept % outer:
            raise SlimgraphError(f"channels over axes {axes} do not stay rectangular")
        shape[axes[-1]] = kept // outer  # rows are tied: only the innermost axis shrinks
    return shape


def apply_plan(graph: Graph, plan: PrunePlan) -> None:
    """Slice constants, update size attributes and re-infer every shape."""
    by_name = {v.name: v for v in graph.values()}
    planned: dict[int, list[int]] = {}
    kept: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # a layer's weight, bias, norm: one index
    for name, axes_removed in plan.removed.items():
        value = by_name.get(name)
        if value is None:
            raise SlimgraphError(f"prune plan names %{name}, which is not in the graph")
        planned[id(value)] = _new_shape(value.shape, axes_removed)
        if value.is_constant:
            tensor = value.const_value
            for axes, gone in axes_removed.items():
                key = (tensor.shape[axes[0]], tuple(gone))
                if key not in kept:
                    kept[key] = _kept(key[0], gone)
                tensor = tensor.index_select(axes[0], kept[key])
            value.const_value = tensor.contiguous()
            value.shape = tuple(tensor.shape)
    for node in graph.nodes:
        _update_attrs(node, planned)
        types = infer_types(node)
        for value, (shape, dtype) in zip(node.outputs, types):
            expected = planned.get(id(value), list(value.shape))
            if list(shape) != list(expected):
                raise SlimgraphError(f"pruning node {node.name} ({node.op}): inferred {shape}, planned "
                                     f"{tuple(expected)} (a coupling declaration is wrong)")
            value.shape, value.dtype = tuple(shape), dtype
    graph.touch()


def _update_attrs(node: Node, planned: dict[int, list[int]]) -> None:
    """Attributes that spell channel counts follow the new shapes."""
    out = node.outputs[0] if node.outputs else None
    if node.op == "conv":
        x, w = node.inputs[0], node.inputs[1]
        groups = node.attrs["groups"]
        new_cin = x.shape[1]
        if groups > 1 and w.shape[1] == 1 and new_cin != groups:  # depthwise: one group per channel
            node.attrs["groups"] = new_cin
    elif node.op in ("reshape", "expand", "expand_batch") and out is not None and id(out) in planned:
        target = list(node.attrs["shape"])
        for axis, (old, new) in enumerate(zip(out.shape, planned[id(out)])):
            if old != new and target[axis] not in (-1, "N"):
                target[axis] = new
        node.attrs["shape"] = target
    elif node.op == "split":
        axis = node.attrs["axis"]
        node.attrs["sizes"] = [planned.get(id(v), list(v.shape))[axis] for v in node.outputs]
    elif "num_heads" in node.attrs and id(out) in planned:  # whole heads went: the head size stays
        head_size = out.shape[-1] // node.attrs["num_heads"]
        node.attrs["num_heads"] = planned[id(out)][-1] // head_size
    elif node.op == "layer_norm":
        k = len(node.attrs["normalized_shape"])
        node.attrs["normalized_shape"] = list(node.inputs[0].shape[-k:])


def zero_plan(graph: Graph, plan: PrunePlan) -> None:
    """The oracle: zero, in place, every constant slice the plan would remove."""
    by_name = {v.name: v for v in graph.constants.values()}
    for name, axes_removed in plan.removed.items():
        value = by_name.get(name)
        if value is None:
            continue
        tensor = value.const_value.clone()
        for axes, gone in axes_removed.items():
            index = [slice(None)] * tensor.dim()
            index[axes[0]] = torch.tensor(gone)
            tensor[tuple(index)] = 0
        value.const_value = tensor


def plan_pruning(graph: Graph, ratio: float, criterion: Criterion = "l1", scope: str = "uniform",
                 round_to: int = 1, ignore: list[str] | None = None, min_channels: int = 1,
                 seed: int = 0, cg: ChannelGroups | None = None, only_groups: set[int] | None = None,
                 normalized: str = "freeze", norms: ActivationNorms | None = None) -> PrunePlan:
    """Analyze, score and select; ``only_groups`` restricts pruning to those group indices.
    ``normalized`` only matters when ``cg`` is not given (a given analysis already decided it)."""
    cg = cg or analyze(graph, normalized=normalized == "prune")
    for name in ignore or []:
        node = graph.find_node(name)
        if node is None:
            raise PassError(f"pass 'prune' option 'ignore': no node named {name!r}")
        for value in node.outputs:
            for space in cg.spaces_of(value):
                for atom in space.atoms():
                    cg.uf.freeze(atom, f"node {name} is ignored")
    groups = pruning_groups(cg)
    if only_groups is not None:
        groups = [g for k, g in enumerate(groups) if k in only_groups]
    importance = class_importance(cg, criterion, seed, norms)
    removed, reports = select(cg, groups, importance, ratio, scope, round_to, min_channels)
    plan = make_plan(graph, removed, cg, reports)
    plan.frozen_by_opaque = _frozen_by_opaque(graph, cg)
    return plan


def _frozen_by_opaque(graph: Graph, cg: ChannelGroups) -> dict[str, int]:
    """Layers (conv/linear outputs) whose channels reach an opaque op, by that op's target."""
    targets = {n.name: repr(n.attrs["impl"]) for n in graph.nodes if n.op == "opaque"}
    counts: dict[str, int] = {}
    for _, space in cg.seeds:
        reason = cg.reason(space.base) if space.size else ""
        name = reason.removeprefix("node ").removesuffix(" is opaque") if reason.endswith(" is opaque") else None
        if name in targets:
            counts[targets[name]] = counts.get(targets[name], 0) + 1
    return counts


# ============================================================================ the pass
@register_pass
@dataclass
class Prune(Pass):
    name = "prune"
    description = "structured channel pruning; channels that must go together are found by the coupling analysis"
    exact = False
    ratio: float = 0.5
    criterion: Criterion = "l1"
    scope: Literal["uniform", "global"] = "uniform"
    round_to: int = 1
    ignore: list[str] | None = None
    min_channels: int = 1
    seed: int = 0
    # channels a LayerNorm normalizes: "freeze" keeps pruning exact (zero-then-remove holds);
    # "prune" removes them too, as Torch-Pruning does: the statistics change, the trace shows the error
    normalized: Literal["freeze", "prune"] = "freeze"

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise PassError(f"pass 'prune' option 'ratio': {self.ratio} is outside [0, 1)")
        if self.round_to < 1:
            raise PassError(f"pass 'prune' option 'round_to': {self.round_to} must be at least 1")
        if self.min_channels < 1:
            raise PassError(f"pass 'prune' option 'min_channels': {self.min_channels} must be at least 1")
        if self.criterion not in CRITERIA:
            raise PassError(f"pass 'prune' option 'criterion': {self.criterion!r} is not a criterion")
        if self.scope not in ("uniform", "global"):
            raise PassError(f"pass 'prune' option 'scope': {self.scope!r} is not uniform or global")
        if self.normalized not in ("freeze", "prune"):
            raise PassError(f"pass 'prune' option 'normalized': {self.normalized!r} is not freeze or prune")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        norms = None
        if self.criterion == "activation":
            data = ctx.calibration_data
            if data is None and ctx.example_inputs is not None:
                data = [ctx.example_inputs]  # one batch
            if data is None:
                raise PassError("pass 'prune' criterion 'activation' measures channels on calibration_data "
                                "(or the example inputs); give it")
            norms = activation_norms(graph, check_batches(graph, data, "pass 'prune'"))
        plan = plan_pruning(graph, self.ratio, self.criterion, self.scope, self.round_to, self.ignore,
                            self.min_channels, self.seed, normalized=self.normalized, norms=norms)
        notes = [f"{n} layer(s) kept whole: their channels reach opaque op {target}"
                 for target, n in plan.frozen_by_opaque.items()]
        if plan.empty:
            return PassResult(False, {"groups": len(plan.groups), "removed": 0, "notes": notes,
                                      "frozen_by_opaque": plan.frozen_by_opaque})
        apply_plan(graph, plan)
        return PassResult(True, {
            "groups": len(plan.groups),
            "removed": sum(g["removed"] for g in plan.groups),
            "clamped": sum(g["clamped"] for g in plan.groups),
            "per_group": plan.groups,
            "frozen_by_opaque": plan.frozen_by_opaque,
            "notes": notes,
        })
