"""``smooth``: SmoothQuant (Xiao et al., ICML 2023), an exact rewrite that makes activations easier
to quantize.

A transformer's linear inputs carry a few channels with outliers tens of times larger than the
rest; quantized per tensor, those channels set the scale and every other channel keeps only a few
levels. For ``y = x W^T`` any positive per-input-channel ``s`` gives ``y = (x / s)(W diag(s))^T``:
dividing channel j of x by ``s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)`` (measured on the
calibration data) moves part of the outlier into the weights, which are quantized per output
channel and barely notice. ``alpha`` sets how much moves, and no one value suits every model (on
MiniLM 0.6 helps while 0.3 and 0.9 ruin it). By default it is searched: the alpha (or none at all)
whose int8 copy of the graph (dynamic uint8 activations, nearest-rounded int8 weights) comes
closest to the float graph's output, with the scales measured on half the calibration batches and
the error on the other half. The search is end to end because each layer's own error misleads: on
MiniLM the alpha that halves the summed per-layer error makes the sentence embeddings worse than no
smoothing; and held out because scoring on the batches the maxima came from picks too high an alpha.

Where the division goes: into the LayerNorm or linear that makes x when nothing else reads x
(its gamma and beta, or its rows and bias, divided by s: free at run time); else a ``mul`` by
``1 / s`` that the linears reading x share (one elementwise op per smoothed tensor).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch

from slimgraph.errors import PassError
from slimgraph.ir import DType, Graph, Node, Value, run
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.calibration import check_batches
from slimgraph.passes.quantize import Quantize

MIN_SCALE = 1e-5  # a channel that is zero on all calibration data keeps s = 1
ALPHAS = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9)  # searched with alpha=auto
SEARCH_BATCHES = 16  # calibration batches the alpha search runs on


def _smoothable(node: Node) -> bool:
    """A linear with a constant 2-D float32 weight reading a computed float32 tensor."""
    if node.op != "linear" or len(node.inputs) < 2:
        return False
    x, w = node.inputs[0], node.inputs[1]
    return not x.is_constant and x.dtype == DType.float32 and w.is_constant and w.rank == 2 \
        and w.const_value.dtype == torch.float32


def _foldable_producer(graph: Graph, x: Value, readers: list[Node]) -> Node | None:
    """The node that can absorb x / s in its own constants: a layer_norm with constant gamma (and
    beta) over the last dim, or a linear with constant weight and bias, whose output only
    ``readers`` read."""
    node = x.producer
    if node is None or any(o is x for o in graph.outputs) or {id(u.node) for u in x.uses} != {id(r) for r in readers}:
        return None
    params = [v for v in node.inputs[1:] if v is not None]
    if not params or not all(p.is_constant and p.const_value.dtype == torch.float32 for p in params):
        return None
    if node.op == "layer_norm" and len(node.attrs.get("normalized_shape", ())) == 1:
        return node
    if node.op == "linear" and len(params) == 2 and params[0].rank == 2:
        return node
    return None


@register_pass
@dataclass
class Smooth(Pass):
    """SmoothQuant: per-input-channel scales moved from linears' activations into their weights,
    computed on ``calibration_data``; exact in float, it makes per-tensor int8 activations (static
    or dynamic) lose less. Run it before ``quantize``.

    Options: alpha (auto, or a number in (0, 1): how much of the activation range moves into the
    weights; auto searches it, see above), skip (names or fnmatch patterns of linears
    left as they are).
    """

    name = "smooth"
    description = "SmoothQuant: move activation outliers into the weights (exact) before int8 quantization"
    exact = True

    alpha: float | Literal["auto"] = "auto"
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.alpha != "auto" and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                     or not 0 < self.alpha < 1):
            raise PassError(f"pass 'smooth' option 'alpha': {self.alpha!r} is neither auto nor in (0, 1)")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(str(s) for s in self.skip)

    def needs_calibration(self) -> bool:
        return True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if ctx.calibration_data is None:
            raise PassError("pass 'smooth' measures activation ranges on calibration_data; give it "
                            "(optimize(..., calibration_data=batches))")
        groups: dict[int, list[Node]] = {}  # id(x) -> the linears reading x
        for node in graph.nodes:
            if _smoothable(node) and not any(fnmatch.fnmatchcase(node.name, p) for p in self.skip):
                groups.setdefault(id(node.inputs[0]), []).append(node)
        if not groups:
            return PassResult(False, {"smoothed": 0})
        batches = check_batches(graph, ctx.calibration_data, "pass 'smooth'")
        inputs = [readers[0].inputs[0] for readers in groups.values()]
        amax = _channel_maxima(graph, inputs, batches)
        stats: dict = {"smoothed": 0, "folded": {}, "mul": []}
        alpha = self.alpha
        if alpha == "auto":
            # held out: scales from the first half of the batches, error on the second, so that the
            # search cannot pick an alpha that only fits the maxima it measured
            half = max(1, min(len(batches), SEARCH_BATCHES) // 2)
            fit, held = batches[:half], batches[half:2 * half] or batches[:half]
            plan = _plan(groups, inputs, _channel_maxima(graph, inputs, fit))
            reference = [run(graph, list(b))[0].double() for b in held]
            errors = {a: _int8_error(graph, plan, a, held, reference) for a in (None, *ALPHAS)}
            alpha = min(errors, key=errors.get)
            stats["int8_error_by_alpha"] = {str(a).lower(): round(e, 5) for a, e in errors.items()}
        stats["alpha"] = alpha
        if alpha is None:  # smoothing would only add error here
            return PassResult(False, stats)
        _apply(graph, _plan(groups, inputs, amax), alpha, stats)
        return PassResult(True, stats)


def _channel_maxima(graph: Graph, inputs: list[Value], batches: list) -> dict[int, torch.Tensor]:
    """id(x) -> max |x| per last-dim channel over the batches."""
    amax = {id(x): torch.zeros(x.shape[-1]) for x in inputs}
    for batch in batches:
        _, captured = run(graph, list(batch), capture=inputs)
        for x in inputs:
            rows = captured[x].detach().float().abs().reshape(-1, x.shape[-1])
            amax[id(x)] = torch.maximum(amax[id(x)], rows.amax(0))
    return amax


def _plan(groups: dict[int, list[Node]], inputs: list[Value], amax: dict[int, torch.Tensor]) -> list:
    """[(names of the linears reading x, alpha -> s)] for each smoothed x."""
    plan = []
    for x in inputs:
        readers = groups[id(x)]
        wmax = torch.stack([r.inputs[1].const_value.abs().amax(0) for r in readers]).amax(0)
        plan.append(([r.name for r in readers], _scales(amax[id(x)], wmax)))
    return plan


def _scales(amax: torch.Tensor, wmax: torch.Tensor):
    """alpha -> s = amax^alpha / wmax^(1 - alpha), 1 where a channel is zero in either."""
    def scales(alpha: float) -> torch.Tensor:
        s = amax.double().pow(alpha) / wmax.double().pow(1 - alpha)
        ok = (amax > 0) & (wmax > 0) & torch.isfinite(s)
        return torch.where(ok, s.clamp_min(MIN_SCALE), torch.ones_like(s))
    return scales


def _int8_error(graph: Graph, plan: list, alpha: float | None, batches: list, reference: list) -> float:
    """Relative error of the graph's first output, averaged over the batches, when it is smoothed
    with ``alpha`` (None: not at all) and then quantized to int8 (dynamic activations, weights
    rounded to nearest), on a copy."""
    trial = graph.clone()
    if alpha is not None:
        _apply(trial, plan, alpha, {"smoothed": 0, "folded": {}, "mul": []})
    Quantize(activations="dynamic", rounding="nearest", progress=False).run(trial, PassContext())
    errors = []
    for batch, y in zip(batches, reference):
        q = run(trial, list(batch))[0].double()
        errors.append(float((q - y).norm() / y.norm().clamp_min(1e-30)))
    return sum(errors) / len(errors)


def _apply(graph: Graph, plan: list, alpha: float, stats: dict) -> None:
    for names, scales in plan:
        readers = [graph.find_node(n) for n in names]
        _smooth(graph, readers[0].inputs[0], readers, scales(alpha), stats)
        stats["smoothed"] += 1


def _smooth(graph: Graph, x: Value, readers: list[Node], s: torch.Tensor, stats: dict) -> None:
    """x / s for the readers (folded into x's producer, else a mul), W diag(s) in each reader."""
    for r in readers:  # W diag(s): column j of each reader's weight times s_j
        w = r.inputs[1]
        r.set_input(1, graph.add_constant(f"{w.name}_smooth", (w.const_value.double() * s).float()))
        _drop_if_unused(graph, w)
    producer = _foldable_producer(graph, x, readers)
    if producer is not None:  # x / s made by the producer itself
        for i, p in enumerate(producer.inputs[1:], start=1):
            if p is None:
                continue
            t = p.const_value.double()
            t = t / s[:, None] if t.dim() == 2 else t / s
            producer.set_input(i, graph.add_constant(f"{p.name}_smooth", t.float()))
            _drop_if_unused(graph, p)
        stats["folded"][x.name] = producer.op
        return
    inverse = graph.add_constant(f"{x.name}_smooth_scale", (1 / s).float())
    where = {"after": x.producer} if x.producer is not None else {"before": graph.nodes[0]}
    mul = graph.create_node("mul", [x, inverse], name=f"{x.name}_smooth", meta={"origin": "smooth"}, **where)
    for r in readers:
        r.set_input(0, mul.outputs[0])
    stats["mul"].append(x.name)


def _drop_if_unused(graph: Graph, v: Value) -> None:
    if not v.uses and graph.constants.get(v.name) is v and all(o is not v for o in graph.outputs):
        graph.remove_constant(v)
