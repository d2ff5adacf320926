"""What every pass must keep on graphs nobody wrote by hand (nets.py): one check per property, each
raising AssertionError that names the net (``cnn 17``: RandomNet(17); ``transformer 17``:
RandomTransformer(17)) and what broke. The test suite runs them on a fixed budget of seeds;
``python -m tests.fuzz`` runs campaigns.

- exact: cleanups, canonicalize, fold-bn, fold-constants, fuse (transformers) and Winograd (CNNs,
  to fp32 rounding) keep the outputs in the interpreter, the PyTorch backend and onnxruntime, at
  another batch (and sequence length, where the net was imported with symbolic dims);
- prune: the pruned graph equals the original with the same channels zeroed, and runs;
- lowrank, int8 (quantize + fold-int8, dynamic for transformers), fp16: the graph verifies (each
  pass is verified as optimize() runs it) and runs in every backend with the right output shapes,
  finite; fp16 within 5e-2 of the float outputs;
- round trips: IR -> ONNX -> IR prints the same IR, and IR -> PyTorch source -> IR the same up to
  value names (fx names a node after the function its source calls), where every op has a one-node
  form in the target (canonicalize forms linears, GELU, SiLU, unsqueezes and attention, masked or
  not, back: every net of nets.py); otherwise the first trip gives the target's form and every later
  trip prints it unchanged;
- onnx-file: the net exported by torch.onnx.export (or, where torch refuses it, written by slimgraph)
  imports and computes what the net computes.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import onnx
import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import PassError, UnsupportedError
from slimgraph.ir import Graph, print_graph, run
from slimgraph.passes.prune import apply_plan, plan_pruning, zero_plan
from tests.fuzz.ir_graphs import GraphModel
from tests.fuzz.nets import RandomNet, RandomTransformer

KINDS = ("cnn", "transformer", "ir")
# ops written as one ONNX node and one PyTorch call, or formed back into one by canonicalize (linear-form,
# gelu-form, silu-form, squeeze-form, attention-form), that import as themselves: every op of nets.py's nets
ONE_NODE_FORMS = {"conv", "batch_norm", "relu", "sigmoid", "hardswish", "clip", "gelu", "silu", "tanh", "add", "sub",
                  "mul", "div", "concat", "split", "max_pool", "avg_pool", "adaptive_avg_pool", "flatten", "reshape",
                  "permute", "unsqueeze", "squeeze", "select", "linear", "matmul", "softmax", "layer_norm", "embedding",
                  "mean", "attention"}
# (target, op) -> (the nodes of the op that have no one-node form there, why)
NO_ONE_NODE_FORM: dict[tuple[str, str], tuple[Callable, str]] = {
    ("ONNX", "gelu"): (lambda node: node.attrs.get("approximate", "none") == "none"
                       and node.outputs[0].dtype.torch == torch.float64,
                       "onnxruntime has no float64 Erf: the file computes erf in float32 between casts, another "
                       "function, which gelu-form does not take for a float64 gelu"),
}

@dataclass
class Case:
    kind: str
    seed: int
    model: torch.nn.Module
    inputs: tuple  # what the graph was traced at
    other: tuple  # what it is checked at: another batch, another sequence length where symbolic
    dynamic_dims: dict | None
    graph: Graph  # never modified by a check: passes run on copies

    def __str__(self) -> str:
        return f"{self.kind} {self.seed}"

    def calibration(self) -> list[tuple]:
        if self.kind == "ir":  # the inputs its values were drawn finite on
            return [self.inputs, self.other]
        if self.kind == "cnn":
            return [(self.model.example(batch=2, seed=k),) for k in range(2, 6)]
        return [self.model.example(batch=2, seed=k) for k in range(2, 6)]


@lru_cache(maxsize=512)
def make_case(kind: str, seed: int) -> Case:
    if kind == "cnn":
        model = RandomNet(seed).eval()
        inputs, other, dims = (model.example(),), (model.example(batch=3, seed=1),), None
    elif kind == "transformer":
        model = RandomTransformer(seed).eval()
        inputs, dims = model.example(), model.dynamic_dims if model.symbolic else None
        other = model.example(batch=3, seq=model.seq + 3 if model.symbolic else None, seed=1)
    elif kind == "ir":
        model = GraphModel(seed)
        inputs, other, dims = model.example(), model.example(*model.random.batches[1:], seed=1), model.dynamic_dims
        return Case(kind, seed, model, inputs, other, dims, model.random.graph)
    else:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    graph = slimgraph.import_model(model, inputs, dims)
    return Case(kind, seed, model, inputs, other, dims, graph)


def onnx_file(graph: Graph, dynamic_batch: bool = True) -> onnx.ModelProto:
    """The graph's ONNX file at the default opset, or at the newer one an UnsupportedError asks for
    (integer bitwise ops and scatter's amax need 18): that refusal is the documented outcome."""
    try:
        return slimgraph.to_onnx(graph, dynamic_batch=dynamic_batch)
    except UnsupportedError as exc:
        needed = re.search(r"needs ONNX opset (\d+)", str(exc))
        if needed is None:
            raise
        return slimgraph.to_onnx(graph, dynamic_batch=dynamic_batch, opset=int(needed.group(1)))


def _dynamic(case: Case) -> bool:
    """Whether the graph's batch may change: a random IR graph drawn with static sizes hard-codes it."""
    return case.kind != "ir" or case.dynamic_dims is not None


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not b.numel():  # an empty output (a diagonal past the edge): nothing to differ
        return 0.0
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def _feeds(case: Case, names: set[str], inputs: tuple) -> list[torch.Tensor]:
    """The inputs a graph with these input names takes (torch.onnx.export drops unread ones)."""
    return [x for name, x in zip(getattr(case.model, "input_names", ["x"]), inputs) if name in names]


def _in_every_backend(case: Case, graph: Graph, what: str, bound: float | None, inputs: tuple | None = None,
                      finite: bool = True) -> None:
    """The graph's outputs at ``inputs`` (case.other) in the interpreter, the PyTorch backend and
    onnxruntime: the right shape, finite, and within ``bound`` of the net's (None: shapes and
    finiteness only)."""
    inputs = inputs or case.other
    with torch.no_grad():
        want = _tuple(case.model(*inputs))
    feeds = _feeds(case, {v.name for v in graph.inputs}, inputs)
    module = slimgraph.to_torch(graph)
    with torch.no_grad():
        got = {"interpreter": run(graph, feeds), "PyTorch backend": _tuple(module(*feeds))}
    got["onnxruntime"] = run_onnxruntime(onnx_file(graph, _dynamic(case)), feeds)
    for backend, ys in got.items():
        assert len(ys) == len(want), f"{case}: {what}: {backend} gives {len(ys)} outputs, not {len(want)}"
        for k, (y, w) in enumerate(zip(ys, want)):
            y, at = torch.as_tensor(y), f"{case}: {what}: {backend}" + (f" output {k}" if len(want) > 1 else "")
            assert tuple(y.shape) == tuple(w.shape), f"{at} gives {tuple(y.shape)}, not {tuple(w.shape)}"
            assert not finite or not y.is_floating_point() or torch.isfinite(y).all(), f"{at} gives non-finite outputs"
            if bound is not None:
                error = rel_error(y, w)
                assert error < bound, f"{at} is {error:.2e} off (bound {bound:.0e})"


def _tuple(outputs) -> tuple:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _tolerance(case: Case) -> float:
    # float64 random IR graphs hold ops onnxruntime has no double kernel for (run in float32 there)
    return 1e-6 if getattr(case.model, "dtype", None) == torch.float64 and case.kind != "ir" else 1e-4


def check_exact(case: Case) -> None:
    passes = "dce,remove-identity,fold-bn,fold-constants,canonicalize" + (",fuse" if case.kind != "cnn" else "")
    result = slimgraph.optimize(case.graph, passes, example_inputs=case.inputs)
    _in_every_backend(case, result.graph, passes, _tolerance(case))
    if any(n.op == "conv" for n in case.graph.nodes):  # exact in exact arithmetic; F(4x4) amplifies fp32 rounding most
        for tile, bound in ((2, 1e-3), (4, 1e-2)):
            result = slimgraph.optimize(case.graph, f"winograd{{tile={tile}}}", example_inputs=case.inputs)
            _in_every_backend(case, result.graph, f"winograd{{tile={tile}}}", bound)


def check_prune(case: Case) -> None:
    plan = plan_pruning(case.graph, 0.5)
    zeroed, pruned = case.graph.clone(), case.graph.clone()
    zero_plan(zeroed, plan)
    apply_plan(pruned, plan)
    pruned.verify()
    want = run(zeroed, list(case.other))[0]
    got = run(pruned, list(case.other))[0]
    error = rel_error(got, want)
    assert error < _tolerance(case), f"{case}: pruning differs from zeroing by {error:.2e}"
    _in_every_backend(case, pruned, "prune", None)


def check_lowrank(case: Case) -> None:
    result = slimgraph.optimize(case.graph, "lowrank{rank_ratio=0.5}", example_inputs=case.inputs)
    _in_every_backend(case, result.graph, "lowrank", None)


def check_int8(case: Case) -> None:
    """Quantized: runs everywhere with the right shapes (and finite, but for random IR graphs, whose
    log or division of a rounded value may well be infinite); a graph holding quantize ops already is
    refused by name."""
    passes = "quantize{activations=dynamic}" if case.kind == "transformer" else "fold-bn,quantize,fold-int8"
    quantized = [n.name for n in case.graph.nodes if n.op in ("quantize_linear", "fake_quant")]
    if quantized:
        with pytest.raises(PassError, match=f"already quantized \\(node ({'|'.join(quantized)}) "):
            slimgraph.optimize(case.graph, passes, example_inputs=case.inputs, calibration_data=case.calibration())
        return
    result = slimgraph.optimize(case.graph, passes, example_inputs=case.inputs, calibration_data=case.calibration())
    _in_every_backend(case, result.graph, passes, None, finite=case.kind != "ir")


def check_fp16(case: Case) -> None:
    result = slimgraph.optimize(case.graph, "fp16", example_inputs=case.inputs)
    _in_every_backend(case, result.graph, "fp16", 5e-2)


def _unnamed(graph: Graph) -> str:
    """The printout with every %name replaced by its order of first appearance, the header dropped."""
    text = print_graph(graph).split("\n", 1)[1]
    names: dict[str, str] = {}
    return re.sub(r"%[\w.:/-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), text)


def without_one_node_form(graph: Graph, target: str) -> str | None:
    """Why some node of ``graph`` has no one-node form in ``target`` ("ONNX" or "PyTorch source"), or None."""
    for node in graph.nodes:
        if node.op not in ONE_NODE_FORMS:
            return f"{node.op} is not known to have a one-node form in both targets"
        which, why = NO_ONE_NODE_FORM.get((target, node.op), (None, ""))
        if which is not None and which(node):
            return f"{node.op} {node.name}: {why}"
    return None


def check_round_trips(case: Case) -> None:
    """IR -> ONNX -> IR and IR -> PyTorch source -> IR, canonicalized as the first import was: the
    same IR where every node has a one-node form in the target (ONE_NODE_FORMS: all of nets.py's
    CNNs and transformers); otherwise the first trip gives the target's form and every later trip
    prints it unchanged. What genuinely has no one-node form (NO_ONE_NODE_FORM): exact GELU in
    float64 in ONNX, whose Erf onnxruntime runs in float32 only. Ops not (yet) in ONE_NODE_FORMS
    (random IR graphs draw from the whole registry) get the fixed point too."""
    def canonical(graph: Graph) -> Graph:
        return slimgraph.optimize(graph, "dce,remove-identity,canonicalize", example_inputs=case.inputs).graph

    def via_onnx(graph: Graph) -> Graph:
        return canonical(slimgraph.import_model(onnx_file(graph, dynamic_batch=False)))

    def via_torch(graph: Graph) -> Graph:
        return canonical(slimgraph.import_model(slimgraph.to_torch(graph), case.inputs, case.dynamic_dims))

    graph = canonical(case.graph)
    for trip, printed, what in ((via_onnx, print_graph, "ONNX"), (via_torch, _unnamed, "PyTorch source")):
        again = trip(graph)
        why = without_one_node_form(graph, what)
        if why is None:
            assert printed(again) == printed(graph), f"{case}: IR -> {what} -> IR prints another IR"
        else:
            assert printed(trip(again)) == printed(again), f"{case}: IR -> {what} -> IR is not a fixed point ({why})"


def _torch_onnx_export(case: Case) -> onnx.ModelProto | None:
    """The net as torch.onnx.export writes it, or None where torch refuses it."""
    names = getattr(case.model, "input_names", ["x"])
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(case.model, case.inputs, buffer, dynamo=False, input_names=names,
                              dynamic_axes=case.dynamic_dims or {name: {0: "batch"} for name in names})
        return onnx.load_from_string(buffer.getvalue())
    except Exception:
        return None


def check_onnx_file(case: Case) -> None:
    proto = None if case.kind == "ir" else _torch_onnx_export(case)
    if proto is None:  # a random IR graph, or a net torch refuses (float64 attention mask): slimgraph's own file
        proto = onnx_file(case.graph, _dynamic(case))
    inputs = case.other
    held = {i.name for i in proto.graph.input}
    try:
        run_onnxruntime(proto, _feeds(case, held, inputs))
    except Exception:  # the exporter wrote a traced size into the file (nn.MultiheadAttention's reshapes)
        inputs = case.inputs
    result = slimgraph.optimize(proto, "dce,canonicalize", example_inputs=_feeds(case, held, inputs))
    _in_every_backend(case, result.graph, "torch.onnx.export", _tolerance(case), inputs)


PROPERTIES: dict[str, Callable[[Case], None]] = {
    "exact": check_exact, "prune": check_prune, "lowrank": check_lowrank, "int8": check_int8, "fp16": check_fp16,
    "round-trips": check_round_trips, "onnx-file": check_onnx_file,
}
