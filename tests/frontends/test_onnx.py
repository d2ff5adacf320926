"""ONNX import: bad files are refused with a clear error and nothing is written; names are data."""

import ast

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.cli import main
from slimgraph.errors import SlimgraphError
from slimgraph.ir import print_graph, run
from tests.conftest import HostRoundTrip


def small_model(opset: int = 17, names: dict | None = None) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Flatten -> Gemm, with optional names replacing the defaults."""
    n = {"x": "x", "w": "w", "conv": "conv", "relu": "relu", "flat": "flat", "fc_w": "fc_w", "y": "y"}
    n.update(names or {})
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), n["w"]),
             numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32), n["fc_w"])]
    nodes = [
        helper.make_node("Conv", [n["x"], n["w"]], [n["conv"]], name=n["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [n["conv"]], [n["relu"]], name=n["relu"]),
        helper.make_node("Flatten", [n["relu"]], [n["flat"]], name=n["flat"]),
        helper.make_node("Gemm", [n["flat"], n["fc_w"]], [n["y"]], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info(n["x"], TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info(n["y"], TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_small_model_roundtrip_and_symbolic_batch(tmp_path):
    model = small_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    x = torch.randn(1, 3, 4, 4)
    (expected,) = run_onnxruntime(model, [x])
    graph = slimgraph.import_model(model)
    assert torch.allclose(run(graph, [x])[0], expected, atol=1e-5)
    proto = slimgraph.to_onnx(graph, tmp_path / "out.onnx")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    batch = torch.randn(3, 3, 4, 4)
    assert torch.allclose(run_onnxruntime(proto, [batch])[0], run_onnxruntime(model, [batch])[0], atol=1e-5)


def cli_refuses(tmp_path, model_path, message):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "--passes", "dce", "-o", str(out)]) == 1
    assert not out.exists()
    with pytest.raises(SlimgraphError, match=message):
        slimgraph.import_model(model_path)


def test_truncated_file(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(small_model().SerializeToString()[:200])
    cli_refuses(tmp_path, path, "not a valid ONNX file")
    assert "not a valid ONNX file" in capsys.readouterr().err


def test_cycle(tmp_path):
    model = small_model()
    model.graph.node[0].input[0] = "relu"  # conv reads relu, relu reads conv
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    cli_refuses(tmp_path, path, r"cycle: conv \(Conv\) -> relu \(Relu\)")


def test_dangling_input(tmp_path):
    model = small_model()
    model.graph.node[1].input[0] = "nowhere"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    cli_refuses(tmp_path, path, "node relu .*input 'nowhere' is not produced")


def test_external_data_outside_the_model_folder(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(108, dtype=np.float32).tobytes())
    folder = tmp_path / "models"
    folder.mkdir()
    model = small_model()
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../secret.bin")
    onnx.save(model, folder / "m.onnx")
    cli_refuses(tmp_path, folder / "m.onnx", "external data path '../secret.bin' leaves the model's folder")


def test_external_data_inside_the_folder_loads(tmp_path):
    model = small_model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    graph = slimgraph.import_model(tmp_path / "m.onnx")
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(run(graph, [x])[0], run_onnxruntime(small_model(), [x])[0], atol=1e-5)


def test_opset_newer_than_supported(tmp_path):
    path = tmp_path / "m.onnx"
    model = small_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    onnx.save(model, path)
    cli_refuses(tmp_path, path, f"opset {onnx.defs.onnx_opset_version() + 1} is newer than")


def test_emit_refuses_to_overwrite(tmp_path):
    graph = slimgraph.import_model(small_model())
    out = tmp_path / "out.onnx"
    out.write_text("keep me")
    with pytest.raises(SlimgraphError, match="already exists"):
        slimgraph.to_onnx(graph, out)
    assert out.read_text() == "keep me"


def test_torch_opaque_nodes_have_no_onnx_form():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.host = HostRoundTrip(4)

        def forward(self, x):
            return self.host(x)

    graph = slimgraph.import_model(M(), torch.randn(1, 4))
    with pytest.raises(SlimgraphError, match=r"1 node\(s\) have no ONNX form: host \(host\)"):
        slimgraph.to_onnx(graph)


def test_names_are_data_never_code(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = f"a'); __import__('os').system('touch {sentinel}'); ('\n\"\"\""
    names = {"x": evil + "x", "w": evil + "w", "conv": "import os", "relu": evil, "flat": "def f():",
             "fc_w": "self", "y": "return"}
    model = small_model(names=names)
    graph = slimgraph.import_model(model)
    module = slimgraph.to_torch(graph)
    ast.parse(module.code)
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(module(x), run_onnxruntime(model, [x])[0], atol=1e-5)
    result = slimgraph.optimize(model, "dce")
    result.save_torch(tmp_path / "out")
    ns = {}
    exec(compile((tmp_path / "out" / "model.py").read_text(), "model.py", "exec"), ns)
    assert torch.allclose(ns["load"](str(tmp_path / "out"))(x), module(x))
    assert not sentinel.exists()


def test_a_model_is_written_back_at_the_opset_it_came_in_with(tmp_path):

    x = torch.randn(1, 4)
    path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU()), (x,), str(path),
                      opset_version=15, dynamo=False)
    graph = slimgraph.import_model(str(path))
    assert graph.meta["opset"] == 15
    assert [o.version for o in slimgraph.to_onnx(graph).opset_import if o.domain in ("", "ai.onnx")] == [15]
    assert [o.version for o in slimgraph.to_onnx(graph, opset=18).opset_import if o.domain in ("", "ai.onnx")] == [18]


def _model(nodes, inputs, outputs, opset=17, inits=()):
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_opaque_op_keeps_symbolic_dims_and_runs_at_other_sizes():
    # Hardmax has no canonical form; onnx's shape inference names its output dims after the input's
    dims = ["batch", "seq", 8]
    model = _model([helper.make_node("Hardmax", ["x"], ["h"], axis=-1), helper.make_node("Relu", ["h"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    graph = slimgraph.import_model(model)
    opaque = [n for n in graph.nodes if n.op == "opaque"]
    assert [n.attrs["impl"].target for n in opaque] == ["Hardmax"]
    assert [str(e) for e in opaque[0].outputs[0].sym[:2]] == ["batch", "seq"]
    emitted = slimgraph.to_onnx(graph)
    for shape in [(3, 5, 8), (1, 11, 8)]:
        x = torch.randn(shape)
        expected = torch.nn.functional.one_hot(x.argmax(-1), 8).float()
        assert torch.equal(run(graph, [x])[0], expected)
        assert torch.equal(run_onnxruntime(emitted, [x])[0], expected)


def test_opaque_op_whose_shape_depends_on_data_says_it_runs_at_the_example_size():
    model = _model([helper.make_node("NonZero", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                   [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    x = np.array([[0, 1, 2], [3, 0, 0]], dtype=np.float32)
    with pytest.warns(UserWarning, match=r"NonZero.*known at the example sizes only"):
        result = slimgraph.optimize(model, "dce", example_inputs=[x])  # numpy inputs, as onnxruntime takes
    assert result.graph.outputs[0].shape == (2, 3)
    assert np.array_equal(run_onnxruntime(result.to_onnx(), [torch.from_numpy(x)])[0].numpy(), np.stack(x.nonzero()))


def test_subgraphs_reading_outer_values_import_run_and_emit():
    # an If whose branches read `x` and `w` from the enclosing graph, not through the node's inputs
    then_graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    model = _model([helper.make_node("Relu", ["x0"], ["x"]),
                    helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
                   [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [2, 3]),
                    helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                   inits=[numpy_helper.from_array(np.full((2, 3), 2.0, np.float32), "w")])
    x = torch.randn(2, 3)
    for cond, expected in [(True, x.relu() + 2), (False, x.relu() * 2)]:
        result = slimgraph.optimize(model, "dce", example_inputs=[x, torch.tensor(cond)])
        assert torch.allclose(run(result.graph, [x, torch.tensor(cond)])[0], expected)
        assert torch.allclose(run_onnxruntime(result.to_onnx(), [x, torch.tensor(cond)])[0], expected)


def test_unused_optional_outputs_and_a_partly_mapped_node():
    # LSTM's first output unnamed; Dropout's mask used: the mapped form (identity) lacks it, so opaque
    rng = np.random.default_rng(0)
    w, r = (numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
            for n, s in [("W", (1, 12, 2)), ("R", (1, 12, 3))])
    model = _model([helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], hidden_size=3),
                    helper.make_node("Dropout", ["h"], ["d", "mask"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2])],
                   [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, 3, 3]),
                    helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 3, 3])], inits=[w, r])
    x = torch.randn(1, 3, 2)
    graph = slimgraph.optimize(model, "dce", example_inputs=[x]).graph
    assert [n.attrs["impl"].target for n in graph.nodes if n.op == "opaque"] == ["LSTM", "Dropout"]
    d, mask = run_onnxruntime(slimgraph.to_onnx(graph), [x])
    expected = run_onnxruntime(model, [x])
    assert torch.allclose(d, expected[0], atol=1e-6) and bool(mask.all())


def test_an_old_op_that_changed_meaning_is_rewritten_for_the_opset_written():
    # Upsample-9 is gone at opset 13: it comes back as Resize (onnx's version converter); the
    # model itself goes back at opset 9 where that converter can write it, else at 13 with a warning
    model = _model([helper.make_node("Upsample", ["x", "scales"], ["y"], mode="nearest")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 6])], opset=9,
                   inits=[numpy_helper.from_array(np.array([1, 1, 2, 3], np.float32), "scales")])
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    graph = slimgraph.import_model(model)
    with pytest.warns(UserWarning, match="cannot write the model at opset 9"):
        emitted = slimgraph.to_onnx(graph)
    assert "Resize" in [n.op_type for n in emitted.graph.node]
    expected = x.repeat_interleave(2, 2).repeat_interleave(3, 3)
    assert torch.equal(run_onnxruntime(emitted, [x])[0], expected)
    with pytest.raises(SlimgraphError, match="cannot write the model at opset 9"):
        slimgraph.to_onnx(graph, opset=9)  # asked for: an error, not a warning


def test_wide_unsigned_integers_stay_opaque_and_run():
    model = _model([helper.make_node("Add", ["a", "b"], ["y"])],
                   [helper.make_tensor_value_info(n, TensorProto.UINT32, [3]) for n in "ab"],
                   [helper.make_tensor_value_info("y", TensorProto.UINT32, [3])])
    a, b = np.array([1, 2, 4_000_000_000], np.uint32), np.array([5, 6, 7], np.uint32)
    result = slimgraph.optimize(model, "dce", example_inputs=[a, b])
    assert [n.attrs["impl"].target for n in result.graph.nodes if n.op == "opaque"] == ["Add"]
    feeds = [torch.from_numpy(a), torch.from_numpy(b)]
    assert np.array_equal(run_onnxruntime(result.to_onnx(), feeds)[0].numpy(), a + b)


def test_string_example_inputs_are_refused_clearly():
    model = _model([helper.make_node("Identity", ["s"], ["y"])],
                   [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
                   [helper.make_tensor_value_info("y", TensorProto.STRING, [1])])
    with pytest.raises(SlimgraphError, match="strings"):
        slimgraph.optimize(model, "dce", example_inputs=[np.array(["a"], dtype=object)])
    with pytest.raises(SlimgraphError, match="tensor 's'"):
        slimgraph.import_model(model)


@pytest.mark.parametrize("trans_b,alpha,beta", [(1, 1.0, 1.0), (0, 1.0, 1.0), (1, 2.0, 0.5)])
def test_gemm_keeps_the_files_tensor_names_where_it_uses_them_as_they_are(trans_b, alpha, beta):
    """A linear on [B, E] is written as Gemm: read back, its weight and bias keep their names (a
    transposed weight is named as linear-form names one: <name>_t); scaled ones are the node's."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    model = _model([helper.make_node("Gemm", ["x", "fc_weight", "fc_bias"], ["y"], name="fc", transB=trans_b,
                                     alpha=alpha, beta=beta)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                   inits=[numpy_helper.from_array(w, "fc_weight"), numpy_helper.from_array(b, "fc_bias")])
    graph = slimgraph.import_model(model)
    (linear,) = graph.nodes
    want = {(1, 1.0): ["fc_weight", "fc_bias"], (0, 1.0): ["fc_weight_t", "fc_bias"], (1, 2.0): ["y_weight", "y_bias"]}
    assert linear.op == "linear" and [v.name for v in linear.inputs[1:]] == want[trans_b, alpha]
    x = torch.randn(2, 4)
    torch.testing.assert_close(run(graph, [x])[0], run_onnxruntime(model, [x])[0])
    again = slimgraph.import_model(slimgraph.to_onnx(graph))
    assert print_graph(again) == print_graph(graph)


