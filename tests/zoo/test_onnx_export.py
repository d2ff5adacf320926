"""Every torchvision model of the core issue: torch -> IR -> ONNX (full checker) -> onnxruntime."""

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from tests.conftest import rel_error
from tests.zoo.test_roundtrip import CNNS, HEAVY, TRANSFORMERS, build


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in CNNS + TRANSFORMERS]
)
def test_torch_to_onnx(name, tmp_path):
    model, x = build(name)
    graph = slimgraph.import_model(model, (x,))
    slimgraph.to_onnx(graph, tmp_path / "m.onnx")  # runs onnx.checker.check_model(full_check=True)
    (y,) = run_onnxruntime(tmp_path / "m.onnx", [x])
    with torch.no_grad():
        assert rel_error(y, model(x)) < 1e-4
    # with a symbolic batch dim the same file runs at another batch size
    proto = slimgraph.to_onnx(graph, dynamic_batch=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    batch = torch.cat([x, x.flip(0) + 0.1])
    (y,) = run_onnxruntime(proto, [batch])
    with torch.no_grad():
        assert rel_error(y, model(batch)) < 1e-4
