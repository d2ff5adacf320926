"""Masked attention as one node: attention-form forms it from every spelling (written out with an
additive mask, scaled by * or /, SDPA with a float or boolean attn_mask), computing what it computed;
fuse makes it onnxruntime's MultiHeadAttention with attention_bias; prune slices a per-head mask
with its heads or keeps the heads; floor-softmax writes it out to floor its softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import DType, Graph, print_graph, run
from slimgraph.passes.channels import analyze as channel_groups
from slimgraph.passes.prune import apply_plan, plan_pruning, zero_plan

B, L, E, H = 2, 6, 16, 4


class Attention(nn.Module):
    """q, k, v projections split into heads, attention with a mask, heads merged, out projection."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.proj = nn.ModuleList([nn.Linear(E, E) for _ in range(4)])

    def forward(self, x, mask):
        b, n, e = x.shape
        q, k, v = (p(x).view(b, n, H, e // H).transpose(1, 2) for p in self.proj[:3])
        if self.spelling == "divided":
            y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // H) + mask, dim=-1) @ v
        elif self.spelling == "multiplied":
            y = torch.softmax(mask + torch.matmul(q, k.transpose(-1, -2)) * (e // H) ** -0.5, dim=-1) @ v
        elif self.spelling == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # sdpa with a boolean keep-mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask > 0)
        return self.proj[3](y.transpose(1, 2).reshape(b, n, e))


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def masks(dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Masks of every shape that broadcasts to [batch, heads, seq, seq] (no row all masked)."""
    gen = torch.Generator().manual_seed(0)
    padding = torch.zeros(B, 1, 1, L, dtype=dtype)
    padding[0, ..., L - 2:] = -1e4
    causal = torch.zeros(L, L, dtype=dtype).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return {"padding [B,1,1,L]": padding, "causal [L,L]": causal,
            "per head [B,H,L,L]": torch.randn(B, H, L, L, generator=gen, dtype=dtype),
            "shared [1,1,L,L]": torch.randn(1, 1, L, L, generator=gen, dtype=dtype)}


def _error(got, want) -> float:
    return float((torch.as_tensor(got).detach().double() - want.double()).abs().max() / want.double().abs().max())


def check_everywhere(model, graph: Graph, inputs: list, bound: float = 1e-5) -> None:
    with torch.no_grad():
        want = model(*inputs)
        assert _error(run(graph, inputs)[0], want) < bound
        assert _error(slimgraph.to_torch(graph)(*inputs), want) < bound
    assert _error(run_onnxruntime(slimgraph.to_onnx(graph), inputs)[0], want) < bound


@pytest.mark.parametrize("mask_name", list(masks()))
@pytest.mark.parametrize("spelling", ["divided", "multiplied", "sdpa", "sdpa boolean"])
def test_masked_attention_is_one_node_computing_the_same_and_round_trips(spelling, mask_name):
    torch.manual_seed(0)
    model, x, mask = Attention(spelling).eval(), torch.randn(B, L, E), masks()[mask_name]
    if spelling == "sdpa boolean":
        mask = torch.where(mask == float("-inf"), -1.0, 1.0)  # the model keeps where mask > 0
        mask[..., 0] = 1.0
    result = slimgraph.optimize(model, "canonicalize", example_inputs=(x, mask))
    (attention,) = [n for n in result.graph.nodes if n.op == "attention"]
    assert result.trace[0].pass_stats["attention-form.masked"] == 1
    assert attention.inputs[3].dtype == (DType.bool if spelling == "sdpa boolean" else DType.float32)
    assert attention.attrs["num_heads"] == H and attention.attrs["scale"] == 0.5
    assert not {"softmax", "matmul"} & {n.op for n in result.graph.nodes}
    check_everywhere(model, result.graph, [x, mask])
    graph = result.graph
    via_onnx = slimgraph.optimize(slimgraph.to_onnx(graph), "canonicalize", example_inputs=[x, mask]).graph
    assert print_graph(via_onnx) == print_graph(graph)
    via_torch = slimgraph.optimize(slimgraph.to_torch(graph), "canonicalize", example_inputs=(x, mask)).graph
    assert [(n.op, n.attrs) for n in via_torch.nodes] == [(n.op, n.attrs) for n in graph.nodes]


def test_a_mask_of_another_dtype_than_the_scores_stays_written_out():
    class Promoting(nn.Module):
        def forward(self, q, k, v, mask):  # float32 scores + a float64 mask: float64 softmax
            b, n, e = q.shape
            q, k, v = (t.view(b, n, 2, e // 2).transpose(1, 2) for t in (q, k, v))
            y = torch.softmax(q @ k.transpose(-2, -1) * 0.5 + mask, -1) @ v.double()
            return y.transpose(1, 2).reshape(b, n, e)

    inputs = (*torch.randn(3, B, L, 8), torch.zeros(B, 1, 1, L, dtype=torch.float64))
    result = slimgraph.optimize(Promoting(), "canonicalize", example_inputs=inputs)
    assert "attention" not in [n.op for n in result.graph.nodes]


@pytest.mark.parametrize("boolean", [False, True])
def test_fuse_gives_masked_attention_to_onnxruntime_as_attention_bias(boolean):
    torch.manual_seed(0)
    model, x = Attention("sdpa boolean" if boolean else "sdpa").eval(), torch.randn(B, L, E)
    mask = masks()["padding [B,1,1,L]"] if not boolean else torch.ones(B, 1, 1, L)
    if boolean:
        mask[0, ..., L - 2:] = -1.0
    for pipeline in ("canonicalize,fuse", "fuse"):  # from the attention node, and from the written-out ops
        result = slimgraph.optimize(model, pipeline, example_inputs=(x, mask))
        (fused,) = [n for n in result.graph.nodes if n.op == "multi_head_attention"]
        bias = fused.inputs[3]
        assert bias.dtype == DType.float32 and bias.shape == (B, 1, L, L)  # expanded over the queries
        assert result.trace[-1].pass_stats["attention_fused"] == 1
        assert "MultiHeadAttention" in [n.op_type for n in result.to_onnx().graph.node]
        check_everywhere(model, result.graph, [x, mask])
        other = (torch.randn(B, L, E), mask)
        with torch.no_grad():
            assert _error(run_onnxruntime(result.to_onnx(), list(other))[0], model(*other)) < 1e-5


def test_fuse_leaves_float64_masked_attention_and_says_why():
    torch.manual_seed(0)
    model, x = Attention("sdpa").double().eval(), torch.randn(B, L, E, dtype=torch.float64)
    mask = masks(torch.float64)["causal [L,L]"]
    result = slimgraph.optimize(model, "canonicalize,fuse", example_inputs=(x, mask))
    stats = result.trace[-1].pass_stats
    assert stats["attention_fused"] == 0 and "float64" in " ".join(stats["not_attention"].values())


def test_floor_softmax_writes_masked_attention_out_to_floor_its_softmax_and_leaves_unmasked_attention():
    torch.manual_seed(0)
    model, x, mask = Attention("sdpa").eval(), torch.randn(B, L, E), masks()["padding [B,1,1,L]"]
    graph = slimgraph.optimize(model, "canonicalize", example_inputs=(x, mask)).graph
    (name,) = [n.name for n in graph.nodes if n.op == "attention"]
    result = slimgraph.optimize(graph, "floor-softmax", example_inputs=(x, mask))
    stats = result.trace[0].pass_stats
    assert stats["written_out"] == [name] and len(stats["floored"]) == 1
    assert "attention" not in [n.op for n in result.graph.nodes]
    assert result.graph.outputs[0].name == graph.outputs[0].name
    check_everywhere(model, result.graph, [x, mask])
    unmasked = slimgraph.optimize(SelfAttention().eval(), "floor-softmax", example_inputs=x)
    assert not unmasked.trace[0].changed and "attention" in [n.op for n in unmasked.graph.nodes]


def _attention_graph(mask_kind: str) -> tuple[Graph, list[torch.Tensor]]:
    """linear q, k, v -> attention(mask) -> linear: the mask a constant per head, or a graph input."""
    gen = torch.Generator().manual_seed(1)
    g = Graph("g")
    x = g.add_input("x", (B, L, E), DType.float32)
    feeds = [torch.randn(B, L, E, generator=gen)]
    qkv = [g.create_node("linear", [x, g.add_constant(f"w{i}", torch.randn(E, E, generator=gen) / 4, True),
                                    g.add_constant(f"b{i}", torch.randn(E, generator=gen), True)]).outputs[0]
           for i in range(3)]
    if mask_kind == "input":
        mask = g.add_input("mask", (B, H, L, L), DType.float32)
        feeds.append(torch.randn(B, H, L, L, generator=gen))
    else:
        mask = g.add_constant("mask", torch.randn(1, H, L, L, generator=gen))
    y = g.create_node("attention", [*qkv, mask], {"num_heads": H, "scale": 0.5, "dropout": 0.0}).outputs[0]
    out = g.create_node("linear", [y, g.add_constant("w3", torch.randn(5, E, generator=gen), True), None])
    g.set_outputs([out.outputs[0]])
    return g, feeds


def test_pruning_heads_slices_a_per_head_mask_with_them():
    graph, feeds = _attention_graph("constant")
    plan = plan_pruning(graph, 0.5)
    zeroed, pruned = graph.clone(), graph.clone()
    zero_plan(zeroed, plan)
    apply_plan(pruned, plan)
    pruned.verify()
    (attention,) = [n for n in pruned.nodes if n.op == "attention"]
    assert attention.attrs["num_heads"] == H // 2 and attention.inputs[3].shape == (1, H // 2, L, L)
    assert _error(run(pruned, feeds)[0], run(zeroed, feeds)[0]) < 1e-5
    kept_heads = [h for h in range(H) if h * (E // H) not in plan.removed["w0"][(0,)]]
    assert torch.equal(attention.inputs[3].const_value, graph.constants["mask"].const_value[:, kept_heads])
    for backend in (slimgraph.to_torch(pruned)(*feeds), run_onnxruntime(slimgraph.to_onnx(pruned), feeds)[0]):
        assert _error(backend, run(zeroed, feeds)[0]) < 1e-5


def test_a_per_head_mask_that_cannot_be_sliced_keeps_the_heads_and_says_why():
    graph, feeds = _attention_graph("input")
    cg = channel_groups(graph)
    (seed,) = [space for node, space in cg.seeds if node.inputs[1].name == "w0"]
    assert cg.frozen(seed.base) and "%mask is a graph input" in cg.reason(seed.base)
    plan = plan_pruning(graph, 0.5)
    assert "w0" not in plan.removed and "w2" not in plan.removed  # q, k, v dims go by heads: all kept
