"""gelu-form, silu-form, squeeze-form: the arithmetic exporters write for one op becomes that op again,
whatever the spelling, computing what it computed (checked in the interpreter, the PyTorch backend
and onnxruntime); look-alikes stay as they are."""

from __future__ import annotations

import io
import math
import warnings

import onnx
import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import DType, Graph, print_graph, run
from slimgraph.passes.forms import merged_squeeze, merged_unsqueeze

SQRT2, SQRT_2_PI = math.sqrt(2.0), math.sqrt(2.0 / math.pi)


class Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


GELUS = {  # written-out GELUs as models and papers spell them -> the approximate attr they are
    "erf, 0.5 * x first": (lambda x: 0.5 * x * (1 + torch.erf(x / SQRT2)), "none"),
    "erf, x * 0.5, times 1/sqrt2": (lambda x: x * 0.5 * (1.0 + torch.erf(x * (1 / SQRT2))), "none"),
    "erf, halved last": (lambda x: (x * (torch.erf(x / SQRT2) + 1)) / 2, "none"),
    "erf, grouped (0.5 * (1 + erf)) * x": (lambda x: (0.5 * (1 + torch.erf(x / SQRT2))) * x, "none"),
    "tanh, pow (GPT-2's gelu_new)": (
        lambda x: 0.5 * x * (1.0 + torch.tanh(SQRT_2_PI * (x + 0.044715 * torch.pow(x, 3.0)))), "tanh"),
    "tanh, x * x * x, expanded": (
        lambda x: x * 0.5 * (1 + torch.tanh(SQRT_2_PI * x + SQRT_2_PI * 0.044715 * x * x * x)), "tanh"),
    "tanh, factored x * (1 + k x^2)": (
        lambda x: 0.5 * x * (1 + torch.tanh(SQRT_2_PI * x * (1 + 0.044715 * x * x))), "tanh"),
}


def _check(model: nn.Module, graph: Graph, inputs: list[torch.Tensor], bound: float) -> None:
    with torch.no_grad():
        want = model(*inputs)
        got = {"interpreter": run(graph, inputs)[0], "PyTorch backend": slimgraph.to_torch(graph)(*inputs),
               "onnxruntime": run_onnxruntime(slimgraph.to_onnx(graph), inputs)[0]}
    for backend, y in got.items():
        error = float((torch.as_tensor(y).double() - want.double()).abs().max() / want.double().abs().max())
        assert error < bound, f"{backend}: {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spelling", list(GELUS))
def test_written_out_gelu_becomes_one_gelu_that_computes_the_same(spelling, dtype):
    fn, approximate = GELUS[spelling]
    model = Fn(fn)
    x = torch.randn(3, 5, 16, dtype=dtype) * 3
    result = slimgraph.optimize(model, "canonicalize", example_inputs=x)
    assert [(n.op, n.attrs) for n in result.graph.nodes] == [("gelu", {"approximate": approximate})]
    assert result.trace[0].pass_stats["gelu-form.erf" if approximate == "none" else "gelu-form.tanh"] == 1
    torch.testing.assert_close(run(result.graph, [x])[0], nn.functional.gelu(x, approximate=approximate))
    if dtype == torch.float32 or approximate == "tanh":  # onnxruntime has no float64 Erf (see test below)
        _check(model, result.graph, [x], 1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_exported_by_torch_and_by_slimgraph_below_opset_20_comes_back_as_gelu(approximate):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate=approximate)).eval()
    x = torch.randn(2, 8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)
    exported = slimgraph.optimize(onnx.load_from_string(buffer.getvalue()), "canonicalize", example_inputs=[x])
    graph = slimgraph.optimize(model, "canonicalize", example_inputs=x).graph
    ours = slimgraph.optimize(slimgraph.to_onnx(graph, opset=17), "canonicalize", example_inputs=[x])
    for result in (exported, ours):
        assert [n.op for n in result.graph.nodes] == ["linear", "gelu"]
        assert result.graph.nodes[1].attrs == {"approximate": approximate}
        _check(model, result.graph, [x], 1e-6)
    assert print_graph(ours.graph) == print_graph(graph)


def test_float64_exact_gelu_written_to_onnx_keeps_its_float32_erf():
    """onnxruntime has no float64 Erf: the ONNX backend computes erf in float32 between casts. That
    is another function (float32's 1e-7), so it is not formed back into a float64 gelu."""
    model = Fn(nn.functional.gelu)
    x = torch.randn(2, 8, dtype=torch.float64)
    graph = slimgraph.optimize(model, "canonicalize", example_inputs=x).graph
    again = slimgraph.optimize(slimgraph.to_onnx(graph), "canonicalize", example_inputs=[x]).graph
    assert "erf" in [n.op for n in again.nodes] and "gelu" not in [n.op for n in again.nodes]


