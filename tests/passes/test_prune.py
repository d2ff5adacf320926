"""Structured pruning: the zero-then-remove oracle, the hard cases Torch-Pruning gets wrong, options."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import PassError
from slimgraph.ir import graph_stats, run, verify
from slimgraph.passes.channels import analyze
from slimgraph.passes.prune import activation_norms, apply_plan, plan_pruning, pruning_groups, zero_plan
from tests.conftest import TinyNet, perturb_bn, rel_error

torchvision = pytest.importorskip("torchvision")


def oracle_error(graph, plan, x) -> float:
    """Zero the plan's slices in the original; remove them in a copy; compare the outputs."""
    zeroed, pruned = graph.clone(), graph.clone()
    zero_plan(zeroed, plan)
    apply_plan(pruned, plan)
    verify(pruned)
    return rel_error(run(pruned, [x])[0], run(zeroed, [x])[0])


def check_model(model, x, groups_to_check: int = 3):
    graph = slimgraph.import_model(model, (x,))
    plan = plan_pruning(graph, 0.5)
    assert not plan.empty
    assert oracle_error(graph, plan, x) < 1e-5  # all groups at once
    n_groups = len(pruning_groups(analyze(graph)))
    for k in sorted({0, n_groups // 2, n_groups - 1})[:groups_to_check]:  # and groups one by one
        single = plan_pruning(graph, 0.5, only_groups={k})
        assert oracle_error(graph, single, x) < 1e-5, f"group {k}"
    return graph, plan


def build(name):
    torch.manual_seed(0)
    model = perturb_bn(torchvision.models.get_model(name, weights=None)).eval()
    for m in model.modules():  # zero-initialized heads would make the oracle vacuous
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)
    return model, torch.randn(1, 3, 224, 224)


ORACLE = ["resnet18", "mobilenet_v2", "densenet121", "googlenet", "shufflenet_v2_x1_0", "regnet_x_400mf",
          "efficientnet_b0", "convnext_tiny", "swin_t", "vit_b_16"]
QUICK = {"resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"}


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.heavy) for n in ORACLE])
def test_zero_then_remove_oracle(name):
    check_model(*build(name))


def test_pruned_model_drops_params_and_macs_and_trains():
    model, x = build("resnet18")
    result = slimgraph.optimize(model, "prune{ratio=0.5}", example_inputs=x)
    before, after = result.trace[0].stats_before, result.trace[0].stats_after
    assert after["params"] < 0.3 * before["params"] and after["macs"] < 0.3 * before["macs"]
    stats = result.trace[0].pass_stats
    assert stats["removed"] > 0 and stats["per_group"][0]["removed_per_layer"]
    module = result.to_torch()
    assert module(x).shape == (1, 1000)
    module.train()
    module(torch.randn(2, 3, 224, 224)).square().mean().backward()
    assert all(p.grad is not None for p in module.parameters())


class CatTwice(nn.Module):
    """cat([x, x]) and a depthwise conv inside a residual: both misgrouped by Torch-Pruning."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.one = nn.Conv2d(16, 1, 1)  # out_channels=1: not a depthwise conv
        self.head = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn(torch.cat([y, y], 1))
        y = y + self.dw(y)
        return self.head(torch.relu(self.one(y))).mean((2, 3))


class Grouped(nn.Module):
    """A grouped conv (4 groups) between pointwise convs, and a channel shuffle."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = self.g(torch.relu(self.a(x)))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # shuffle
        return self.fc(torch.flatten(self.b(y), 1))  # flatten -> linear: strided columns


@pytest.mark.parametrize("cls", [CatTwice, Grouped, TinyNet])
def test_hard_cases_are_exact(cls):
    torch.manual_seed(0)
    model = perturb_bn(cls()).eval()
    graph, plan = check_model(model, torch.randn(1, 3, 4, 4))
    pruned = graph.clone()
    apply_plan(pruned, plan)
    module = slimgraph.to_torch(pruned).train()
    module(torch.randn(3, 3, 4, 4)).sum().backward()  # trains at another batch size too


