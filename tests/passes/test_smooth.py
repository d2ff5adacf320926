"""smooth (SmoothQuant): exact in float in every backend, folded where it can be, and it makes
int8 with outlier channels lose less."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import SlimgraphError
from slimgraph.ir import run


class Block(nn.Module):
    """LayerNorm whose gamma has a few outlier channels (as trained transformers' do), read only by
    a linear (foldable), then GELU read by a linear (a mul), then a residual."""

    def __init__(self, width: int = 32, outliers: float = 30.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=gen))
            self.norm.weight[[3, 17]] = outliers
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


DIMS = {"x": {0: "batch", 1: "seq"}}


def batches(n: int, seed: int, shape=(2, 7, 32)) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen),) for _ in range(n)]


def test_smooth_is_exact_in_every_backend_and_folds_into_the_layer_norm():
    model = Block().eval()
    data = batches(8, 0)
    result = slimgraph.optimize(model, "smooth{alpha=0.5}", example_inputs=data[0], calibration_data=data,
                                dynamic_dims=DIMS)
    stats = result.trace[0].pass_stats
    assert stats["smoothed"] == 2 and stats["alpha"] == 0.5
    assert list(stats["folded"].values()) == ["layer_norm"]  # the norm's output only feeds `up`
    assert len(stats["mul"]) == 1  # GELU cannot take the division: one mul before `down`
    assert [n.op for n in result.graph.nodes].count("mul") == 1
    x = batches(1, 5, (3, 11, 32))[0][0]
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(run(result.graph, [x])[0], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.to_torch()(x), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run_onnxruntime(result.to_onnx(), [x])[0], want, rtol=1e-4, atol=1e-4)
    # the gamma outliers moved into `up`'s weight: the norm's output has a flat range now
    gamma = next(n for n in result.graph.nodes if n.op == "layer_norm").inputs[1].const_value
    assert float(gamma.abs().max() / gamma.abs().median()) < 0.5 * float(model.norm.weight.detach().abs().max()
                                                                         / model.norm.weight.abs().median())


def int8_error(pipeline: str, model: nn.Module, data, held_out) -> float:
    result = slimgraph.optimize(model, pipeline, example_inputs=data[0], calibration_data=data, dynamic_dims=DIMS)
    errors = []
    for (x,) in held_out:
        with torch.no_grad():
            want = model(x)
        got = run_onnxruntime(result.to_onnx(), [x])[0]
        errors.append(float((got - want).norm() / want.norm()))
    return max(errors)


def test_smooth_makes_dynamic_int8_lose_less_on_outlier_channels():
    model = Block().eval()
    data, held_out = batches(16, 1), batches(4, 2)
    plain = int8_error("quantize{activations=dynamic,rounding=nearest}", model, data, held_out)
    smoothed = int8_error("smooth,quantize{activations=dynamic,rounding=nearest}", model, data, held_out)
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_auto_alpha_reports_its_search_and_chooses_the_least_error():
    model = Block().eval()
    data = batches(8, 3)
    result = slimgraph.optimize(model, "smooth", example_inputs=data[0], calibration_data=data)
    stats = result.trace[0].pass_stats
    errors = stats["int8_error_by_alpha"]
    assert set(errors) == {"none", "0.3", "0.4", "0.5", "0.55", "0.6", "0.65", "0.7", "0.8", "0.9"}
    assert errors[str(stats["alpha"]).lower()] == min(errors.values())
    assert stats["alpha"] is not None and errors[str(stats["alpha"])] < errors["none"]


def test_smooth_leaves_linears_without_outliers_alone_when_it_would_not_help():
    model = nn.Sequential(nn.Linear(16, 16)).eval()
    data = batches(4, 4, (3, 16))
    result = slimgraph.optimize(model, "smooth{skip=[*]}", example_inputs=data[0], calibration_data=data)
    assert not result.trace[0].changed and result.trace[0].pass_stats["smoothed"] == 0


def test_bad_smooth_options_and_missing_data_are_named():
    model = Block().eval()
    x = batches(1, 0)[0]
    with pytest.raises(SlimgraphError, match="option 'alpha'"):
        slimgraph.passes.to_passes("smooth{alpha=1.5}")
    with pytest.raises(SlimgraphError, match="option 'alpha'"):
        slimgraph.passes.to_passes("smooth{alpha=high}")
    with pytest.raises(SlimgraphError, match="'smooth'.*calibration_data"):
        slimgraph.optimize(model, "smooth", example_inputs=x)
    with pytest.raises(SlimgraphError, match="smooth"):
        slimgraph.optimize(model, "smooth", example_inputs=x, calibration_data=[(torch.randn(2, 7, 5),)])
