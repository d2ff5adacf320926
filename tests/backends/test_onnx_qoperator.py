"""to_onnx(..., quant_format="qoperator"): a folded int8 graph with its integer kernels written out.

Each model is emitted both ways and run in onnxruntime: the QOperator file must hold the kernels
(QLinearConv, QGemm, QLinearAdd, ...) and compute what the QDQ file computes, to one quantization
step (in practice exactly: onnxruntime fuses the QDQ file into the same kernels).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import slimgraph
from slimgraph.backends.onnx import onnxruntime_kernels, run_onnxruntime
from slimgraph.backends.onnx_qoperator import MS, to_qoperator
from slimgraph.errors import SlimgraphError
from tests.conftest import perturb_bn

PIPELINE = "fold-bn,quantize{progress=false},fold-int8"


def int8(model: nn.Module, shape: tuple[int, ...], n: int = 4, pipeline: str = PIPELINE):
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(shape, generator=gen),) for _ in range(n)]
    return slimgraph.optimize(model, pipeline, example_inputs=data[0], calibration_data=data)


def ops(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def assert_same_outputs(qdq, qop, shape, graph=None, n: int = 3) -> None:
    """The two files agree to one step: the output quantizer's where the output is quantized, else
    1/255 of the output's range (onnxruntime's QGemm writes float logits)."""
    gen = torch.Generator().manual_seed(1)
    out = graph.outputs[0].producer if graph is not None else None
    for _ in range(n):
        x = torch.randn(shape, generator=gen)
        a, b = run_onnxruntime(qdq, [x])[0], run_onnxruntime(qop, [x])[0]
        if out is not None and out.op == "dequantize_linear":
            step = float(out.inputs[1].const_value)
        else:
            step = float(a.max() - a.min()) / 255
        assert float((a - b).abs().max()) <= step * 1.001


def test_small_cnn_is_written_with_integer_operators(tiny):
    model, (x,) = tiny
    result = int8(model, tuple(x.shape))
    qdq, qop = result.to_onnx(), result.to_onnx(quant_format="qoperator")
    onnx.checker.check_model(qop, full_check=True)  # to_onnx checks it too; the contrib domain is imported
    assert any(o.domain == MS for o in qop.opset_import)
    counts = ops(qop)
    assert counts == {"QuantizeLinear": 1, "QLinearConv": 2, "QLinearAdd": 1, "QLinearGlobalAveragePool": 1,
                      "Flatten": 1, "Identity": 1, "QGemm": 1}, counts  # Identity: the dropout, on uint8
    assert {n.domain for n in qop.graph.node if n.op_type.startswith("QLinear") and n.op_type != "QLinearConv"} \
        == {MS}
    assert onnxruntime_kernels(qop).get("QLinearConv") == 2
    assert_same_outputs(qdq, qop, tuple(x.shape), result.graph)


class Mixed(nn.Module):
    """ReLU6 (folded into the quantizer), a max pool on uint8, a depthwise conv, concat, average
    pool and a product of two quantized tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.MaxPool2d(2))
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c, self.d = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a = self.a(x)
        y = nn.functional.avg_pool2d(self.c(torch.cat([a, self.b(a)], 1)), 2)
        return y * self.d(y)


def test_concat_pools_and_products_become_contrib_kernels():
    torch.manual_seed(0)
    result = int8(perturb_bn(Mixed().eval()), (1, 3, 16, 16))
    qdq, qop = result.to_onnx(), result.to_onnx(quant_format="qoperator")
    counts = ops(qop)
    assert counts.get("QLinearConv") == 4 and counts.get("QLinearConcat") == 1
    assert counts.get("QLinearAveragePool") == 1 and counts.get("QLinearMul") == 1 and counts.get("MaxPool") == 1
    assert not {"Conv", "Clip", "Concat", "AveragePool", "Mul"} & set(counts), counts
    assert counts.get("DequantizeLinear") == 1  # only the output's
    assert_same_outputs(qdq, qop, (1, 3, 16, 16), result.graph)


