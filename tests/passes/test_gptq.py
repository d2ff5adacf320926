"""GPTQ weight rounding: the input columns each output channel reads, and rounding that keeps a
layer's outputs on its calibration inputs closer than rounding each weight to nearest."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.ir import run
from slimgraph.passes import gptq
from slimgraph.passes.calibration import weight_params


def conv_graph(conv: nn.Module, shape):
    x = torch.randn(shape)
    return slimgraph.import_model(nn.Sequential(conv).eval(), (x,)), x


@pytest.mark.parametrize("conv,shape,pads", [
    (nn.Conv2d(6, 4, 3, padding=1), (2, 6, 7, 7), None),
    (nn.Conv2d(6, 9, (3, 2), stride=2, dilation=(1, 2), groups=3), (1, 6, 9, 8), [0, 1, 2, 1]),  # asymmetric pads
    (nn.Conv2d(5, 5, 3, padding=2, dilation=2, groups=5), (1, 5, 6, 6), None),  # depthwise
    (nn.Conv1d(4, 6, 3, padding=1, stride=2), (2, 4, 11), None),
])
def test_columns_are_what_each_output_channel_reads(conv, shape, pads):
    """The columns times the flattened weight, group by group, are the conv's output."""
    graph, x = conv_graph(conv, shape)
    node = next(n for n in graph.nodes if n.op == "conv")
    if pads is not None:
        node.attrs["pads"] = pads
        graph.touch()
    y = run(graph, [x])[0]
    cols = gptq._columns(node, x)  # [groups, K, rows]
    w = node.inputs[1].const_value
    groups = node.attrs["groups"]
    per_group = w.reshape(groups, w.shape[0] // groups, -1)
    got = per_group @ cols  # [groups, out per group, N * positions]
    bias = node.inputs[2].const_value
    out = got.reshape(w.shape[0], x.shape[0], -1).transpose(0, 1) + bias[None, :, None]
    assert torch.allclose(out.reshape(y.shape), y, atol=1e-5)


def test_gptq_rounds_onto_the_grid_and_keeps_outputs_closer_than_nearest():
    torch.manual_seed(0)
    mix = torch.randn(32, 32)
    x = torch.randn(512, 32) @ mix  # correlated inputs: what GPTQ exploits
    w = torch.randn(16, 32)
    hessian = (x.t() @ x).unsqueeze(0)
    for qmax in (127, 64):
        scale = weight_params(w, 0, qmax)
        rounded = gptq.round_weight(w, hessian, len(x), scale, -qmax, qmax)
        codes = rounded / scale[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and int(codes.round().abs().max()) <= qmax
        nearest = torch.round(w / scale[:, None]).clamp(-qmax, qmax) * scale[:, None]
        err_gptq = (x @ (rounded - w).t()).square().sum()
        err_nearest = (x @ (nearest - w).t()).square().sum()
        assert err_gptq < 0.7 * err_nearest, (qmax, float(err_gptq), float(err_nearest))


def test_too_few_rows_keep_nearest_rounding():
    w = torch.randn(4, 64)
    x = torch.randn(3, 64)
    assert gptq.round_weight(w, (x.t() @ x).unsqueeze(0), 3, weight_params(w, 0), -127, 127) is None


def test_quantize_rounds_with_gptq_unless_told_nearest(tiny):
    model, (x,) = tiny
    data = [(torch.randn_like(x),) for _ in range(8)]

    def quantized(rounding: str):
        return slimgraph.optimize(model, f"fold-bn,quantize{{progress=false,rounding={rounding}}}",
                                  example_inputs=x, calibration_data=data)

    nearest, rounded = quantized("nearest"), quantized("gptq")
    assert nearest.trace[-1].pass_stats["gptq_layers"] == 0
    assert rounded.trace[-1].pass_stats["gptq_layers"] >= 2  # both convs; the linear sees 8 rows for 8 inputs
    assert "rounding: GPTQ on" in rounded.trace.summary()
    with torch.no_grad():
        reference = torch.cat([model(b) for b, in data])
    errors = {name: float((torch.cat([run(r.graph, [b])[0] for b, in data]) - reference).square().mean())
              for name, r in (("nearest", nearest), ("gptq", rounded))}
    assert errors["gptq"] < errors["nearest"], errors
    assert model.conv1.weight.grad is None and not any(  # the user's model is untouched
        p.data_ptr() == v.const_value.data_ptr() for p in model.parameters() for v in rounded.graph.constants.values())
