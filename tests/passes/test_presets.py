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
        "dce", "fold-bn", "canonicalize", "prune"]
    with pytest.raises(SlimgraphError, match="takes no options"):
        to_passes("onnxruntime-fp32{level=2}")


def test_passes_lists_the_presets_with_their_expansion(capsys):
    main(["passes"])
    out = capsys.readouterr().out
    assert "onnxruntime-fp32     = fold-bn,canonicalize" in out


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
