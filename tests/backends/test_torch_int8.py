"""The PyTorch backend on folded int8 graphs: conv units computed as onnxruntime's QLinearConv does.

onnxruntime runs DQ(x uint8) -> Conv(DQ(w int8), DQ(bias int32)) -> [ReLU/clip] -> Q(uint8) as
QLinearConv: an exact integer accumulator plus the bias, requantized in float32 as
round_half_even(float32(acc) * float32(float32(x_scale * w_scale) / y_scale)) + y_zero point. The
emitted module calls its qconv helper for each such unit and must give the very same integers,
on any CPU: where onnxruntime's u8s8 kernels would saturate (x86 without VNNI), ``quantize``
writes 7-bit weights, which they sum exactly (slimgraph/cpu.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.backends import pytorch as pytorch_backend
from slimgraph.backends.onnx import onnxruntime_kernels, run_onnxruntime
from slimgraph.cpu import integer_isa, saturates_pairs
from slimgraph.ir import Graph, Node
from tests.conftest import perturb_bn, run_saved_model

PIPELINE = "fold-bn,quantize{progress=false},fold-int8"
SHAPE = (2, 3, 24, 24)




class Convs(nn.Module):
    """conv + BN + ReLU, a depthwise conv + ReLU6, a grouped conv with stride 2, padding 2 and
    dilation 2 and no activation, and a 3x3 head without activation (its pads made asymmetric)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6())
        self.grouped = nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2, groups=4)
        self.head = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.grouped(self.depthwise(self.stem(x))))


def batches(n: int, seed: int) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(SHAPE, generator=gen),) for _ in range(n)]


def int8_convs(pipeline: str = PIPELINE) -> Graph:
    torch.manual_seed(0)
    model = perturb_bn(Convs().eval())
    graph = slimgraph.import_model(model, batches(1, 0)[0])
    head = next(n for n in graph.nodes if n.op == "conv" and n.name.startswith("head"))
    head.attrs["pads"] = [0, 1, 2, 1]  # top 0, bottom 2: the same output size, onnxruntime pads as given
    graph.touch()
    data = batches(4, 0)
    return slimgraph.optimize(graph, pipeline, example_inputs=data[0], calibration_data=data).graph


def quantizer_after(conv: Node) -> Node:
    v = conv.outputs[0]
    while v.uses[0].node.op != "quantize_linear":
        v = v.uses[0].node.outputs[0]
    return v.uses[0].node


def near_ties(graph: Graph) -> None:
    """Rescale each conv unit so that its multiplier x_scale * w_scale / y_scale is a power of two
    (one weight scale for all channels), or an ulp or two off one: many accumulators then land on
    or right beside a .5, where a float conv of the dequantized values rounds either way. Every
    y_scale only shrinks, so the ReLU6 stays inside the quantizer's range (onnxruntime drops it)."""
    for i, conv in enumerate(n for n in graph.nodes if n.op == "conv"):
        x_scale = conv.inputs[0].producer.inputs[1].const_value
        w_scale, b_scale = (conv.inputs[k].producer.inputs[1] for k in (1, 2))
        w_scale.const_value = torch.full_like(w_scale.const_value, float(w_scale.const_value.max()))
        step = x_scale * w_scale.const_value  # float32, as fold-int8 computes the bias scale
        b_scale.const_value = step.clone()
        y_scale = quantizer_after(conv).inputs[1]
        y = step[0] * 2.0 ** math.floor(math.log2(float(y_scale.const_value / step[0])))  # exact: a power of two
        for _ in range(i % 3):
            y = torch.nextafter(y, torch.tensor(0.0))
        y_scale.const_value = y.reshape(()).clone()
    graph.touch()


def with_unit_outputs(graph: Graph) -> list[Node]:
    """Every conv unit's uint8 output becomes a graph output too; returns the units' quantizers."""
    quantizers = [quantizer_after(n) for n in graph.nodes if n.op == "conv"]
    graph.set_outputs(list(graph.outputs) + [q.outputs[0] for q in quantizers])
    return quantizers


def unit_level_differences(graph: Graph, module, quantizers: list[Node], inputs) -> dict[str, int]:
    """The most levels by which the module's and onnxruntime's integers differ, per conv unit."""
    proto = slimgraph.to_onnx(graph)
    worst = {q.name: 0 for q in quantizers}
    for x in inputs:
        expected = run_onnxruntime(proto, [x])[1:]
        with torch.no_grad():
            got = module(x)[1:]
        for q, e, g in zip(quantizers, expected, got):
            assert g.dtype == e.dtype == torch.uint8
            worst[q.name] = max(worst[q.name], int((g.int() - e.int()).abs().max()))
    return worst