@pytest.mark.parametrize("indices", [np.array(-1), np.array([-1, 0]), np.array([[0, -2]])])
def test_gather_of_constant_indices_along_a_symbolic_dim_counts_from_its_run_time_end(indices):
    """A negative index was made positive at the example's size: at seq 7 index -1 read row 1 of 7."""
    model = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   inits=[numpy_helper.from_array(indices.astype(np.int64), "i")])
    graph = slimgraph.import_model(model)
    emitted, module = slimgraph.to_onnx(graph), slimgraph.to_torch(graph)
    for shape in [(2, 7), (3, 2)]:
        x = torch.randn(shape)
        want = x[:, torch.from_numpy(indices)]
        assert torch.equal(run(graph, [x])[0], want)
        assert torch.equal(torch.as_tensor(run_onnxruntime(emitted, [x])[0]), want)
        with torch.no_grad():
            assert torch.equal(module(x), want)


@pytest.mark.parametrize("dims,indices", [((2, 0), [0]), ((2, 3), [3]), ((2, 3), [-4])])
def test_gather_of_constant_indices_outside_the_dim_is_refused(dims, indices):
    """They were taken modulo the size: another graph, or a ZeroDivisionError on an empty dim."""
    model = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   inits=[numpy_helper.from_array(np.array(indices, dtype=np.int64), "i")])
    with pytest.raises(SlimgraphError, match=rf"node y \(Gather\).*outside axis 1 of size {dims[1]}"):
        slimgraph.import_model(model)
