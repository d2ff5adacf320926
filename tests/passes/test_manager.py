from dataclasses import dataclass

import pytest
import torch

from slimgraph.errors import NumericalError, PassError, VerificationError
from slimgraph.ir import DType, Graph
from slimgraph.passes import (
    Instrument,
    NumericalCheck,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    PrintAfterChange,
    TraceInstrument,
    make_pass,
)


def relu_chain(n: int = 3) -> Graph:
    g = Graph()
    v = g.add_input("x", (1, 4), DType.float32)
    for _ in range(n):
        v = g.create_node("identity", [v]).output
        v = g.create_node("relu", [v]).output
    g.set_outputs([v])
    return g


@dataclass
class RemoveOneIdentity(Pass):
    """Removes a single identity per run: needs the fixed point to finish."""

    name = "remove-one-identity"

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.op == "identity":
                graph.replace_all_uses_with(node.output, node.inputs[0])
                graph.remove_node(node)
                return PassResult(True)
        return PassResult(False)


class Recorder(Instrument):
    def __init__(self):
        self.events = []

    def before_pass(self, pass_, graph, record):
        self.events.append(("before", pass_.name))

    def after_pass(self, pass_, graph, record):
        self.events.append(("after", pass_.name, record.changed))

    def on_failure(self, pass_, graph, record, error):
        self.events.append(("failed", pass_.name, type(error).__name__))


def test_fixed_point_repeats_until_nothing_changes():
    g = relu_chain(3)
    trace = PassManager([RemoveOneIdentity()], [TraceInstrument()], fixed_point=True).run(g)
    assert [r.changed for r in trace] == [True, True, True, False]
    assert all(n.op == "relu" for n in g.nodes)
    assert "-  %identity" in trace[0].diff and trace[3].diff == ""


def test_single_run_does_one_iteration():
    trace = PassManager([RemoveOneIdentity()]).run(relu_chain(3))
    assert len(trace) == 1


def test_instruments_see_before_after_and_failure():
    rec = Recorder()

    @dataclass
    class Boom(Pass):
        name = "boom"

        def run(self, graph, ctx):
            raise RuntimeError("kaput")

    with pytest.raises(PassError, match="pass boom failed: RuntimeError: kaput"):
        PassManager([make_pass("dce", {}), Boom()], [rec]).run(relu_chain(1))
    assert rec.events == [("before", "dce"), ("after", "dce", False), ("before", "boom"),
                          ("failed", "boom", "RuntimeError")]


def test_graph_is_verified_after_every_pass():
    @dataclass
    class Corrupt(Pass):
        name = "corrupt"

        def run(self, graph, ctx):
            graph.nodes[-1].outputs[0].shape = (9, 9)  # lie about a shape
            graph.touch()
            return PassResult(True)

    with pytest.raises(VerificationError, match="after pass corrupt"):
        PassManager([Corrupt()]).run(relu_chain(1))


def test_pass_that_edits_but_says_unchanged_is_caught():
    @dataclass
    class Liar(Pass):
        name = "liar"

        def run(self, graph, ctx):
            RemoveOneIdentity().run(graph, ctx)
            return PassResult(False)

    with pytest.raises(PassError, match="reported changed=False"):
        PassManager([Liar()]).run(relu_chain(1))


def test_numerical_check_stops_an_exact_pass_that_changes_results():
    @dataclass
    class ReluToSigmoid(Pass):
        name = "relu-to-sigmoid"

        def run(self, graph, ctx):
            for node in graph.nodes:
                if node.op == "relu":
                    s = graph.create_node("sigmoid", [node.inputs[0]], after=node)
                    graph.replace_all_uses_with(node.output, s.output)
                    graph.remove_node(node)
            return PassResult(True)

    check = NumericalCheck([torch.randn(1, 4)])
    with pytest.raises(NumericalError, match="relu-to-sigmoid is exact"):
        PassManager([ReluToSigmoid()], [check]).run(relu_chain(1))

    ReluToSigmoid.exact = False  # a lossy pass reports its error instead
    trace = PassManager([ReluToSigmoid()], [NumericalCheck([torch.randn(1, 4)])]).run(relu_chain(1))
    assert trace[0].max_abs_error > 0.1


def test_requirements_are_checked_before_running():
    @dataclass
    class NeedsFolded(Pass):
        name = "needs-folded"
        requires = ("no-batch-norm",)

        def run(self, graph, ctx):
            return PassResult(False)

    g = Graph()
    x = g.add_input("x", (1, 2, 3, 3), DType.float32)
    consts = [g.add_constant(n, torch.ones(2)) for n in "wbmv"]
    g.set_outputs([g.create_node("batch_norm", [x, *consts], {"eps": 1e-5}).output])
    with pytest.raises(PassError, match="requires no-batch-norm: node batch_norm"):
        PassManager([NeedsFolded()]).run(g)


def test_print_after_change_prints_the_diff(capsys):
    PassManager([RemoveOneIdentity()], [TraceInstrument(), PrintAfterChange()]).run(relu_chain(1))
    out = capsys.readouterr().out
    assert "after remove-one-identity" in out and "-  %identity" in out


def test_analysis_cache_recomputes_after_a_change():
    g, ctx, calls = relu_chain(2), PassContext(), []

    def count(graph):
        calls.append(1)
        return len(graph)

    assert ctx.analysis(g, count) == 4 and ctx.analysis(g, count) == 4 and len(calls) == 1
    RemoveOneIdentity().run(g, ctx)
    assert ctx.analysis(g, count) == 3 and len(calls) == 2


def test_layer_errors_of_a_lossy_pass_are_the_interpreters_sorted_worst_first():
    torchvision = pytest.importorskip("torchvision")
    import slimgraph
    from slimgraph.ir import run

    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    calibration = [torch.randn(1, 3, 64, 64) for _ in range(2)]
    before = slimgraph.optimize(model, "fold-bn", example_inputs=x).graph
    result = slimgraph.optimize(before, "quantize", example_inputs=x, calibration_data=calibration)
    errors = result.trace[0].layer_errors
    assert len(errors) > 20 and list(errors.values()) == sorted(errors.values(), reverse=True)
    worst, error = next(iter(errors.items()))
    assert error > 0
    value = lambda graph: next(v for n in graph.nodes for v in n.outputs if v.name == worst)  # noqa: E731
    (_, want), (_, got) = (next(iter(run(g, [x], capture=[value(g)])[1].items())) for g in (before, result.graph))
    assert error == pytest.approx(float((got - want).abs().max() / want.abs().max()), rel=1e-6)
    assert not slimgraph.optimize(before, "fold-bn", example_inputs=x).trace[0].layer_errors  # exact: none


def test_measured_latency_per_pass_is_a_column_that_fits():
    torchvision = pytest.importorskip("torchvision")
    import slimgraph

    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    result = slimgraph.optimize(model, "fold-bn,prune{ratio=0.5}", example_inputs=x, measure="onnxruntime")
    assert result.trace.input_latency_ms > 0 and all(r.latency_ms > 0 for r in result.trace)
    assert result.trace.measure_seconds > 0
    summary = result.trace.summary()
    assert "latency (ms)" in summary.splitlines()[0] and max(len(line) for line in summary.splitlines()) <= 120
    with pytest.raises(slimgraph.SlimgraphError, match="measure='tensorrt'"):
        slimgraph.optimize(model, "dce", example_inputs=x, measure="tensorrt")