def test_conv_units_give_onnxruntimes_integers_exactly(monkeypatch):
    """Equal integers on any CPU: cpu=auto gives 7-bit weights where onnxruntime's kernels saturate."""
    graph = int8_convs()
    near_ties(graph)
    quantizers = with_unit_outputs(graph)
    assert [q.outputs[0].dtype.torch for q in quantizers] == [torch.uint8] * 4
    proto = slimgraph.to_onnx(graph)
    kernels = onnxruntime_kernels(proto)
    assert kernels.get("QLinearConv") == 4 and "Conv" not in kernels and "Clip" not in kernels, kernels
    module = slimgraph.to_torch(graph)
    assert module.code.count("= qconv(") == 4
    assert "F.pad(" in module.code and ", value=" in module.code  # the head's asymmetric pads, with the zero point
    monkeypatch.setattr(pytorch_backend, "_int8_conv_unit", lambda graph, conv: None)
    float_module = slimgraph.to_torch(graph)  # what the backend emitted before: float convs of DQ values
    assert "qconv" not in float_module.code
    float_flips = 0
    for x, in batches(3, 1):
        expected = run_onnxruntime(proto, [x])[1:]
        with torch.no_grad():
            got, floats = module(x)[1:], float_module(x)[1:]
        for q, e, g, f in zip(quantizers, expected, got, floats):
            assert g.dtype == e.dtype == torch.uint8
            assert torch.equal(g, e), f"{q.name} ({integer_isa()}): {int((g != e).sum())} of {e.numel()} outputs differ"
            float_flips += int((f != e).sum())
    assert float_flips > 10  # the test reaches the cases where float arithmetic rounds the other way


@pytest.mark.parametrize("cpu", ["vnni", "avx2"])
def test_full_range_weights_are_exact_only_where_this_cpu_sums_exactly(cpu):
    """What cpu=auto guards against, asserted for the CPU the test runs on. Built for a VNNI CPU
    (full-range weights), the units match onnxruntime exactly where this CPU sums exactly, and are
    off by many levels where its VPMADDUBSW saturates (the issue saw 120). Built for AVX2 (7-bit
    weights), they match on every CPU."""
    graph = int8_convs(PIPELINE.replace("quantize{", f"quantize{{cpu={cpu},"))
    near_ties(graph)
    weights = [n.inputs[0].const_value for n in graph.nodes if n.op == "dequantize_linear"
               and n.inputs[0].is_constant and n.inputs[0].dtype.torch == torch.int8]
    assert max(int(w.abs().max()) for w in weights) == (127 if cpu == "vnni" else 64)
    quantizers = with_unit_outputs(graph)
    worst = unit_level_differences(graph, slimgraph.to_torch(graph), quantizers, [x for x, in batches(2, 1)])
    here = integer_isa()
    if cpu == "vnni" and saturates_pairs(here):
        assert max(worst.values()) > 1, f"{here}: full-range weights gave onnxruntime's integers exactly: {worst}"
    else:
        assert set(worst.values()) == {0}, f"{here}, weights for {cpu}: {worst}"


def test_calibrated_int8_model_matches_onnxruntime_and_its_source_runs_without_slimgraph(tmp_path):
    graph = int8_convs()
    proto = slimgraph.to_onnx(graph)
    (x,) = batches(1, 2)[0]
    (expected,) = run_onnxruntime(proto, [x])
    module = slimgraph.to_torch(graph)
    with torch.no_grad():
        emitted = module(x)
    assert torch.equal(emitted, expected)
    pytorch_backend.save_torch(graph, tmp_path / "out")
    code = (tmp_path / "out" / "model.py").read_text()
    assert "def qconv(" in code and "import slimgraph" not in code
    torch.save(x, tmp_path / "x.pt")
    run_saved_model(tmp_path / "out", f"""
        with torch.no_grad():
            torch.save(net(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
    """)
    assert torch.equal(torch.load(tmp_path / "y.pt"), emitted)


def test_int8_activations_are_fused_where_onnxruntime_makes_them_uint8():
    """x86 onnxruntime fuses uint8 activations only, but first shifts int8 ones to uint8 (zero point
    + 128) where a quantizer feeds one dequantizer: the grouped conv and the head run as QLinearConv.
    A ReLU after a conv stays where the zero point is 0, not -128: the stem and the depthwise conv
    run in float, and the module keeps their float arithmetic."""
    torch.manual_seed(0)
    model = perturb_bn(Convs().eval())
    data = batches(4, 0)
    result = slimgraph.optimize(model, PIPELINE.replace("quantize{", "quantize{activations=int8,"),
                                example_inputs=data[0], calibration_data=data)
    proto, module = result.to_onnx(), result.to_torch()
    assert onnxruntime_kernels(proto).get("QLinearConv") == 2
    assert module.code.count("= qconv(") == 2 and module.code.count("torch.int8)") >= 2
    step = float(result.graph.outputs[0].producer.inputs[1].const_value)
    for x, in batches(2, 1):
        with torch.no_grad():
            diff = (module(x) - run_onnxruntime(proto, [x])[0]).abs().max()
        assert float(diff) <= step * 1.001  # float convs (summed in another order) may round one step apart


def test_a_relu_onnxruntime_keeps_keeps_its_conv_float():
    """A ReLU before a quantizer whose zero point is not the lowest level: onnxruntime keeps the
    ReLU, and with it a float conv; so does the module."""
    graph = int8_convs()
    zero_point = quantizer_after(next(n for n in graph.nodes if n.op == "conv")).inputs[2]
    zero_point.const_value = torch.tensor(3, dtype=torch.uint8)
    graph.touch()
    assert slimgraph.to_torch(graph).code.count("= qconv(") == 3
    assert onnxruntime_kernels(slimgraph.to_onnx(graph)).get("QLinearConv") == 3
