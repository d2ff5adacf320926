"""nn.MultiheadAttention's masks and scaled_dot_product_attention's attn_mask import as the attention
op's one mask (True in MultiheadAttention's boolean masks is *masked*, in SDPA's *attend*), computing
what eager computes in the interpreter, the PyTorch backend and onnxruntime."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import DType, print_graph, run

B, L, E, H = 2, 5, 8, 2


class Block(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first)

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)[0]


def _padding(dtype):
    masked = torch.zeros(B, L, dtype=torch.bool)
    masked[0, L - 2:] = True
    return masked if dtype == torch.bool else torch.zeros(B, L).masked_fill(masked, -1e4)


def _attn(kind):
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    return {"bool [L,L]": causal, "float [L,L]": torch.randn(L, L, generator=torch.Generator().manual_seed(0)),
            "float [B*H,L,L]": torch.randn(B * H, L, L, generator=torch.Generator().manual_seed(1)),
            "bool [B*H,L,L]": causal.expand(B * H, L, L).clone()}[kind]


CASES = {  # name -> (key_padding_mask, attn_mask, the mask's dtype in the IR)
    "bool padding": (_padding(torch.bool), None, DType.bool),
    "float padding": (_padding(torch.float32), None, DType.float32),
    "bool causal": (None, _attn("bool [L,L]"), DType.bool),
    "float [L,L]": (None, _attn("float [L,L]"), DType.float32),
    "float per head": (None, _attn("float [B*H,L,L]"), DType.float32),
    "bool per head": (None, _attn("bool [B*H,L,L]"), DType.bool),
    "bool padding and bool causal": (_padding(torch.bool), _attn("bool [L,L]"), DType.float32),
    "float padding and float [L,L]": (_padding(torch.float32), _attn("float [L,L]"), DType.float32),
}


@pytest.mark.parametrize("case,batch_first", [(case, True) for case in CASES] + [
    ("bool padding", False), ("float per head", False)])  # masks are batch first either way
def test_multihead_attention_masks_become_the_attention_mask(case, batch_first):
    torch.manual_seed(0)
    padding, attn, dtype = CASES[case]
    model = Block(batch_first).eval()
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    inputs = {"x": x, "key_padding_mask": padding, "attn_mask": attn}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    graph = slimgraph.optimize(model, "canonicalize", example_inputs=inputs).graph
    (attention,) = [n for n in graph.nodes if n.op == "attention"]
    assert len(attention.inputs) == 4 and attention.inputs[3].dtype == dtype
    assert "opaque" not in [n.op for n in graph.nodes]
    feeds = list(inputs.values())
    with torch.no_grad():
        want = model(**inputs)
        for got in (run(graph, feeds)[0], slimgraph.to_torch(graph)(*feeds),
                    run_onnxruntime(slimgraph.to_onnx(graph), feeds)[0]):
            torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-5, atol=1e-6)
    again = slimgraph.optimize(slimgraph.to_onnx(graph), "canonicalize", example_inputs=feeds).graph
    assert print_graph(again) == print_graph(graph)


@pytest.mark.parametrize("boolean", [False, True])
def test_sdpa_attn_mask_per_head_with_its_heads_split_by_hand(boolean):
    class Sdpa(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(E, 3 * E)

        def forward(self, x, mask):
            b, n, _ = x.shape
            q, k, v = (t.view(b, n, H, E // H).transpose(1, 2) for t in self.qkv(x).split(E, dim=-1))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, E)

    torch.manual_seed(0)
    mask = torch.randn(B, H, L, L)
    if boolean:
        mask = mask > -0.5
        mask[..., 0] = True
    model, x = Sdpa().eval(), torch.randn(B, L, E)
    graph = slimgraph.optimize(model, "canonicalize", example_inputs=(x, mask)).graph
    (attention,) = [n for n in graph.nodes if n.op == "attention"]
    assert attention.inputs[3].name == "mask"
    with torch.no_grad():
        want = model(x, mask)
    for got in (run(graph, [x, mask])[0], run_onnxruntime(slimgraph.to_onnx(graph), [x, mask])[0]):
        torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-5, atol=1e-6)
