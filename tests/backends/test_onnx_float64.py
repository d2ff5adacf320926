"""float64 graphs in onnxruntime: the ops its CPU provider has no double kernel for
(NO_DOUBLE_KERNEL) run in float32 between Casts; everything else stays float64, and float32
graphs get no Cast at all."""

import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import slimgraph
from slimgraph.backends.onnx import NO_DOUBLE_KERNEL, run_onnxruntime
from slimgraph.ir import DType, Graph, run

# one node of each op, in float64 ({name: (inputs, attrs, opset)}): enough for a session to look its kernel up
_SPECS = {
    "Conv": (2, {}, 17), "ConvTranspose": (2, {}, 17), "AveragePool": (1, {"kernel_shape": [2, 2]}, 17),
    "InstanceNormalization": (3, {}, 17), "LRN": (1, {"size": 3}, 17), "GridSample": (2, {}, 17),
    "Resize": (3, {}, 17),
}


def _session_error(op: str, elem_type: int) -> str | None:
    inputs, attrs, opset = _SPECS.get(op, (1, {}, 17))
    names = [f"i{k}" for k in range(inputs)]
    types = [TensorProto.FLOAT if op == "Resize" and k == 2 else elem_type for k in range(inputs)]  # scales
    if op == "Resize":
        names[1] = ""  # no region of interest
    node = helper.make_node(op, names, ["y"], **attrs)
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types) if n]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", elem_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("op", sorted(NO_DOUBLE_KERNEL))
def test_each_listed_op_lacks_a_double_kernel_in_the_installed_onnxruntime(op):
    """An onnxruntime that gains the kernel fails here: drop the op from the list."""
    assert _session_error(op, TensorProto.FLOAT) is None
    error = _session_error(op, TensorProto.DOUBLE)
    assert error is not None and "Could not find an implementation" in error, error


def _graph(dtype: DType) -> tuple[Graph, list[torch.Tensor]]:
    """conv -> softplus -> atan -> group norm (InstanceNormalization) -> cos (which has a double kernel)."""
    g = Graph("float64")
    x = g.add_input("x", (2, 3, 5, 5), dtype)
    w = g.add_constant("w", torch.randn(4, 3, 3, 3, dtype=dtype.torch) / 3)
    y = g.create_node("conv", [x, w], {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1}).output
    for op in ("softplus", "atan"):
        y = g.create_node(op, [y]).output
    scale, shift = (g.add_constant(n, torch.randn(4, dtype=dtype.torch)) for n in ("gamma", "beta"))
    y = g.create_node("group_norm", [y, scale, shift], {"num_groups": 2, "eps": 1e-5}).output
    g.set_outputs([g.create_node("cos", [y]).output])
    return g, [torch.randn(2, 3, 5, 5, dtype=dtype.torch)]


def test_a_float64_graph_runs_its_kernelless_ops_in_float32():
    graph, inputs = _graph(DType.float64)
    proto = slimgraph.to_onnx(graph)
    ops = [n.op_type for n in proto.graph.node]
    wrapped = {op for op in ops if op in NO_DOUBLE_KERNEL}
    assert wrapped == {"Conv", "Softplus", "Atan", "InstanceNormalization"}
    # every wrapped node reads Casts to float32 and is read by Casts back
    casts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Cast"}
    for node in proto.graph.node:
        if node.op_type in NO_DOUBLE_KERNEL:
            assert all(casts[i].attribute[0].i == TensorProto.FLOAT for i in node.input if i in casts)
            assert any(i in casts for i in node.input)
    (got,) = run_onnxruntime(proto, inputs)
    (want,) = run(graph, inputs)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (cos,) = [n for n in proto.graph.node if n.op_type == "Cos"]
    assert cos.input[0] not in casts or casts[cos.input[0]].attribute[0].i == TensorProto.DOUBLE


def test_a_float32_graph_gets_no_casts():
    graph, _ = _graph(DType.float32)
    assert "Cast" not in [n.op_type for n in slimgraph.to_onnx(graph).graph.node]