def test_grouped_conv_keeps_its_groups_and_depthwise_updates_them():
    torch.manual_seed(0)
    result = slimgraph.optimize(Grouped().eval(), "prune{ratio=0.5}", example_inputs=torch.randn(1, 3, 4, 4))
    g = next(n for n in result.graph.nodes if n.name == "g")
    assert g.attrs["groups"] == 4 and g.inputs[1].shape == (8, 2, 3, 3)
    torch.manual_seed(0)
    result = slimgraph.optimize(CatTwice().eval(), "prune{ratio=0.5}", example_inputs=torch.randn(1, 3, 4, 4))
    dw = next(n for n in result.graph.nodes if n.name == "dw")
    assert dw.attrs["groups"] == dw.inputs[0].shape[1] == 8
    one = next(n for n in result.graph.nodes if n.name == "one")
    assert one.outputs[0].shape[1] == 1  # min_channels keeps the single channel


def test_ignore_min_channels_round_to_and_global_scope():
    torch.manual_seed(0)
    model, x = TinyNet().eval(), torch.randn(1, 3, 8, 8)
    ignored = slimgraph.optimize(model, "prune{ratio=0.5,ignore=[conv1,conv2]}", example_inputs=x)
    assert not ignored.trace[0].changed  # every prunable layer ignored: nothing happens, no broken graph
    clamped = slimgraph.optimize(model, "prune{ratio=0.99,min_channels=3}", example_inputs=x)
    assert clamped.trace[0].pass_stats["clamped"] > 0
    assert next(n for n in clamped.graph.nodes if n.name == "conv1").outputs[0].shape[1] == 3
    rounded = slimgraph.optimize(model, "prune{ratio=0.3,round_to=4}", example_inputs=x)
    assert next(n for n in rounded.graph.nodes if n.name == "conv1").outputs[0].shape[1] % 4 == 0
    for criterion in ("l2", "std", "mean", "bn_gamma", "random"):
        result = slimgraph.optimize(model, f"prune{{ratio=0.5,criterion={criterion},scope=global}}",
                                    example_inputs=x)
        assert graph_stats(result.graph)["params"] < graph_stats(slimgraph.import_model(model, x))["params"]


@pytest.mark.parametrize("options,message", [
    ("ratio=1.0", "'ratio': 1.0 is outside"),
    ("ratio=-0.1", "'ratio'"),
    ("criterion=l3", "'criterion'"),
    ("min_channels=0", "'min_channels'"),
    ("ignore=[nope]", "no node named 'nope'"),
    ("normalized=drop", "'normalized'"),
])
def test_bad_options(options, message):
    with pytest.raises(PassError, match=message):
        slimgraph.optimize(TinyNet().eval(), f"prune{{{options}}}", example_inputs=torch.randn(1, 3, 8, 8))


