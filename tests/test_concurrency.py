"""optimize() on different models in several threads at once computes what it does one at a time."""

from __future__ import annotations

import concurrent.futures

import torch
from torch import nn

import slimgraph
from slimgraph.ir import print_graph, run
from tests.frontends.test_transformers import FAMILIES


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 4))

    def forward(self, x):
        return self.body(x)


def jobs():
    """(model, pipeline, example inputs, calibration data): CNNs and transformers, exact and lossy passes."""
    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    cal = [(torch.randn(2, 3, 16, 16),) for _ in range(3)]
    build, make_inputs, _ = FAMILIES["bert"]
    bert = build().eval()
    gpt2_build, gpt2_inputs, _ = FAMILIES["gpt2"]
    gpt2 = gpt2_build().eval()
    proto = slimgraph.to_onnx(slimgraph.import_model(cnn, (x,)))  # the ONNX frontend too
    return [
        (proto, "dce,fold-bn,canonicalize", (x,), None),
        (cnn, "fold-bn,prune{ratio=0.5},canonicalize", (x,), None),
        (cnn, "onnxruntime-int8", (x,), cal),
        (bert, "onnxruntime-fp32,fuse", make_inputs(2, 12), None),
        (bert, "lowrank{rank_ratio=0.5}", make_inputs(2, 12), None),
        (gpt2, "onnxruntime-fp32", gpt2_inputs(2, 12), None),
        (cnn, "fold-bn,winograd{tile=2}", (x,), None),
    ]


def optimized(job):
    model, pipeline, inputs, cal = job
    return slimgraph.optimize(model, pipeline, example_inputs=inputs, calibration_data=cal).graph


def test_optimize_in_threads_equals_one_at_a_time():
    """Same graphs, and outputs equal to float rounding: torch's kernels split their sums
    differently when threads share its pool, so bits may differ in the last places."""
    work = jobs()
    alone = [optimized(job) for job in work]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(optimized, work * 2))  # every job twice, in flight together
    for job, one, other in zip(work * 2, alone * 2, together):
        assert print_graph(one) == print_graph(other)
        inputs = job[2]
        feed = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        for a, b in zip(run(one, feed), run(other, feed)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
