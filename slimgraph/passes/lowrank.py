"""Low-rank factorization: a layer's weight as the product of two thin factors (truncated SVD).

Every candidate layer is seen as a matrix M (m x n) applied as y = M x (+ b), and replaced by
two layers, y = B (A x) + b with A (r x n) first and B (m x r) second:

* linear: M is W (out x in); two linears, the bias on the second.
* conv, ``conv=channel`` (and every 1x1 conv): M is W as cout x (cin*kernel); a conv with r
  filters of the original kernel, stride, pads and dilation, then a 1x1 conv (Denton et al. 2014).
* conv, ``conv=spatial``: M[(o, j), (c, i)] = W[o, c, i, j]; a Kx1 conv with r filters, then a
  1xK conv (Jaderberg et al. 2014, scheme 2).

Both factors hold r(m + n) weights against mn, so the rewrite pays only below the break-even
rank mn/(m + n); at or above it the layer is refused and the stats say why.

Trained weights have flat spectra, so ranks chosen from the weights alone land near break-even.
With ``whiten`` the rank comes from the layer's output on calibration inputs instead: with
C = E[x xᵀ] = L Lᵀ, the output error E|(M - M')x|² is |(M - M')L|²_F, so the SVD of M L
truncated and multiplied back by L⁻¹ is the best rank-r layer on that data (SVD-LLM's whitening).

``scope=global`` with ``params_ratio`` spends one budget (that share of all candidates'
parameters) where it keeps the most: every singular value of every layer is a step that costs
m + n parameters and keeps s² / Σs² of its layer's (whitened) energy, and the steps are taken
best value per parameter first. A layer whose rank so reaches break-even stays whole, its
parameters are taken from the budget, and the rest is shared again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from slimgraph.errors import PassError
from slimgraph.ir import Graph, Node, run
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass

ConvMode = Literal["channel", "spatial", "off"]

# Ridge added to the input covariance, relative to its mean eigenvalue: keeps the Cholesky
# factor well conditioned where some inputs never vary (e.g. always-zero pixels).
WHITEN_DAMPING = 1e-2


@dataclass
class Candidate:
    """One layer seen as y = M x + b, with how its factors become nodes."""

    node: Node
    kind: Literal["linear", "channel", "spatial"]
    m: int
    n: int

    @property
    def break_even(self) -> float:
        return self.m * self.n / (self.m + self.n)

    @property
    def bias_numel(self) -> int:
        b = self.node.inputs[2] if len(self.node.inputs) > 2 else None
        return b.numel if b is not None else 0


def weight_matrix(cand: Candidate) -> torch.Tensor:
    """The layer's weight as the float64 matrix M (m x n)."""
    w = cand.node.inputs[1].const_value.double()
    if cand.kind == "linear":
        return w
    if cand.kind == "channel":
        return w.reshape(w.shape[0], -1)
    cout, cin, kh, kw = w.shape
    return w.permute(0, 3, 1, 2).reshape(cout * kw, cin * kh)


def candidate(node: Node, conv: ConvMode) -> Candidate | str:
    """The node as a factorization candidate, or the reason it is not one."""
    w = node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if not w.is_constant or (b is not None and not b.is_constant):
        return "weight or bias is computed, not a constant"
    if not w.const_value.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    shape = tuple(w.shape)
    if node.op == "linear":
        return Candidate(node, "linear", shape[0], shape[1])
    kernel = shape[2:]
    if node.attrs["groups"] != 1:
        return "grouped or depthwise conv"
    if conv == "off":
        return "convs are off (conv=off)"
    if all(k == 1 for k in kernel) or conv == "channel":
        return Candidate(node, "channel", shape[0], math.prod(shape[1:]))
    if len(kernel) != 2 or 1 in kernel:
        return f"spatial split needs a 2-D kernel larger than 1 both ways, not {'x'.join(map(str, kernel))}"
    cout, cin, kh, kw = shape
    return Candidate(node, "spatial", cout * kw, cin * kh)


