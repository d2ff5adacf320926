"""prune{ratio=0.5} on every torchvision model of the list: it runs in eval mode in both
backends, trains in PyTorch, and params and MACs drop."""

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from tests.conftest import rel_error
from tests.zoo.test_roundtrip import CNNS, HEAVY, TRANSFORMERS, build


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in CNNS + TRANSFORMERS]
)
def test_prune_half(name):
    model, x = build(name)
    result = slimgraph.optimize(model, "prune{ratio=0.5}", example_inputs=(x,))
    record = result.trace[0]
    assert record.changed
    assert record.stats_after["params"] < record.stats_before["params"]
    assert record.stats_after["macs"] < record.stats_before["macs"]
    module = result.to_torch()
    with torch.no_grad():
        y = module(x)
    (y_onnx,) = run_onnxruntime(result.to_onnx(), [x])
    assert y.shape == model(x).shape and rel_error(y_onnx, y) < 1e-4
    module.train()
    batch = torch.cat([x, x.flip(0) + 0.1])  # trains at another batch size than the import's
    module(batch).square().mean().backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
