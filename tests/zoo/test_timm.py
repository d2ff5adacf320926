"""Generalization: classification models of a second model library (timm), kept apart from the
torchvision zoo the frontend was first written against. Random init, batch 1, small inputs.

Each imports with no opaque node (timm's own layers included: BatchNormAct2d, a BatchNorm2d
subclass calling F.batch_norm; Conv2dSame, whose padding is computed at run time), runs in
onnxruntime as it does in torch to 1e-4, and ``prune{ratio=0.5}`` removes channels.
"""

from __future__ import annotations

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import OPAQUE
from tests.conftest import rel_error

timm = pytest.importorskip("timm")

MODELS = [
    "resnet18d", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_050", "convnext_atto", "regnetx_002",
    "ghostnet_050", "rexnet_100", "lcnet_050", "dla34", "hrnet_w18_small", "resnest14d", "cspresnet50",
    "densenet121", "vit_tiny_patch16_224", "levit_128s", "mobilevit_xxs",
]
SIZED = ("vit", "levit", "mobilevit")  # built for the input size below


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_imports_whole_runs_in_onnxruntime_and_prunes(name):
    torch.manual_seed(0)
    kwargs = {"img_size": 64} if name.startswith(SIZED) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = slimgraph.import_model(model, x)
    assert [n.attrs["impl"].target for n in graph.nodes if n.op == OPAQUE] == []
    with torch.no_grad():
        want = model(x)
    assert rel_error(run_onnxruntime(slimgraph.to_onnx(graph), [x])[0], want) < 1e-4
    pruned = slimgraph.optimize(model, "prune{ratio=0.5}", example_inputs=(x,), verify=False)
    record = pruned.trace[-1]
    assert record.pass_stats["groups"] > 0
    assert record.stats_after["params"] < 0.8 * record.stats_before["params"]
    assert pruned.to_torch()(x).shape == want.shape
