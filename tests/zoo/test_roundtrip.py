"""Every torchvision classification model of the core issue: torch -> IR -> to_torch() is exact.

Random init, eval mode, batch 1 at the default input size. The share of canonical (non-opaque)
nodes is reported per model in the pytest summary; it must be 100% for every CNN.
"""

from __future__ import annotations

import pytest
import torch

import slimgraph
from slimgraph.ir import OPAQUE, verify
from tests.conftest import rel_error

torchvision = pytest.importorskip("torchvision")

CNNS = [
    "alexnet", "vgg11", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "squeezenet1_0",
    "squeezenet1_1", "densenet121", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "shufflenet_v2_x1_0", "mnasnet1_0", "efficientnet_b0", "regnet_x_400mf",
    "convnext_tiny",
]
TRANSFORMERS = ["vit_b_16", "swin_t"]
HEAVY = {"vgg11", "wide_resnet50_2", "inception_v3", "vit_b_16", "alexnet", "swin_t", "convnext_tiny"}

CANONICAL_SHARE: dict[str, float] = {}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for module in model.modules():  # zero-initialized heads (ViT) would make the check vacuous
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)
    size = 299 if name == "inception_v3" else 224
    return model, torch.randn(1, 3, size, size)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in CNNS + TRANSFORMERS]
)
def test_torch_roundtrip(name):
    model, x = build(name)
    graph = slimgraph.import_model(model, (x,))
    verify(graph)
    canonical = sum(n.op != OPAQUE for n in graph.nodes) / len(graph)
    CANONICAL_SHARE[name] = canonical
    with torch.no_grad():
        expected = model(x)
        emitted = slimgraph.to_torch(graph)
        assert rel_error(emitted(x), expected) < 1e-4
        if name in ("swin_t", "vit_b_16", "shufflenet_v2_x1_0"):  # batch-dependent reshapes inside
            x2 = torch.randn(2, *x.shape[1:])
            assert rel_error(emitted(x2), model(x2)) < 1e-4
    if name in CNNS:
        assert canonical == 1.0, f"{name}: opaque nodes {[n.name for n in graph.nodes if n.op == OPAQUE]}"
