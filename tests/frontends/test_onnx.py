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
from slimgraph.ir import run
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