def rewrite(graph: Graph, cand: Candidate, a: torch.Tensor, b: torch.Tensor) -> Node:
    """Replace the layer by its two factors A (r x n, applied first) and B (m x r).

    Returns the second node; the original node and its orphaned weight are removed.
    """
    node = cand.node
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    r, dtype = a.shape[0], w.const_value.dtype
    if cand.kind == "linear":
        wa, wb = a, b
        first_attrs: dict[str, Any] = {}
        second_attrs: dict[str, Any] = {}
    elif cand.kind == "channel":
        cout, cin, *kernel = w.shape
        wa = a.reshape(r, cin, *kernel)
        wb = b.reshape(cout, r, *[1] * len(kernel))
        first_attrs = dict(node.attrs)
        nd = len(kernel)
        second_attrs = {"stride": [1] * nd, "pads": [0] * (2 * nd), "dilation": [1] * nd, "groups": 1}
    else:  # spatial: the vertical taps first, then the horizontal ones
        cout, cin, kh, kw = w.shape
        at = node.attrs
        (sh, sw), (dh, dw), (ph0, pw0, ph1, pw1) = at["stride"], at["dilation"], at["pads"]
        wa = a.reshape(r, cin, kh, 1)
        wb = b.reshape(cout, kw, r).permute(0, 2, 1).unsqueeze(2)
        first_attrs = {"stride": [sh, 1], "pads": [ph0, 0, ph1, 0], "dilation": [dh, 1], "groups": 1}
        second_attrs = {"stride": [1, sw], "pads": [0, pw0, 0, pw1], "dilation": [1, dw], "groups": 1}
    meta = {"origin": f"lowrank:{node.name}"}
    ca = graph.add_constant(f"{w.name}_v", wa.to(dtype).contiguous(), trainable=True)
    cb = graph.add_constant(f"{w.name}_u", wb.to(dtype).contiguous(), trainable=True)
    first = graph.create_node(node.op, [x, ca, None], first_attrs, name=f"{node.name}_v", before=node, meta=meta)
    second = graph.create_node(node.op, [first.output, cb, bias], second_attrs, name=f"{node.name}_u",
                               before=node, meta=meta)
    graph.replace_all_uses_with(node.output, second.output)
    graph.remove_node(node)
    if not w.uses and w not in graph.outputs:
        graph.remove_constant(w)
    return second


