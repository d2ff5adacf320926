"""Decoders with a key/value cache (issue 15, part 1): ``optimize(..., kv_cache=True)`` gives one
generation step with Optimum's inputs and outputs; greedy decoding with it, in onnxruntime and in
the emitted PyTorch module, makes the tokens Hugging Face's ``generate(do_sample=False)`` makes."""

from __future__ import annotations

import os

import onnx
import pytest
import torch

import slimgraph
from slimgraph import SlimgraphError
from slimgraph.generate import Step, decode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 96
NEW_TOKENS = 32


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))


DECODERS = {"gpt2": gpt2, "llama": llama}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return DECODERS[name]().eval()


def prompt(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, do_sample=False,
                              max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("passes", ["dce", "canonicalize,fuse"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_greedy_tokens_equal_hugging_face_generate_in_both_backends(name, passes):
    model = build(name)
    ids = prompt()
    result = slimgraph.optimize(model, passes, example_inputs=(ids,), kv_cache=True)
    want = hf_greedy(model, ids)
    assert want.shape == (2, 7 + NEW_TOKENS)
    for backend in ("onnxruntime", "torch"):
        got = result.generate(ids, max_new_tokens=NEW_TOKENS, backend=backend)
        assert torch.equal(got, want), backend


def test_left_padded_batch_decodes_as_hugging_face_does():
    """Position ids count real tokens only: a left-padded prompt decodes as Hugging Face's
    generate decodes it (which builds position ids the same way)."""
    model = build("llama")
    ids = prompt(3, 9, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    result = slimgraph.optimize(model, "dce", example_inputs=(ids,), kv_cache=True)
    want = hf_greedy(model, ids, mask)
    for backend in ("onnxruntime", "torch"):
        assert torch.equal(result.generate(ids, NEW_TOKENS, attention_mask=mask, backend=backend), want)


def test_step_graph_has_optimums_interface_with_symbolic_dims(tmp_path):
    model = build("llama")
    graph = slimgraph.import_model(model, (prompt(),), kv_cache=True)
    path = tmp_path / "step.onnx"
    slimgraph.to_onnx(graph, path)
    proto = onnx.load(path)
    layers = model.config.num_hidden_layers
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert list(outputs) == ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["attention_mask"] == ["batch", "past_seq+seq"]
    assert inputs["past_key_values.0.key"] == ["batch", 2, "past_seq", 8]  # 2 kv heads of 8
    assert outputs["present.1.value"] == ["batch", 2, "past_seq+seq", 8]
    assert outputs["logits"] == ["batch", "seq", VOCAB]
    # the file alone decodes: slimgraph.generate reads the end token from its metadata
    want = hf_greedy(model, prompt())
    assert torch.equal(slimgraph.generate(path, prompt(), NEW_TOKENS), want)
    # a step file optimized again keeps its interface (names with dots, its metadata) and decodes the same
    again = tmp_path / "again.onnx"
    slimgraph.optimize(str(path), "canonicalize").to_onnx(again)
    assert [i.name for i in onnx.load(again).graph.input] == list(inputs)
    assert [o.name for o in onnx.load(again).graph.output] == list(outputs)
    assert torch.equal(slimgraph.generate(again, prompt(), NEW_TOKENS), want)


def test_generation_feeds_one_new_token_per_step_against_the_growing_cache():
    """The cache is used: after the prompt, every step runs one token with all earlier keys and
    values as its past (the prefix is not recomputed)."""
    model = build("gpt2")
    graph = slimgraph.import_model(model, (prompt(),), kv_cache=True)
    from slimgraph.generate import _graph_step

    step = _graph_step(graph, "torch")
    seen = []

    def recording(feeds):
        seen.append((feeds["input_ids"].shape[1], feeds["past_key_values.0.key"].shape[2],
                     feeds["attention_mask"].shape[1]))
        return step.run(feeds)

    tokens = decode(Step(step.inputs, step.past, recording), prompt(1, 5), 6, eos_token_id=None)
    assert tokens.shape == (1, 11)
    assert seen == [(5, 0, 5)] + [(1, 5 + i, 6 + i) for i in range(5)]


@pytest.mark.parametrize("passes", ["quantize{activations=dynamic}", "lowrank{rank_ratio=0.5}", "prune{ratio=0.5}",
                                    "fp16", "floor-softmax", "onnxruntime-fp32"])
def test_lossy_and_preset_pipelines_run_on_the_step_graph(passes):
    """Every pass runs on the cached graph (verified by optimize), and the result still decodes in
    both backends to the same tokens."""
    model = build("llama")
    ids = prompt()
    result = slimgraph.optimize(model, passes, example_inputs=(ids,), kv_cache=True)
    assert any(record.changed for record in result.trace)
    tokens = {b: result.generate(ids, 8, backend=b, eos_token_id=None) for b in ("onnxruntime", "torch")}
    assert tokens["torch"].shape == (2, 15)
    assert torch.equal(tokens["torch"][:, :7], ids)
    if passes != "fp16":  # fp16 rounds differently in the two runtimes; the rest compute the same
        assert torch.equal(tokens["onnxruntime"], tokens["torch"])


def test_end_token_stops_and_pads_as_hugging_face_does():
    """With the end token the model produces early, sequences that ended are padded and decoding
    stops once all have ended, as in Hugging Face's generate."""
    model = build("gpt2")
    ids = prompt()
    free = slimgraph.optimize(model, "dce", example_inputs=(ids,), kv_cache=True).generate(
        ids, 8, backend="torch", eos_token_id=None)
    end = int(free[0, 9])  # the 3rd token the first sequence makes
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = 1
    result = slimgraph.optimize(model, "dce", example_inputs=(ids,), kv_cache=True)
    want = hf_greedy(model, ids)
    assert (want[0, 10:] == 1).all()
    for backend in ("onnxruntime", "torch"):
        assert torch.equal(result.generate(ids, NEW_TOKENS, backend=backend), want)


def test_bad_uses_say_what_is_wrong():
    with pytest.raises(SlimgraphError, match="past_key_values"):
        slimgraph.optimize(torch.nn.Linear(4, 4), "dce", example_inputs=(torch.zeros(2, 4, dtype=torch.long),),
                           kv_cache=True)
    with pytest.raises(SlimgraphError, match="input_ids"):
        slimgraph.optimize(build("gpt2"), "dce", example_inputs=(torch.randn(2, 5),), kv_cache=True)
    plain = slimgraph.optimize(torch.nn.Linear(4, 4), "dce", example_inputs=(torch.randn(2, 4),))
    with pytest.raises(SlimgraphError, match="past_key_values"):
        plain.generate(prompt(), 4)
    result = slimgraph.optimize(build("gpt2"), "dce", example_inputs=(prompt(),), kv_cache=True)
    with pytest.raises(SlimgraphError, match="backend"):
        result.generate(prompt(), 4, backend="tensorrt")
    with pytest.raises(SlimgraphError, match="max_new_tokens"):
        result.generate(prompt(), -1)
    with pytest.raises(SlimgraphError, match="no such ONNX file"):
        slimgraph.generate("/nonexistent/step.onnx", prompt(), 4)


@pytest.mark.parametrize("passes", ["onnxruntime-int8", "quantize{weights=int4,group_size=16,activations=none}"])
def test_calibrated_pipelines_take_prompts_as_calibration_data(passes):
    """With kv_cache=True calibration data are prompts: each is observed as the step that reads it
    with an empty cache (as generation's first step)."""
    model = build("llama")
    prompts = [prompt(2, 9, seed=s) for s in range(4)]
    result = slimgraph.optimize(model, passes, example_inputs=(prompt(),), kv_cache=True, calibration_data=prompts)
    assert any(record.changed for record in result.trace)
    tokens = {b: result.generate(prompt(), 8, backend=b, eos_token_id=None) for b in ("onnxruntime", "torch")}
    assert tokens["torch"].shape == tokens["onnxruntime"].shape == (2, 15)
    with pytest.raises(SlimgraphError, match="prompts"):
        slimgraph.optimize(model, passes, example_inputs=(prompt(),), kv_cache=True,
                           calibration_data=[torch.randn(2, 9)])
