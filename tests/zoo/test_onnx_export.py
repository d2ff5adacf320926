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