def factor(
    m: torch.Tensor, rank: int, chol: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (r x n), B (m x r) with B A the best rank-r approximation of M (in float64), and the
    singular values of what was truncated.

    With ``chol`` (L, the Cholesky factor of the input covariance) "best" is measured on the
    layer's output: M L is truncated and the result multiplied back by L⁻¹.
    """
    m = m.double()
    target = m if chol is None else m @ chol
    if target.shape[0] < target.shape[1]:  # LAPACK is about 2x faster on the tall orientation
        vt, s, ut = torch.linalg.svd(target.T, full_matrices=False)
        u, vh = ut.T, vt.T
    else:
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    if chol is not None:  # A = A_w L⁻¹, i.e. solve A L = A_w
        a = torch.linalg.solve_triangular(chol, a, upper=False, left=False)
    return a, b, s


def _batches(data: Any) -> Iterator[tuple[torch.Tensor, ...]]:
    """Calibration data as input tuples: a tensor is one batch, else an iterable of batches."""
    if isinstance(data, torch.Tensor):
        yield (data,)
        return
    for item in data:
        yield (item,) if isinstance(item, torch.Tensor) else tuple(item)


def _features(cand: Candidate, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's input as rows of the vectors M multiplies, or None where that is not a column."""
    node = cand.node
    if cand.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    if cand.kind != "channel" or x.dim() != 4:
        return None
    w, at = node.inputs[1], node.attrs
    ph0, pw0, ph1, pw1 = at["pads"]
    x = F.pad(x, [pw0, pw1, ph0, ph1])
    cols = F.unfold(x, tuple(w.shape[2:]), dilation=at["dilation"], stride=at["stride"])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # channel-major, like W.reshape(cout, -1)


def input_covariances(graph: Graph, cands: list[Candidate], data: Any) -> dict[Node, torch.Tensor]:
    """E[x xᵀ] (float64) of each candidate's input vectors over the calibration batches."""
    wanted = {c.node.inputs[0] for c in cands}
    sums: dict[Node, torch.Tensor] = {}
    counts: dict[Node, int] = {}
    for batch in _batches(data):
        _, captured = run(graph, list(batch), capture=wanted)
        for c in cands:
            rows = _features(c, captured[c.node.inputs[0]])
            if rows is None:
                continue
            rows = rows.double()
            sums[c.node] = sums.get(c.node, 0) + rows.T @ rows
            counts[c.node] = counts.get(c.node, 0) + rows.shape[0]
    return {node: s / counts[node] for node, s in sums.items()}


def whitening_factor(cov: torch.Tensor) -> torch.Tensor | None:
    """L with L Lᵀ = cov + damping; None for an input that is always zero."""
    mean_eig = float(cov.diagonal().mean())
    if mean_eig <= 0:
        return None
    damped = cov + WHITEN_DAMPING * mean_eig * torch.eye(cov.shape[0], dtype=cov.dtype)
    return torch.linalg.cholesky(damped)


def _share(part: torch.Tensor, whole: torch.Tensor, if_zero: float) -> float:
    """part / whole, or ``if_zero`` for an all-zero weight (torchvision zero-inits some heads)."""
    return float(part / whole) if float(whole) > 0 else if_zero


def global_budget_ranks(cands: list[Candidate], spectra: dict[Node, torch.Tensor], ratio: float
                        ) -> dict[Node, int]:
    """Each candidate's rank under one budget of ``ratio`` x their parameters (see the module
    docstring); a layer left whole gets the rank of its full matrix (at or above break-even)."""
    total = sum(c.m * c.n + c.bias_numel for c in cands)
    whole: set[Node] = set()
    while True:
        budget = ratio * total - sum(c.m * c.n + c.bias_numel for c in cands if c.node in whole)
        steps = []  # (energy kept per parameter, layer index) for every singular value
        for i, c in enumerate(cands):
            if c.node in whole:
                continue
            budget -= c.bias_numel
            energy = spectra[c.node].double().square()
            share = energy / energy.sum().clamp_min(1e-300)
            steps += [(float(v) / (c.m + c.n), i) for v in share]
        steps.sort(key=lambda step: -step[0])
        ranks = {c.node: 0 for c in cands}
        for _, i in steps:
            cost = cands[i].m + cands[i].n
            if cost > budget:
                continue  # a cheaper step of a smaller layer may still fit
            budget -= cost
            ranks[cands[i].node] += 1
        newly_whole = {c.node for c in cands if c.node not in whole and ranks[c.node] * (c.m + c.n) >= c.m * c.n}
        if not newly_whole:
            break
        whole |= newly_whole
    for c in cands:
        if c.node in whole:
            ranks[c.node] = min(c.m, c.n)
    return ranks


@register_pass
@dataclass
class LowRank(Pass):
    """Factor linear and conv layers into two thin ones; exactly one of the three rank options."""

    name = "lowrank"
    description = "linear and conv layers as two low-rank factors (truncated SVD), where it saves parameters"
    exact = False

    rank_ratio: float | None = None  # r / min(m, n)
    energy: float | None = None  # share of squared singular values kept (those of M L with whiten)
    params_ratio: float | None = None  # the factors' share of the layer's parameters (bias included)
    conv: ConvMode = "channel"  # how KxK convs are split; 1x1 convs follow linears unless off
    whiten: bool = False  # rank and factors from the layer's output on calibration inputs
    scope: Literal["layer", "global"] = "layer"  # global: params_ratio over all layers, ranks from spectra

    def __post_init__(self) -> None:
        given = [k for k in ("rank_ratio", "energy", "params_ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PassError(f"pass 'lowrank' needs exactly one of rank_ratio, energy, params_ratio "
                            f"(got {', '.join(given) or 'none'})")
        key = given[0]
        value = getattr(self, key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (0 < value < 1 if key == "params_ratio" else 0 < value <= 1):
            bounds = "in (0, 1)" if key == "params_ratio" else "in (0, 1]"
            raise PassError(f"pass 'lowrank' option {key!r}: {value!r} is not {bounds}")
        if self.conv not in ("channel", "spatial", "off"):
            raise PassError(f"pass 'lowrank' option 'conv': {self.conv!r} is not one of channel, spatial, off")
        if self.scope not in ("layer", "global"):
            raise PassError(f"pass 'lowrank' option 'scope': {self.scope!r} is not layer or global")
        if self.scope == "global" and self.params_ratio is None:
            raise PassError("pass 'lowrank' option 'scope': global spends a parameter budget; give params_ratio")

    def planned_rank(self, cand: Candidate) -> int | None:
        """The rank the shape alone decides (None: it needs the spectrum)."""
        if self.scope == "global":
            return None
        if self.rank_ratio is not None:
            return max(1, math.floor(self.rank_ratio * min(cand.m, cand.n)))
        if self.params_ratio is not None:
            nb = cand.bias_numel
            return math.floor((self.params_ratio * (cand.m * cand.n + nb) - nb) / (cand.m + cand.n))
        return None

    def energy_rank(self, s: torch.Tensor) -> int:
        share = torch.cumsum(s.square(), 0) / s.square().sum().clamp_min(1e-300)
        return int((share < self.energy - 1e-12).sum()) + 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers: dict[str, dict[str, Any]] = {}
        cands: list[Candidate] = []
        for node in graph.nodes:
            if node.op not in ("linear", "conv"):
                continue
            found = candidate(node, self.conv)
            if isinstance(found, str):
                layers[node.name] = {"refused": found}
                continue
            info = layers[node.name] = {"kind": found.kind, "shape": f"{found.m}x{found.n}",
                                        "break_even": round(found.break_even, 1)}
            planned = self.planned_rank(found)
            if planned is not None and (reason := self._refusal(found, planned)):
                info.update(rank=planned, refused=reason)  # no SVD, no calibration for these
                continue
            cands.append(found)

        covs: dict[Node, torch.Tensor] = {}
        if self.whiten and cands:
            data = ctx.calibration_data if ctx.calibration_data is not None else ctx.example_inputs
            if data is None:
                raise PassError("pass 'lowrank' option 'whiten': needs ctx.calibration_data or example_inputs")
            covs = input_covariances(graph, cands, data)

        chols = {c.node: whitening_factor(covs[c.node]) if c.node in covs else None for c in cands}
        global_ranks = {}
        if self.scope == "global":
            spectra = {c.node: torch.linalg.svdvals(weight_matrix(c) if chols[c.node] is None
                                                    else weight_matrix(c) @ chols[c.node]) for c in cands}
            global_ranks = global_budget_ranks(cands, spectra, self.params_ratio)
        plans = []  # decide everything before the first edit: refusals leave the graph untouched
        for cand in cands:
            info = layers[cand.node.name]
            chol = chols[cand.node]
            if self.whiten:
                info["whitened"] = chol is not None
            rank = global_ranks[cand.node] if self.scope == "global" else self.planned_rank(cand)
            if rank is None:
                matrix = weight_matrix(cand)
                rank = self.energy_rank(torch.linalg.svdvals(matrix if chol is None else matrix @ chol))
            info["rank"] = rank
            if reason := self._refusal(cand, rank):
                info["refused"] = reason
                continue
            plans.append((cand, chol, rank))

        params_before = params_after = 0
        for cand, chol, rank in plans:
            info = layers[cand.node.name]
            matrix = weight_matrix(cand)
            a, b, s = factor(matrix, rank, chol)
            info["energy"] = round(_share(s[:rank].square().sum(), s.square().sum(), 1.0), 6)
            residual = matrix - b @ a
            info["rel_error"] = _share(torch.linalg.norm(residual), torch.linalg.norm(matrix), 0.0)
            if chol is not None:  # relative RMS error of M x on the calibration data (undamped)
                cov = covs[cand.node]
                info["output_error"] = _share(((residual @ cov) * residual).sum().clamp_min(0).sqrt(),
                                              ((matrix @ cov) * matrix).sum().sqrt(), 0.0)
            info["params_before"] = cand.m * cand.n + cand.bias_numel
            info["params_after"] = rank * (cand.m + cand.n) + cand.bias_numel
            params_before += info["params_before"]
            params_after += info["params_after"]
            rewrite(graph, cand, a, b)

        stats = {"factored": len(plans), "refused": sum("refused" in v for v in layers.values()),
                 "params_before": params_before, "params_after": params_after, "layers": layers}
        return PassResult(bool(plans), stats)

    @staticmethod
    def _refusal(cand: Candidate, rank: int) -> str | None:
        if rank < 1:
            return "the parameter budget allows no rank >= 1"
        if rank * (cand.m + cand.n) >= cand.m * cand.n:
            return (f"rank {rank} >= break-even {cand.break_even:.1f} = mn/(m+n) for {cand.m}x{cand.n}: "
                    f"it would save nothing")
        return None
