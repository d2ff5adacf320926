"""quantize{cpu=...}: full-range int8 weights where onnxruntime's integer kernels sum exactly,
7-bit ones where they add pairs of products into a saturating int16 (x86 without VNNI).

Every CPU answer is checked here on whatever CPU runs the tests, through the option and through
$SLIMGRAPH_CPU (what cpu=auto reads first); tests/backends/test_torch_int8.py checks the integers
against onnxruntime on the CPU at hand.
"""

from __future__ import annotations

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.cpu import ENV, ISAS
from slimgraph.errors import PassError, VerificationError
from slimgraph.ir import DType, run
from slimgraph.passes.quantize import weight_range

EXACT = {"vnni": 127, "arm": 127, "avx512": 64, "avx2": 64}  # the weights' qmax for each answer


@pytest.mark.parametrize("isa", ISAS)
def test_weight_range_for_every_cpu(monkeypatch, isa):
    monkeypatch.setenv(ENV, isa)
    for chosen in (weight_range("ort", isa), weight_range("ort", "auto")):
        assert (chosen.cpu, chosen.qmax, chosen.bits) == (isa, EXACT[isa], 8 if EXACT[isa] == 127 else 7)
        assert chosen.reason.startswith(f"{isa}: ")
        assert ("saturat" in chosen.reason) == (EXACT[isa] == 64)
    assert weight_range("trt", isa).qmax == 127  # TensorRT runs on the GPU, whatever this CPU is


def quantize(model, x, options: str = ""):
    return slimgraph.optimize(model, f"fold-bn,quantize{{progress=false{options}}}", example_inputs=x,
                              calibration_data=[(x,), (torch.randn_like(x),)])


def weight_fake_quants(graph):
    return [n for n in graph.nodes if n.op == "fake_quant" and n.inputs[0].is_constant]


@pytest.mark.parametrize("isa", ISAS)
def test_the_choice_and_its_reason_are_in_the_stats_and_the_trace(tiny, monkeypatch, isa):
    model, (x,) = tiny
    monkeypatch.setenv(ENV, "vnni" if isa != "vnni" else "avx2")  # the option wins over the environment
    result = quantize(model, x, f",cpu={isa}")
    stats = result.trace[-1].pass_stats
    bits = 8 if EXACT[isa] == 127 else 7
    assert stats["cpu"] == isa and stats["weight_bits"] == bits
    assert f"cpu={isa}}}: {bits}-bit weights: {isa}: " in result.trace.summary()
    fqs = weight_fake_quants(result.graph)
    assert len(fqs) == 3
    narrowed = {"qmin": -64, "qmax": 64} if bits == 7 else {}
    assert all({k: v for k, v in n.attrs.items() if k != "axis"} == narrowed for n in fqs)
    folded = slimgraph.optimize(result.graph, "fold-int8", example_inputs=x)
    weights = [v.const_value for v in folded.graph.constants.values() if v.dtype == DType.int8 and v.rank > 1]
    assert max(int(w.abs().max()) for w in weights) == EXACT[isa]  # each channel's largest weight at the edge


@pytest.mark.parametrize("isa", ISAS)
def test_auto_answers_as_the_environment_says(tiny, monkeypatch, isa):
    model, (x,) = tiny
    monkeypatch.setenv(ENV, isa)
    stats = quantize(model, x).trace[-1].pass_stats
    assert (stats["cpu"], stats["weight_bits"]) == (isa, 8 if EXACT[isa] == 127 else 7)


def test_seven_bit_weights_stay_seven_bit_after_training(tiny):
    """QAT may shrink a weight scale: the fake-quant module, the interpreter, ONNX and fold-int8
    all saturate the weights at +-64, not at the int8 type's -128..127."""
    model, (x,) = tiny
    graph = quantize(model, x, ",cpu=avx2").graph
    for fq in weight_fake_quants(graph):
        fq.inputs[1].const_value = fq.inputs[1].const_value / 4  # as if training had shrunk it
    graph.touch()
    reference = run(graph, [x])[0]
    with torch.no_grad():
        assert torch.allclose(slimgraph.to_torch(graph)(x), reference, atol=1e-5)
    proto = slimgraph.to_onnx(graph)
    assert sum(n.op_type == "Clip" for n in proto.graph.node) == 3  # one per weight, on its integers
    assert torch.allclose(run_onnxruntime(proto, [x])[0], reference, atol=1e-4)
    folded = slimgraph.optimize(graph, "fold-int8", example_inputs=x).graph
    weights = [v.const_value for v in folded.constants.values() if v.dtype == DType.int8 and v.rank > 1]
    assert all(int(w.abs().max()) == 64 for w in weights)
    assert torch.allclose(run(folded, [x])[0], reference, atol=1e-5)


def test_fold_int8_refuses_a_narrowed_activation_before_any_edit(tiny):
    model, (x,) = tiny
    graph = quantize(model, x, ",cpu=avx2").graph
    activation = next(n for n in graph.nodes if n.op == "fake_quant" and not n.inputs[0].is_constant)
    activation.attrs.update(qmin=0, qmax=127)
    graph.touch()
    before = slimgraph.ir.print_graph(graph)
    with pytest.raises(PassError, match=f"node {activation.name} narrows the range of a computed tensor"):
        slimgraph.optimize(graph, "fold-int8", example_inputs=x)
    assert slimgraph.ir.print_graph(graph) == before


def test_a_bad_cpu_or_range_is_named(tiny):
    with pytest.raises(PassError, match="'cpu': 'sse' is not one of auto, vnni, avx512, avx2, arm"):
        slimgraph.passes.to_passes("quantize{cpu=sse}")
    model, (x,) = tiny
    graph = quantize(model, x, ",cpu=avx2").graph
    weight = weight_fake_quants(graph)[0]
    weight.attrs["qmax"] = 200
    graph.touch()
    with pytest.raises(VerificationError, match=rf"node {weight.name} \(fake_quant\): .*qmin -64 and qmax 200 must "
                       r"be integers with -128 <= qmin < qmax <= 127"):
        graph.verify()
