"""The attention op's optional mask in both backends: additive masks of every broadcasting shape and
boolean keep-masks compute what the reference (torch's scaled_dot_product_attention) computes, in the
emitted PyTorch module and in onnxruntime, at q ranks 3 and 4; a mask that does not fit is refused
by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import DType, Graph, run

B, L, S, H, D = 2, 4, 6, 2, 3  # queries L, keys S


def _graph(lead: tuple[int, ...], mask_shape: tuple[int, ...] | None, dtype: DType) -> Graph:
    g = Graph("g")
    q = g.add_input("q", (*lead, L, H * D), DType.float32)
    k = g.add_input("k", (*lead, S, H * D), DType.float32)
    v = g.add_input("v", (*lead, S, H * 5), DType.float32)
    inputs = [q, k, v] + ([g.add_input("mask", mask_shape, dtype)] if mask_shape is not None else [])
    g.set_outputs([g.create_node("attention", inputs, {"num_heads": H, "scale": 0.3, "dropout": 0.0}).outputs[0]])
    return g


MASKS = [(B, H, L, S), (B, 1, 1, S), (1, 1, L, S), (L, S), (1, S), (H, 1, S), (B, 1, L, 1)]


@pytest.mark.parametrize("lead", [(B,), (B, 3)])
@pytest.mark.parametrize("boolean", [False, True])
@pytest.mark.parametrize("mask_shape", MASKS)
def test_masked_attention_computes_the_reference_in_both_backends(mask_shape, boolean, lead):
    if len(lead) > 1 and len(mask_shape) == 4:
        mask_shape = mask_shape[:1] + (1,) + mask_shape[1:]  # [B, 1, H, L, S]: broadcast over the second lead dim
    gen = torch.Generator().manual_seed(0)
    graph = _graph(lead, mask_shape, DType.bool if boolean else DType.float32)
    q, k, v = (torch.randn(*lead, n, H * d, generator=gen) for n, d in ((L, D), (S, D), (S, 5)))
    mask = torch.randn(mask_shape, generator=gen) * 3
    if boolean:
        mask = mask > -1.0
        mask[..., 0] = True  # no row masked entirely
    feeds = [q, k, v, mask]
    heads = [t.unflatten(-1, (H, -1)).transpose(-3, -2) for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*heads, attn_mask=mask, scale=0.3).transpose(-3, -2).flatten(-2)
    torch.testing.assert_close(run(graph, feeds)[0], want)
    with torch.no_grad():
        torch.testing.assert_close(slimgraph.to_torch(graph)(*feeds), want)
    torch.testing.assert_close(run_onnxruntime(slimgraph.to_onnx(graph), feeds)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_shape,dtype", [((B, H, L, L), DType.float32), ((B, H + 1, L, S), DType.float32),
                                              ((B, 1, L, S), DType.float64), ((B, 1, L, S), DType.int64),
                                              ((S,), DType.float32)])  # 1-D: torch's attn_mask is at least 2-D
def test_a_mask_that_does_not_fit_is_refused_by_name(mask_shape, dtype):
    with pytest.raises(Exception, match="attention: the mask"):
        _graph((B,), mask_shape, dtype)