def test_a_relu_that_clips_inside_the_quantizer_range_keeps_its_conv_float(tiny):
    """int8 activations are symmetric (zero point 0): ReLU is not the quantizer's saturation, so
    conv1 -> ReLU stays DQ -> Conv -> Relu -> Q; conv2 (no ReLU) still becomes QLinearConv."""
    model, (x,) = tiny
    result = int8(model, tuple(x.shape), pipeline="fold-bn,quantize{activations=int8,progress=false},fold-int8")
    qdq, qop = result.to_onnx(), result.to_onnx(quant_format="qoperator")
    counts = ops(qop)
    assert counts.get("QLinearConv") == 1 and counts.get("Conv") == 1 and counts.get("Relu") == 1
    assert counts.get("QLinearAdd") == 1 and counts.get("QGemm") == 1
    assert_same_outputs(qdq, qop, tuple(x.shape), result.graph)


class Block(nn.Module):
    """Pre-norm transformer block with explicit q/k/v projections: linears on [B, L, E]."""

    def __init__(self, e: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(e, 4 * e), nn.Linear(4 * e, e)

    def forward(self, x):
        b, n, e = x.shape
        y = self.ln1(x)
        q, k, v = (p(y).reshape(b, n, self.heads, e // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (e // self.heads) ** 0.5, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, n, e))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


def test_transformer_linears_become_integer_matmuls():
    torch.manual_seed(0)
    result = int8(Block().eval(), (2, 5, 16))
    qdq, qop = result.to_onnx(), result.to_onnx(quant_format="qoperator")
    counts = ops(qop)
    # six linears (MatMul + bias) and q @ k^T have float outputs; softmax @ v is quantized
    assert counts.get("MatMulIntegerToFloat") == 7 and counts.get("QLinearMatMul") == 1, counts
    assert counts.get("QLinearAdd") == 2 and "MatMul" not in counts and "Gemm" not in counts
    assert sum(n.op_type == "Add" for n in qop.graph.node) == 1  # gelu's, not a bias (MatMulIntegerToFloat adds it)
    assert_same_outputs(qdq, qop, (2, 5, 16), result.graph)


def _qdq_model() -> onnx.ModelProto:
    """Hand-written QDQ: sigmoid, leaky relu, a MatMul with per-column weights -> Relu -> Q, and
    a Gemm (transB=0, int32 bias) with a float output."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    w_scale = (np.abs(w).max(0) / 127).astype(np.float32)
    g = rng.standard_normal((6, 4)).astype(np.float32)
    g_scale = (np.abs(g).max(0) / 127).astype(np.float32)
    s, z = np.float32(0.02), np.uint8(128)
    m_scale = np.float32(0.05)
    inits = {
        "s": np.array(s), "z": np.array(z), "s_sig": np.array(np.float32(1 / 255)), "z0": np.array(np.uint8(0)),
        "s_m": np.array(m_scale), "w_q": np.round(w / w_scale).astype(np.int8), "w_s": w_scale,
        "w_z": np.zeros(6, np.int8), "g_q": np.round(g / g_scale).astype(np.int8), "g_s": g_scale,
        "g_z": np.zeros(4, np.int8), "c_q": np.arange(-2, 2, dtype=np.int32) * 100, "c_s": m_scale * g_scale,
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"]),
        helper.make_node("Sigmoid", ["x_dq"], ["sig"]),
        helper.make_node("QuantizeLinear", ["sig", "s_sig", "z0"], ["sig_q"]),
        helper.make_node("DequantizeLinear", ["sig_q", "s_sig", "z0"], ["sig_dq"]),
        helper.make_node("LeakyRelu", ["sig_dq"], ["lr"], alpha=0.2),
        helper.make_node("QuantizeLinear", ["lr", "s_sig", "z0"], ["lr_q"]),
        helper.make_node("DequantizeLinear", ["lr_q", "s_sig", "z0"], ["lr_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], axis=1),
        helper.make_node("MatMul", ["lr_dq", "w_dq"], ["mm"]),
        helper.make_node("Relu", ["mm"], ["mm_relu"]),
        helper.make_node("QuantizeLinear", ["mm_relu", "s_m", "z0"], ["mm_q"]),
        helper.make_node("DequantizeLinear", ["mm_q", "s_m", "z0"], ["mm_dq"]),
        helper.make_node("DequantizeLinear", ["g_q", "g_s", "g_z"], ["g_dq"], axis=1),
        helper.make_node("DequantizeLinear", ["c_q", "c_s"], ["c_dq"], axis=0),
        helper.make_node("Gemm", ["mm_dq", "g_dq", "c_dq"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_hand_written_qdq_units_become_their_kernels():
    qdq = _qdq_model()
    qop, counts = to_qoperator(qdq)
    assert counts == {"QLinearSigmoid": 1, "QLinearLeakyRelu": 1, "QLinearMatMul": 1, "QGemm": 1}, counts
    assert ops(qop) == {"QuantizeLinear": 1, **counts}  # the Relu went into the quantizer (zero point 0)
    onnx.checker.check_model(qop, full_check=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(3, 8, generator=gen)
        a, b = run_onnxruntime(qdq, [x])[0], run_onnxruntime(qop, [x])[0]
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_qoperator_needs_an_int8_graph(tiny):
    model, (x,) = tiny
    plain = slimgraph.optimize(model, "fold-bn", example_inputs=x)
    with pytest.raises(SlimgraphError, match="not quantized"):
        plain.to_onnx(quant_format="qoperator")
    fake = int8(model, tuple(x.shape), 2, "fold-bn,quantize{progress=false}")
    with pytest.raises(SlimgraphError, match=r"node \S+ is a fake_quant; run fold-int8 first"):
        fake.to_onnx(quant_format="qoperator")
    with pytest.raises(SlimgraphError, match="quant_format 'qop' is not one of qdq, qoperator"):
        plain.to_onnx(quant_format="qop")


@pytest.mark.heavy
def test_resnet18_qoperator_has_every_conv_as_qlinearconv(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    result = int8(perturb_bn(torchvision.models.resnet18().eval()), (1, 3, 224, 224), n=8)
    qdq, qop = tmp_path / "qdq.onnx", tmp_path / "qop.onnx"
    result.to_onnx(qdq)
    result.to_onnx(qop, quant_format="qoperator")
    counts = ops(onnx.load(str(qop)))
    assert counts.get("QLinearConv") == 20 and counts.get("QLinearAdd") == 8 and counts.get("QGemm") == 1
    assert "Conv" not in counts and counts.get("QLinearGlobalAveragePool") == 1
    assert_same_outputs(qdq, qop, (1, 3, 224, 224), result.graph, n=2)


def test_per_channel_weights_without_zero_points_get_explicit_ones():
    """ONNX's DequantizeLinear defaults the zero point to 0; QLinearConv wants it as an input."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    s, z, y_s = np.float32(0.02), np.uint8(128), np.float32(0.05)
    inits = {"s": np.array(s), "z": np.array(z), "y_s": np.array(y_s), "y_z": np.array(np.uint8(128)),
             "w_q": np.round(w / w_scale[:, None, None, None]).astype(np.int8), "w_s": w_scale,
             "b_q": np.arange(4, dtype=np.int32) * 50, "b_s": s * w_scale}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w_dq"], axis=0),  # no zero point
        helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "y_s", "y_z"], ["c_q"]),
        helper.make_node("DequantizeLinear", ["c_q", "y_s", "y_z"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "no_zp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    qdq = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    qop, counts = to_qoperator(qdq)
    assert counts == {"QLinearConv": 1}, counts
    onnx.checker.check_model(qop, full_check=True)
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run_onnxruntime(qdq, [x])[0], run_onnxruntime(qop, [x])[0])
