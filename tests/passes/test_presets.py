"""Presets: named pipelines for a target, expanded in place, combinable with other passes."""

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.passes import to_passes
from tests.frontends.test_transformers import SENTENCES, minilm


def test_a_preset_expands_in_place_and_combines():
    assert [p.name for p in to_passes("dce,onnxruntime-fp32,prune{ratio=0.3}")] == [
        "dce", "fold-bn", "canonicalize", "floor-softmax", "prune"]
    with pytest.raises(SlimgraphError, match="takes no options"):
        to_passes("onnxruntime-fp32{level=2}")


def test_passes_lists_the_presets_with_their_expansion(capsys):
    main(["passes"])
    out = capsys.readouterr().out
    assert "onnxruntime-fp32     = fold-bn,canonicalize,floor-softmax\n" in out
    assert "onnxruntime-int8     = fold-bn,canonicalize,floor-softmax,quantize,fold-int8  (CNNs" in out
    assert "= fold-bn,canonicalize,floor-softmax,smooth,quantize{activations=dynamic,skip=[auto],float_budget=0.2}" \
           "  (transformers)" in out


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x))


def test_onnxruntime_int8_chooses_static_qdq_for_a_cnn():
    data = [(torch.randn(2, 3, 16, 16),) for _ in range(4)]
    result = slimgraph.optimize(SmallCNN().eval(), "onnxruntime-int8", example_inputs=data[0], calibration_data=data)
    assert [r.name for r in result.trace] == ["fold-bn", "canonicalize", "floor-softmax", "quantize", "fold-int8"]
    ops = {n.op_type for n in result.to_onnx().graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_onnxruntime_int8_is_a_preset_the_manager_expands_and_that_combines():
    pipeline = to_passes("dce,onnxruntime-int8,dce")
    assert [p.name for p in pipeline] == ["dce", "onnxruntime-int8", "dce"]
    assert str(pipeline[1]) == "onnxruntime-int8"
    with pytest.raises(SlimgraphError, match="takes no options"):
        to_passes("onnxruntime-int8{alpha=0.5}")


# calibration text apart from the sentences the embeddings are checked on
CALIBRATION = ["The quick brown fox jumps over the lazy dog near the river bank.",
               "Neural networks learn representations of text from large corpora.",
               "Please send the quarterly report to the finance team by Friday.",
               "She played the violin at the concert hall last night.",
               "Mount Everest is the highest mountain above sea level.",
               "The committee postponed its decision until more data was available.",
               "Rain is expected across the northern regions this weekend.",
               "He fixed the bug by checking the length of the input first."]
HELD_OUT = SENTENCES + ["A retrieval system ranks documents by the similarity of their embeddings.",
                        "The train to the airport leaves every twenty minutes.",
                        "Compilers rewrite programs into faster programs that compute the same thing."]


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def test_onnxruntime_fp32_on_minilm_keeps_symbolic_sizes_and_the_embeddings():
    model, tokenizer = minilm()
    trace = dict(tokenizer(SENTENCES[:2], padding="max_length", max_length=16, return_tensors="pt"))
    dims = {name: {0: "batch", 1: "seq"} for name in trace}
    result = slimgraph.optimize(model, "onnxruntime-fp32", example_inputs=trace, dynamic_dims=dims)
    proto = result.to_onnx()
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input] == [["batch", "seq"]] * 3
    # two sentences padded to 37 tokens, and the real sentences as a padded batch
    for feed in (dict(tokenizer(SENTENCES[:2], padding="max_length", max_length=37, return_tensors="pt")),
                 dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))):
        with torch.no_grad():
            want = mean_pooled(model(**feed)[0], feed["attention_mask"])
        hidden = run_onnxruntime(proto, [feed[v.name] for v in result.graph.inputs])[0]
        assert tuple(hidden.shape[:2]) == tuple(feed["input_ids"].shape)
        got = mean_pooled(hidden, feed["attention_mask"])
        assert torch.nn.functional.cosine_similarity(got, want).min() > 0.9999


def test_onnxruntime_int8_on_minilm_keeps_symbolic_sizes_and_the_embeddings():
    """Transformers get SmoothQuant and dynamic int8 (DynamicQuantizeMatMul) from the preset."""
    model, tokenizer = minilm()
    trace = dict(tokenizer(SENTENCES[:2], padding="max_length", max_length=16, return_tensors="pt"))
    dims = {name: {0: "batch", 1: "seq"} for name in trace}
    calibration = []
    for sentence in CALIBRATION:  # each at its own length
        encoded = dict(tokenizer([sentence], return_tensors="pt"))
        calibration.append(tuple(encoded[name] for name in trace))
    result = slimgraph.optimize(model, "onnxruntime-int8", example_inputs=trace, dynamic_dims=dims,
                                calibration_data=calibration)
    assert [r.name for r in result.trace] == ["fold-bn", "canonicalize", "floor-softmax", "smooth", "quantize"]
    assert len(result.trace[2].pass_stats["floored"]) == 6  # one masked softmax per layer
    proto = result.to_onnx()
    float_layers = result.trace[-1].pass_stats["kept_float_by_auto"]
    assert float_layers  # the budget itself is checked in test_quantize
    dynamic_int8 = sum(n.op_type == "DynamicQuantizeMatMul" for n in proto.graph.node)
    assert dynamic_int8 == 37 - len(float_layers)  # 6 x 6 linears + pooler
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input] == [["batch", "seq"]] * 3
    for feed in (dict(tokenizer(HELD_OUT[:2], padding="max_length", max_length=37, return_tensors="pt")),
                 dict(tokenizer(HELD_OUT, padding=True, return_tensors="pt"))):
        with torch.no_grad():
            want = mean_pooled(model(**feed)[0], feed["attention_mask"])
        hidden = run_onnxruntime(proto, [feed[v.name] for v in result.graph.inputs])[0]
        assert tuple(hidden.shape[:2]) == tuple(feed["input_ids"].shape)
        got = mean_pooled(hidden, feed["attention_mask"])
        assert torch.nn.functional.cosine_similarity(got, want).min() > 0.99
