"""Structured pruning: the zero-then-remove oracle, the hard cases Torch-Pruning gets wrong, options."""

import pytest
import torch
import torch.nn as nn

import slimgraph
from slimgraph.errors import PassError
from slimgraph.ir import graph_stats, run, verify
from slimgraph.passes.channels import analyze
from slimgraph.passes.prune import apply_plan, plan_pruning, pruning_groups, zero_plan
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
])
def test_bad_options(options, message):
    with pytest.raises(PassError, match=message):
        slimgraph.optimize(TinyNet().eval(), f"prune{{{options}}}", example_inputs=torch.randn(1, 3, 8, 8))
