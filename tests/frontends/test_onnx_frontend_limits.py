"""Resource limits of the ONNX frontend: sizes are checked before anything is allocated for them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.errors import SlimgraphError


def model_with(initializer: onnx.TensorProto, input_dims=(1, 4)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Add", ["x", initializer.name], ["y"])], "g", [x], [y], [initializer])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_tensor_declaring_a_trillion_elements_is_refused_before_allocation(tmp_path):
    huge = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    del huge.dims[:]
    huge.dims.extend([10**6, 10**6])  # 4 TB declared, 16 bytes held
    path = tmp_path / "huge.onnx"
    onnx.save(model_with(huge), path)
    with pytest.raises(SlimgraphError, match=r"tensor 'w' declares \[1000000, 1000000\] \(4,000,000,000,000 bytes\)"):
        slimgraph.optimize(str(path), "dce")


def test_the_cap_is_configurable_and_counts_all_tensors(tmp_path):
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    path = tmp_path / "small.onnx"
    onnx.save(model_with(w), path)
    assert slimgraph.optimize(str(path), "dce").graph is not None
    with pytest.raises(SlimgraphError, match="over the cap of 8 bytes"):
        slimgraph.optimize(str(path), "dce", max_constant_bytes=8)


def test_declared_and_held_sizes_must_agree():
    short = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    short.raw_data = short.raw_data[:8]
    with pytest.raises(SlimgraphError, match=r"tensor 'w' declares \[1, 4\] but holds 8 of the 16 bytes"):
        slimgraph.import_model(model_with(short))
    negative = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    negative.dims[0] = -1
    with pytest.raises(SlimgraphError, match="negative dims"):
        slimgraph.import_model(model_with(negative))


def test_a_graph_input_too_large_to_sample_is_refused():
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    with pytest.raises(SlimgraphError, match="graph input 'x' declares dims"):
        slimgraph.import_model(model_with(w, input_dims=(10**7, 10**7)))


@pytest.mark.parametrize("op,inputs", [
    ("ConstantOfShape", [np.array([10**6, 10**6], np.int64)]),
    ("Expand", [np.ones((1, 1), np.float32), np.array([10**6, 10**6], np.int64)]),
    ("Tile", [np.ones((2, 2), np.float32), np.array([10**6, 10**6], np.int64)]),
    ("Range", [np.array(0, np.int64), np.array(10**13, np.int64), np.array(1, np.int64)]),
])
def test_a_static_node_whose_output_would_not_fit_is_refused_before_it_is_evaluated(op, inputs):
    names = [f"c{i}" for i in range(len(inputs))]
    initializers = [numpy_helper.from_array(a, n) for a, n in zip(inputs, names)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node(op, names, ["big"], name="blowup"), helper.make_node("Shape", ["big"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["sf"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [out], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(SlimgraphError, match=rf"node big \({op}\): its output would hold"):
        slimgraph.import_model(model)
