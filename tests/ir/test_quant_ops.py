"""quantize_linear / dequantize_linear / fake_quant: ONNX semantics in the interpreter, both
backends, the ONNX frontend, and straight-through gradients in the emitted PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import DType, Graph, run


def qdq_graph(shape, scale, zero_point, axis=None, op="quantize_linear") -> Graph:
    g = Graph("q")
    x = g.add_input("x", shape, DType.float32)
    s = g.add_constant("s", torch.as_tensor(scale, dtype=torch.float32))
    z = g.add_constant("z", torch.as_tensor(zero_point))
    attrs = {} if axis is None else {"axis": axis}
    if op == "quantize_linear":
        q = g.create_node("quantize_linear", [x, s, z], attrs)
        y = g.create_node("dequantize_linear", [q.output, s, z], attrs)
        g.set_outputs([q.output, y.output])
    else:
        y = g.create_node("fake_quant", [x, s, z], attrs)
        g.set_outputs([y.output])
    return g


def test_quantize_rounds_half_to_even_and_saturates_like_onnx():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0, 0.26]])
    for zp, expected in [(torch.tensor(0, dtype=torch.uint8), [0, 2, 2, 0, 0, 255, 0, 0]),
                         (torch.tensor(10, dtype=torch.int8), [10, 12, 12, 10, 8, 127, -128, 10])]:
        g = qdq_graph(tuple(x.shape), 1.0, zp)
        q, y = run(g, [x])
        assert q.dtype == zp.dtype and q.flatten().tolist() == expected
        onnx_q, onnx_y = run_onnxruntime(slimgraph.to_onnx(g), [x])
        assert torch.equal(onnx_q, q) and torch.equal(onnx_y, y)


def test_per_channel_parameters_follow_the_axis_in_every_backend():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 3
    scale = torch.tensor([0.02, 0.05, 0.1])
    g = qdq_graph((4, 3, 5, 5), scale, torch.tensor([0, -3, 7], dtype=torch.int8), axis=1)
    q, y = run(g, [x])
    expected = torch.clamp(torch.round(x / scale.view(1, 3, 1, 1)) + torch.tensor([0, -3, 7]).view(1, 3, 1, 1),
                           -128, 127)
    assert torch.equal(q.to(torch.int64), expected.to(torch.int64))
    onnx_q, onnx_y = run_onnxruntime(slimgraph.to_onnx(g), [x])
    assert torch.equal(onnx_q, q) and torch.allclose(onnx_y, y)
    torch_q, torch_y = slimgraph.to_torch(g)(x)
    assert torch.equal(torch_q, q) and torch.allclose(torch_y, y)


def test_fake_quant_matches_quantize_then_dequantize_and_emits_qdq():
    torch.manual_seed(0)
    x = torch.randn(2, 8) * 2
    fq = qdq_graph((2, 8), 0.03, torch.tensor(128, dtype=torch.uint8), op="fake_quant")
    qdq = qdq_graph((2, 8), 0.03, torch.tensor(128, dtype=torch.uint8))
    assert torch.equal(run(fq, [x])[0], run(qdq, [x])[1])
    proto = slimgraph.to_onnx(fq)
    assert [n.op_type for n in proto.graph.node] == ["QuantizeLinear", "DequantizeLinear"]
    assert torch.allclose(run_onnxruntime(proto, [x])[0], run(fq, [x])[0])
    module = slimgraph.to_torch(fq)
    assert "fake_quant(x, 0.03, 128, 0, 255)" in module.code
    assert torch.equal(module(x), run(fq, [x])[0])  # the very same arithmetic, bit for bit


def test_emitted_fake_quant_rounds_ties_and_near_ties_as_onnx_quantize_linear_does():
    """x / scale, then round half to even: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2. Near ties too: x =
    (n + 0.5) * 0.3 in float32 lands just off the tie, where x * (1 / scale) (what
    torch.fake_quantize_* computes) now and then rounds the other way."""
    ties = torch.tensor([[0.5, 1.5, 2.5, 3.5, -0.5, -2.5, -3.5, 200.5]])
    g = qdq_graph(tuple(ties.shape), 1.0, torch.tensor(0, dtype=torch.int8), op="fake_quant")
    assert slimgraph.to_torch(g)(ties).tolist() == [[0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -4.0, 127.0]]

    near = ((torch.arange(-128, 127, dtype=torch.float32) + 0.5) * torch.tensor(0.3)).reshape(1, -1)
    g = qdq_graph(tuple(near.shape), 0.3, torch.tensor(128, dtype=torch.uint8), op="fake_quant")
    onnx_y = run_onnxruntime(slimgraph.to_onnx(g), [near])[0]  # QuantizeLinear -> DequantizeLinear
    assert torch.equal(slimgraph.to_torch(g)(near), onnx_y) and torch.equal(run(g, [near])[0], onnx_y)
    inverse = torch.fake_quantize_per_tensor_affine(near, 0.3, 128, 0, 255)
    assert int((inverse != onnx_y).sum()) > 10  # the cases the emitted module must not follow


def test_dequantize_int32_without_zero_point():
    g = Graph("bias")
    q = g.add_input("q", (3,), DType.int32)
    s = g.add_constant("s", torch.tensor([0.5, 0.25, 2.0]))
    g.set_outputs([g.create_node("dequantize_linear", [q, s], {"axis": 0}).output])
    q_in = torch.tensor([4, -8, 1000000], dtype=torch.int32)
    expected = torch.tensor([2.0, -2.0, 2000000.0])
    assert torch.equal(run(g, [q_in])[0], expected)
    assert torch.equal(run_onnxruntime(slimgraph.to_onnx(g), [q_in])[0], expected)
    assert torch.equal(slimgraph.to_torch(g)(q_in), expected)


def test_bad_parameters_are_refused_naming_the_node():
    g = Graph()
    x = g.add_input("x", (1, 3, 4), DType.float32)
    s = g.add_constant("s", torch.tensor([0.1, 0.2]))
    z = g.add_constant("z", torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(slimgraph.SlimgraphError, match="quantize_linear.*shape"):
        g.create_node("quantize_linear", [x, s, z], {"axis": 1}, name="quantize_linear")


def test_emitted_fake_quant_trains_with_straight_through_gradients():
    """The ground QAT stands on: gradients pass the rounding (and stop where it saturates)."""
    g = Graph("ste")
    x = g.add_input("x", (1, 4), DType.float32)
    w = g.add_constant("w", torch.tensor([[0.5, -1.0, 0.25, 2.0]]), trainable=True)
    ws = g.add_constant("w_scale", torch.tensor([2.0 / 127]))
    wz = g.add_constant("w_zero_point", torch.zeros(1, dtype=torch.int8))
    wq = g.create_node("fake_quant", [w, ws, wz], {"axis": 0})
    xs = g.add_constant("x_scale", torch.tensor(0.01))
    xz = g.add_constant("x_zero_point", torch.tensor(128, dtype=torch.uint8))
    xq = g.create_node("fake_quant", [x, xs, xz])
    g.set_outputs([g.create_node("linear", [xq.output, wq.output]).output])
    module = slimgraph.to_torch(g).train()
    assert "fake_quant(self.w, self.w_scale, 0, -128, 127, axis=0)" in module.code
    params = dict(module.named_parameters())
    assert list(params) == ["w"]  # scales not marked trainable stay fixed (quantize marks its own)
    inp = torch.tensor([[0.3, -0.2, 5.0, 0.1]], requires_grad=True)  # 5.0 saturates (max 1.27)
    module(inp).sum().backward()
    assert torch.allclose(params["w"].grad, torch.round(inp.detach() / 0.01).clamp(-128, 127) * 0.01)
    assert inp.grad[0, 2] == 0 and bool((inp.grad[0, [0, 1, 3]] != 0).all())


def test_onnx_qdq_models_import_with_int8_weights_kept():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32) * np.arange(1, 5, dtype=np.float32), "w_s"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_z"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    imported = slimgraph.import_model(model)
    ops = [n.op for n in imported.nodes]
    assert ops == ["quantize_linear", "dequantize_linear", "dequantize_linear", "conv"]
    assert any(v.dtype == DType.int8 and v.shape == (4, 3, 3, 3) for v in imported.constants.values())
    x = torch.randn(1, 3, 8, 8)
    expected = run_onnxruntime(model, [x])[0]
    assert torch.allclose(run(imported, [x])[0], expected, atol=1e-5)
    assert torch.allclose(run_onnxruntime(slimgraph.to_onnx(imported), [x])[0], expected, atol=1e-5)
    assert isinstance(onnx.load_from_string(slimgraph.to_onnx(imported).SerializeToString()), onnx.ModelProto)