# ---------------------------------------------------------------------------- attention and layer norm
class Block(nn.Module):
    """A pre-norm transformer block: layer norms, 4-head attention, an MLP, two residuals."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.batch_first = batch_first

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_heads_go_as_whole_units(batch_first):
    torch.manual_seed(0)
    model = Block(batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    graph, plan = check_model(model, x)
    pruned = graph.clone()
    apply_plan(pruned, plan)
    (attention,) = [n for n in pruned.nodes if n.op == "attention"]
    assert attention.attrs["num_heads"] == 2 and attention.inputs[0].shape[-1] == 8  # head size 4 kept
    for name in ("q_proj", "k_proj", "v_proj"):
        assert next(n for n in pruned.nodes if n.name.endswith(name)).inputs[1].shape == (8, 16)
    assert next(n for n in pruned.nodes if n.name.endswith("out_proj")).inputs[1].shape == (16, 8)
    module = slimgraph.to_torch(pruned)
    assert "attention(" in module.code and ", 2, 0.5" in module.code  # 2 heads, scale 1/sqrt(4) kept
    (y_onnx,) = run_onnxruntime(slimgraph.to_onnx(pruned), [x])
    with torch.no_grad():
        assert rel_error(y_onnx, module(x)) < 1e-5
    module.train()
    module(torch.cat([x, x], dim=0 if batch_first else 1)).square().mean().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_layer_norm_channels_are_frozen_unless_asked_and_then_normalize_over_the_kept_ones():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 16), Block(), nn.Linear(16, 3)).eval(), torch.randn(2, 5, 6)
    graph = slimgraph.import_model(model, (x,))
    frozen = plan_pruning(graph, 0.5)
    assert "v_1_ln1_weight" not in frozen.removed  # the residual stream passes two layer norms: exact mode keeps it
    plan = plan_pruning(graph, 0.5, normalized="prune")
    gone = plan.removed["v_1_ln1_weight"][(0,)]
    assert len(gone) == 8 and plan.removed["v_1_ln2_weight"][(0,)] == gone  # one stream, one set of channels
    pruned = graph.clone()
    apply_plan(pruned, plan)
    assert next(n for n in pruned.nodes if n.op == "layer_norm").attrs["normalized_shape"] == [8]
    # reference: the same model on the kept stream channels, each layer norm over those channels only
    keep = [c for c in range(16) if c not in gone]
    heads = [c for c in range(16) if c not in plan.removed["v_1_attn_q_proj_weight"][(0,)]]
    hidden = [c for c in range(32) if c not in plan.removed["v_1_mlp_0_weight"][(0,)]]
    assert len(heads) == 8 and len(hidden) == 16
    reference = copy.deepcopy(model)
    embed, block, head = reference
    attn = block.attn
    with torch.no_grad():
        embed.weight.data, embed.bias.data = embed.weight[keep], embed.bias[keep]
        for ln in (block.ln1, block.ln2):
            ln.weight.data, ln.bias.data, ln.normalized_shape = ln.weight[keep], ln.bias[keep], (8,)
        rows = torch.tensor([part * 16 + c for part in range(3) for c in heads])
        attn.in_proj_weight.data, attn.in_proj_bias.data = attn.in_proj_weight[rows][:, keep], attn.in_proj_bias[rows]
        attn.out_proj.weight.data = attn.out_proj.weight[keep][:, heads]
        attn.out_proj.bias.data = attn.out_proj.bias[keep]
        attn.embed_dim, attn.num_heads = 8, 2  # 8 kept stream channels, 2 kept heads of 4
        fc1, fc2 = block.mlp[0], block.mlp[2]
        fc1.weight.data, fc1.bias.data = fc1.weight[hidden][:, keep], fc1.bias[hidden]
        fc2.weight.data, fc2.bias.data = fc2.weight[keep][:, hidden], fc2.bias[keep]
        head.weight.data = head.weight[:, keep]
        expected = reference(x)
    assert rel_error(run(pruned, [x])[0], expected) < 1e-5


@pytest.mark.heavy
@pytest.mark.parametrize("name,normalized,macs_at_most", [
    ("vit_b_16", "freeze", 0.51),  # half the heads and half the MLP hidden channels; the stream stays
    ("vit_b_16", "prune", 0.27),
    ("convnext_tiny", "prune", 0.27),  # Torch-Pruning 1.6 at the same ratio: 0.26x
    ("swin_t", "freeze", 0.53),  # its inlined attention: the same head dims of q, k and v in every head
    ("swin_t", "prune", 0.27),
])
def test_transformers_prune_heads_and_layer_normed_streams(name, normalized, macs_at_most):
    model, x = build(name)
    result = slimgraph.optimize(model, f"prune{{ratio=0.5,normalized={normalized}}}", example_inputs=x)
    record = result.trace[0]
    assert record.stats_after["macs"] <= macs_at_most * record.stats_before["macs"]
    heads = [n.attrs["num_heads"] for n in result.graph.nodes if n.op == "attention"]
    assert heads == ([6] * 12 if name == "vit_b_16" else [])
    module = result.to_torch()
    (y_onnx,) = run_onnxruntime(result.to_onnx(), [x])
    with torch.no_grad():
        assert rel_error(y_onnx, module(x)) < 1e-4


def test_self_attention_not_batch_first_permutes_its_input_once():
    graph = slimgraph.import_model(Block(batch_first=False).eval(), (torch.randn(5, 2, 16),))
    assert sum(n.op == "permute" for n in graph.nodes) == 2  # [L, B, E] -> [B, L, E] and back


def test_channel_shuffle_streams_split_into_classes():
    """A shuffle ties channel i of each half; the pass-through halves carry those pairs on, so a stage's
    stream has fewer, larger classes block by block, but never one class for the whole stage."""
    model, x = build("shufflenet_v2_x1_0")
    graph = slimgraph.import_model(model, (x,))
    cg = analyze(graph)
    roots = cg.roots()
    first = next(n for n in graph.nodes if n.op == "concat").outputs[0]  # stage 2, block 0: 116 channels
    (space,) = cg.spaces_of(first)
    assert len(set(roots[space.base:space.base + space.size].tolist())) == 51
    result = slimgraph.optimize(graph, "prune{ratio=0.5}", example_inputs=x)
    assert result.trace[0].stats_after["macs"] < 0.4 * result.trace[0].stats_before["macs"]


class SdpaAttention(nn.Module):
    """The hand-written attention of many models: q/k/v linears, heads split by view + transpose,
    F.scaled_dot_product_attention, heads merged, an output linear."""

    def __init__(self, embed: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(embed, embed) for _ in range(4))
        self.head = nn.Linear(embed, 3)

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = (t.view(b, n, self.heads, e // self.heads).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.head(self.o(y.transpose(1, 2).reshape(b, n, e)))


def test_scaled_dot_product_attention_prunes_head_dims_exactly():
    torch.manual_seed(0)
    model, x = SdpaAttention().eval(), torch.randn(2, 5, 16)
    graph, plan = check_model(model, x)
    assert all(n.op != "opaque" for n in graph.nodes)
    pruned = graph.clone()
    apply_plan(pruned, plan)
    for name in ("q", "k", "v"):  # the same head dims in every head: 4 heads of 2
        assert next(n for n in pruned.nodes if n.name == name).inputs[1].shape == (8, 16)
    module = slimgraph.to_torch(pruned)
    (y_onnx,) = run_onnxruntime(slimgraph.to_onnx(pruned), [x])
    with torch.no_grad():
        assert rel_error(y_onnx, module(x)) < 1e-5
        assert rel_error(slimgraph.to_torch(graph)(x), model(x)) < 1e-6


class MaskedAttention(SdpaAttention):
    """Causal attention, and attention under a boolean mask buffer."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.register_buffer("mask", torch.rand(5, 5) > 0.3)
        self.mask[:, 0] = True  # every query attends somewhere (an all-masked row is NaN in torch too)

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = (t.view(b, n, self.heads, e // self.heads).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True) if self.causal else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.head(self.o(y.transpose(1, 2).reshape(b, n, e)))


@pytest.mark.parametrize("causal", [True, False])
def test_masked_and_causal_attention_import_and_prune_exactly(causal):
    torch.manual_seed(0)
    model, x = MaskedAttention(causal).eval(), torch.randn(2, 5, 16)
    graph, plan = check_model(model, x)
    assert all(n.op != "opaque" for n in graph.nodes)
    with torch.no_grad():
        assert rel_error(slimgraph.to_torch(graph)(x), model(x)) < 1e-6
    (y_onnx,) = run_onnxruntime(slimgraph.to_onnx(graph), [x])
    assert rel_error(y_onnx, model(x).detach()) < 1e-5


# ---------------------------------------------------------------------------- activation criterion
class DeadChannels(nn.Module):
    """A hidden layer whose first 8 channels have the largest weights but a bias that keeps them
    below zero on the data (dead after the ReLU): weight norms rank them first, the data last."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(32, 16, generator=gen) * 0.1)
            self.up.weight[:8] *= 10
            self.up.bias.zero_()
            self.up.bias[:8] = -100.0
            self.down.weight.copy_(torch.randn(4, 32, generator=gen))
            self.down.weight[:, :8] *= 10

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_activation_criterion_removes_what_carries_no_signal():
    model, data = DeadChannels().eval(), [(torch.randn(16, 16),) for _ in range(4)]
    x = torch.randn(64, 16)
    with torch.no_grad():
        want = model(x)
    errors, kept = {}, {}
    for criterion in ("l2", "activation"):
        result = slimgraph.optimize(model, f"prune{{ratio=0.25,criterion={criterion}}}", example_inputs=data[0],
                                    calibration_data=data)
        errors[criterion] = rel_error(run(result.graph, [x])[0], want)
        kept[criterion] = next(n for n in result.graph.nodes if n.op == "linear").inputs[1].shape[0]
    assert kept == {"l2": 24, "activation": 24}
    assert errors["activation"] < 1e-6 < errors["l2"], errors  # the dead channels went, exactly


def test_activation_criterion_prunes_whole_heads_and_ffn_channels_of_bert():
    """Hugging Face's attention comes in decomposed (head split by reshapes): prune then shrinks
    every head alike, scoring q and k dims by their own norms; fused into one attention node
    first, it removes whole heads."""
    import transformers

    from tests.frontends.test_transformers import dynamic, text_inputs

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)).eval()
    inputs = text_inputs(2, 12)
    data = [tuple(text_inputs(2, 9, seed=s).values()) for s in range(3)]
    dims = dynamic(inputs)
    decomposed = slimgraph.optimize(model, "prune{ratio=0.5,criterion=activation}", example_inputs=inputs,
                                    dynamic_dims=dims, calibration_data=data)
    q_dims = [n.inputs[1].shape[0] for n in decomposed.graph.nodes if n.op == "linear"][:3]
    assert q_dims == [16, 16, 16]  # q, k, v: 4 heads of 4 dims each, from 8
    result = slimgraph.optimize(model, "fuse{ops=[attention]},prune{ratio=0.5,criterion=activation}",
                                example_inputs=inputs, dynamic_dims=dims, calibration_data=data)
    assert [n.attrs["num_heads"] for n in result.graph.nodes if n.op == "multi_head_attention"] == [2, 2]
    # exact: removing the heads computes what zeroing them in the fused original does
    fused = slimgraph.optimize(model, "fuse{ops=[attention]}", example_inputs=inputs, dynamic_dims=dims).graph
    plan = plan_pruning(fused, 0.5, "activation", norms=activation_norms(fused, data))
    zeroed, pruned = fused.clone(), fused.clone()
    zero_plan(zeroed, plan)
    apply_plan(pruned, plan)
    feed = list(text_inputs(3, 7, seed=4).values())
    assert rel_error(run(pruned, feed)[0], run(zeroed, feed)[0]) < 1e-5
    ffn = [n for n in result.graph.nodes if n.op == "linear" and n.inputs[1].shape[1] == 32]
    assert sorted(n.inputs[1].shape[0] for n in ffn)[-2:] == [32, 32]  # 64 -> 32 hidden channels each
    module = result.to_torch()
    feed = text_inputs(3, 7, seed=5)
    (y_onnx, *_) = run_onnxruntime(result.to_onnx(), list(feed.values()))
    with torch.no_grad():
        assert rel_error(y_onnx, module(*feed.values())[0]) < 1e-4


def test_activation_criterion_needs_data():
    from slimgraph.passes import PassContext, make_pass

    graph = slimgraph.import_model(DeadChannels().eval(), (torch.randn(2, 16),))
    with pytest.raises(PassError, match="criterion 'activation'"):
        make_pass("prune", {"criterion": "activation"}).run(graph, PassContext())
