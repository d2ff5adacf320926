"""Shared fixtures: small models and helpers. Tests run on the CPU with one thread per process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|; ``b`` must not be all zeros (tests re-init heads that are)."""
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max())
    assert scale > 0, "reference output is all zeros: the comparison would prove nothing"
    return float((a - b).abs().max()) / scale


class TinyNet(torch.nn.Module):
    """conv-bn-relu, a residual add, pooling and a classifier: the smallest real CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.drop = torch.nn.Dropout(0.0)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        y = torch.nn.functional.adaptive_avg_pool2d(y, 1)
        return self.fc(self.drop(torch.flatten(y, 1)))


class HostRoundTrip(torch.nn.Module):
    """A library layer that leaves torch for numpy (so neither torch.fx nor torch.export can trace
    it) and holds a weight: what stays opaque now that torch's own op surface converts. Its
    ``__module__`` makes torch.fx keep it as one call, as it does torch.nn's modules."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(features))

    def forward(self, x):
        import numpy as np

        return torch.from_numpy(np.tanh(x.detach().numpy())) * self.weight


HostRoundTrip.__module__ = "torch.nn.modules.host_round_trip"


def run_saved_model(folder: Path, body: str) -> str:
    """Run ``body`` in a fresh Python where importing slimgraph fails, with ``net`` loaded from the
    model.py + weights in ``folder`` (what save_torch wrote); returns what it printed."""
    preamble = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "slimgraph":
            raise ImportError("slimgraph is blocked in this process")
sys.meta_path.insert(0, Block())
import torch
spec = importlib.util.spec_from_file_location("model", {str(Path(folder) / "model.py")!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
net = mod.load({str(folder)!r})
"""
    script = preamble + textwrap.dedent(body) + '\nassert "slimgraph" not in sys.modules\n'
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def perturb_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init leaves BatchNorm as identity; give it real statistics."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return perturb_bn(TinyNet().eval()), (torch.randn(1, 3, 16, 16),)


def pytest_terminal_summary(terminalreporter):
    from tests.zoo.test_roundtrip import CANONICAL_SHARE

    if CANONICAL_SHARE:
        terminalreporter.section("canonical (non-opaque) share of nodes per model")
        for name, share in CANONICAL_SHARE.items():
            terminalreporter.write_line(f"{name:22s} {share:7.1%}")
    from tests.zoo.test_onnx_node_tests import CANONICAL

    if CANONICAL:
        terminalreporter.section("onnx node tests (pytorch-converted, pytorch-operator)")
        canonical = sorted(n for n, ok in CANONICAL.items() if ok)
        others = sorted(n for n, ok in CANONICAL.items() if not ok)
        terminalreporter.write_line(f"{len(canonical)} of {len(CANONICAL)} map to canonical ops and match "
                                    "after import -> emit -> onnxruntime")
        terminalreporter.write_line("opaque: " + ", ".join(others))
    from tests.frontends.test_onnx_node_cases import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("onnx package node test cases")
        for line in lines:
            terminalreporter.write_line(line)
