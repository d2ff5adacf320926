"""onnx's pytorch-converted and pytorch-operator node tests: import -> emit -> onnxruntime.

Every test whose ops map to canonical IR ops must match its reference outputs after a trip
through slimgraph and onnxruntime; the others (opaque ops) must still import and run in the
interpreter. The summary line reports how many are canonical.
"""

import numpy as np
import pytest

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import UnsupportedError
from slimgraph.ir import OPAQUE, run
from tests.zoo.onnx_data import NODE_TESTS, node_test_data

CANONICAL: dict[str, bool] = {}


def close(actual, expected) -> bool:
    return len(actual) == len(expected) and all(
        a.shape == e.shape and np.allclose(a, e, rtol=1e-3, atol=1e-5, equal_nan=True)
        for a, e in zip([t.numpy() for t in actual], expected)
    )


@pytest.mark.parametrize("name", NODE_TESTS)
def test_node_test(name):
    model, inputs, expected = node_test_data(name)
    graph = slimgraph.import_model(model, inputs)
    opaque = [n.attrs["impl"].target for n in graph.nodes if n.op == OPAQUE]
    CANONICAL[name] = not opaque
    assert close(run(graph, inputs), expected), "the IR interpreter disagrees with the reference"
    try:
        proto = slimgraph.to_onnx(graph)
    except UnsupportedError as exc:
        # only an opaque op whose ONNX definition changed between opsets may refuse emission
        assert opaque and "means something else at opset" in str(exc)
        return
    assert close(run_onnxruntime(proto, inputs), expected)


def test_every_node_test_folder_is_collected():
    assert len(NODE_TESTS) == 117