LOOKALIKES = {
    "a rounded 1/sqrt(2)": lambda x: 0.5 * x * (1 + torch.erf(x * 0.7071)),
    "another x inside erf": lambda x: 0.5 * x * (1 + torch.erf(x.flip(-1) / SQRT2)),
    "a third of x": lambda x: x / 3 * (1 + torch.erf(x / SQRT2)),
    "the erf read twice": lambda x: (e := torch.erf(x / SQRT2)) * 0 + 0.5 * x * (1 + e),
    "tanh without the cube": lambda x: 0.5 * x * (1 + torch.tanh(SQRT_2_PI * x)),
    "x squared by the GELU": lambda x: 0.5 * x * x * (1 + torch.erf(x / SQRT2)),
}


@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_gelu_lookalikes_stay_as_they_are(name):
    model = Fn(LOOKALIKES[name])
    x = torch.randn(2, 8)
    result = slimgraph.optimize(model, "canonicalize", example_inputs=x)
    assert "gelu" not in [n.op for n in result.graph.nodes]
    torch.testing.assert_close(run(result.graph, [x])[0], model(x))


@pytest.mark.parametrize("fn", [lambda x: x * torch.sigmoid(x), lambda x: torch.sigmoid(x) * x])
def test_x_times_sigmoid_x_becomes_silu(fn):
    model = Fn(fn)
    x = torch.randn(2, 5, 8)
    result = slimgraph.optimize(model, "canonicalize", example_inputs=x)
    assert [n.op for n in result.graph.nodes] == ["silu"]
    _check(model, result.graph, [x], 1e-6)


def test_silu_round_trips_through_onnx_below_opset_24_and_a_gate_on_another_value_stays():
    model = Fn(lambda x: nn.functional.silu(x) + torch.tanh(x) * torch.sigmoid(x))
    x = torch.randn(2, 8)
    graph = slimgraph.optimize(model, "canonicalize", example_inputs=x).graph
    assert sorted(n.op for n in graph.nodes) == ["add", "mul", "sigmoid", "silu", "tanh"]
    again = slimgraph.optimize(slimgraph.to_onnx(graph), "canonicalize", example_inputs=[x]).graph
    assert print_graph(again) == print_graph(graph)
    _check(model, again, [x], 1e-6)


@pytest.mark.parametrize("chain,want", [
    (lambda x: x.unsqueeze(1).unsqueeze(2), [1, 2]),
    (lambda x: x.unsqueeze(-1).unsqueeze(0), [0, 3]),
    (lambda x: x.unsqueeze(0).unsqueeze(0).unsqueeze(-1), [0, 1, 4]),
    (lambda x: x[:, None].unsqueeze(1), [1, 2]),
])
def test_chained_unsqueezes_become_one(chain, want):
    model = Fn(chain)
    x = torch.randn(2, 3)
    result = slimgraph.optimize(model, "canonicalize", example_inputs=x)
    assert [(n.op, n.attrs["axes"]) for n in result.graph.nodes] == [("unsqueeze", want)]
    _check(model, result.graph, [x], 1e-7)
    again = slimgraph.optimize(slimgraph.to_torch(result.graph), "canonicalize", example_inputs=x).graph
    assert [(n.op, n.attrs["axes"]) for n in again.nodes] == [("unsqueeze", want)]


def test_chained_squeezes_become_one_and_the_axis_arithmetic_holds():
    g = Graph("g")
    x = g.add_input("x", (1, 3, 1, 4, 1), DType.float32)
    a = g.create_node("squeeze", [x], {"axes": [2]})
    b = g.create_node("squeeze", [a.output], {"axes": [-1, 0]})
    g.set_outputs([b.output])
    t = torch.randn(1, 3, 1, 4, 1)
    result = slimgraph.optimize(g, "squeeze-form", example_inputs=[t])
    assert [(n.op, n.attrs["axes"]) for n in result.graph.nodes] == [("squeeze", [0, 2, 4])]
    assert torch.equal(run(result.graph, [t])[0], run(g, [t])[0])
    ones = torch.randn(1, 2, 1, 1, 3, 1)  # every way to squeeze two of its ones, then one more
    positions = [0, 2, 3, 5]
    for first in ([0], [2, 5], [3]):
        mid = ones.squeeze(first)
        for second in [[a] for a in range(mid.dim()) if mid.shape[a] == 1]:
            assert torch.equal(ones.squeeze(merged_squeeze(first, second, ones.dim())), mid.squeeze(second))
    assert all(ones.shape[a] == 1 for a in positions)
    for rank in range(1, 4):  # every split of a few new axes into two unsqueezes, against torch
        y = torch.randn(*range(2, 2 + rank))
        for inner in ([0], [rank], [0, rank + 1]):
            mid = y
            for axis in inner:
                mid = mid.unsqueeze(axis)
            for outer in ([0], [mid.dim()], [1, mid.dim() + 1]):
                got = mid
                for axis in outer:
                    got = got.unsqueeze(axis)
                direct = y
                for axis in merged_unsqueeze(inner, outer, rank):
                    direct = direct.unsqueeze(axis)
                assert torch.equal(direct, got), (rank, inner, outer)
