"""floor-softmax: masked softmaxes get their inputs clamped at the row max - 80, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import SlimgraphError
from slimgraph.ir import run
from tests.frontends.test_transformers import FAMILIES, check_both_backends, dynamic


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_masked_attention_softmaxes_are_floored_exactly_in_every_backend(family):
    build, make_inputs, names = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    inputs = make_inputs(2, 12)
    result = slimgraph.optimize(model, "floor-softmax", example_inputs=inputs, dynamic_dims=dynamic(inputs))
    softmaxes = [n for n in result.graph.nodes if n.op == "softmax"]
    assert softmaxes and result.trace[0].pass_stats["floored"] == [n.name for n in softmaxes]
    assert all(n.inputs[0].producer.op == "maximum" for n in softmaxes)
    module, proto = result.to_torch(), result.to_onnx()
    for feed in (make_inputs(3, 7, seed=1), make_inputs(1, 20, seed=2)):
        check_both_backends(model, module, proto, feed, names)
    again = slimgraph.optimize(result.graph, "floor-softmax", example_inputs=tuple(inputs.values()))
    assert not again.trace[0].changed  # applied once


class Masked(nn.Module):
    def forward(self, scores, mask):
        return torch.softmax(scores + mask, dim=-1), torch.softmax(scores * 2, dim=-1)


def test_rows_far_below_or_entirely_masked_behave_as_before_and_unmasked_softmax_is_left_alone():
    scores = torch.randn(2, 4, 6) * 30
    mask = torch.zeros(2, 4, 6)
    mask[0, :, 3:] = torch.finfo(torch.float32).min
    mask[1, 2] = float("-inf")  # a row with nothing to attend to: NaN, as in eager
    result = slimgraph.optimize(Masked(), "floor-softmax", example_inputs=(scores, mask))
    assert len(result.trace[0].pass_stats["floored"]) == 1  # only the softmax a mask reaches
    want = Masked()(scores, mask)
    for got in (run(result.graph, [scores, mask]), run_onnxruntime(result.to_onnx(), [scores, mask])):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-30, equal_nan=True)
    assert torch.isnan(run(result.graph, [scores, mask])[0][1, 2]).all()


def test_bad_margin_is_named():
    with pytest.raises(SlimgraphError, match="option 'margin'"):
        slimgraph.passes.to_passes("floor-softmax{margin=200}")
