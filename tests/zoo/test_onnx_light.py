"""The nine model-zoo models shipped in onnx's test data: import -> dce -> emit -> onnxruntime,
and ONNX -> IR -> PyTorch source, against the expected outputs (input of ones)."""

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import OPAQUE, print_graph
from tests.zoo.onnx_data import DATA, LIGHT, load_pb

HEAVY = {"vgg19", "bvlc_alexnet", "zfnet512"}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in LIGHT])
def test_light_model(name, tmp_path):
    path = DATA / "light" / f"light_{name}.onnx"
    expected = load_pb(DATA / "light" / f"light_{name}_output_0.pb").numpy()
    result = slimgraph.optimize(path, "dce")
    graph = result.graph
    assert not [n for n in graph.nodes if n.op == OPAQUE]
    ones = torch.ones(graph.inputs[0].shape)
    out = tmp_path / f"{name}.onnx"
    result.to_onnx(out)
    (y,) = run_onnxruntime(out, [ones])
    assert rel(y.numpy(), expected) < 1e-4
    with torch.no_grad():
        assert rel(result.to_torch()(ones).numpy(), expected) < 1e-4
    # a stable round trip: ONNX -> IR -> ONNX -> IR prints the same IR
    assert print_graph(slimgraph.import_model(out)) == print_graph(graph)


def test_light_models_are_all_there():
    assert len(LIGHT) == 9
