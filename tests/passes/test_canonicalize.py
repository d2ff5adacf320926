"""fold-bn, fold-constants and canonicalize: exactness, coverage of the zoo, no-op behaviour, options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import PassError
from slimgraph.ir import OPAQUE, DType, Graph, OpaqueImpl, print_graph, run
from slimgraph.ir.opaque import Slot
from slimgraph.passes import PassContext, make_pass
from slimgraph.passes.canonicalize import FoldBatchNorm
from tests.conftest import perturb_bn, rel_error

BN_TYPES = nn.modules.batchnorm._BatchNorm


def fold(model: nn.Module, x: torch.Tensor, pipeline: str = "fold-bn"):
    """Run ``pipeline`` (numerically checked at 1e-5) and compare both backends to the model."""
    result = slimgraph.optimize(model, pipeline, example_inputs=x, rtol=1e-5)
    with torch.no_grad():
        expected = model(x)
        ir_err = rel_error(run(result.graph, [x])[0], expected)
        emitted = result.to_torch()
        torch_err = rel_error(emitted(x), expected)
    assert not any(n.op == "batch_norm" for n in result.graph.nodes)
    assert not any(isinstance(m, BN_TYPES) for m in emitted.modules())
    assert ir_err < 1e-5 and torch_err < 1e-5, (ir_err, torch_err)
    return result


# ---------------------------------------------------------------------------- fold-bn on the zoo
torchvision = pytest.importorskip("torchvision")
from tests.zoo.test_roundtrip import CNNS, HEAVY, build  # noqa: E402

# The three models and two cheap ones run by default; the rest is behind the marker.
DEFAULT_ZOO = {"resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf"}
THROUGH_ONNX = {"resnet18", "resnet50", "mobilenet_v2"}  # the three, also checked in onnxruntime


def count_bn_calls(model: nn.Module, x: torch.Tensor) -> int:
    """BatchNorm calls in one eval forward (googlenet's and inception's aux heads never run)."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if isinstance(m, BN_TYPES)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return len(calls)


@pytest.mark.parametrize(
    "name", [n if n in DEFAULT_ZOO and n not in HEAVY else pytest.param(n, marks=pytest.mark.heavy) for n in CNNS]
)
def test_fold_bn_leaves_no_batch_norm_in_torchvision_cnns(name):
    model, x = build(name)
    perturb_bn(model)
    result = fold(model, x)
    stats = result.trace[0].pass_stats
    n_bn = count_bn_calls(model, x)
    assert stats["into_previous"] + stats["into_next"] + stats["affine"] == n_bn
    assert result.trace[0].changed == (n_bn > 0)
    if name.startswith(("resnet", "mobilenet")):  # every BN follows its conv directly
        assert stats["into_previous"] == n_bn
    # the folded weights replace the originals: fewer parameters, no orphaned constant left behind
    before, after = result.trace[0].stats_before, result.trace[0].stats_after
    assert after["params"] < before["params"] or n_bn == 0
    assert all(v.uses for v in result.graph.constants.values())
    if name in THROUGH_ONNX:
        proto = result.to_onnx()
        assert n_bn > 0 and not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
        with torch.no_grad():
            assert rel_error(run_onnxruntime(proto, [x])[0], model(x)) < 1e-5


# ---------------------------------------------------------------------------- fold-bn on small models
class BnConv(nn.Module):
    def __init__(self, padding: int, groups: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 12, 3, padding=padding, groups=groups)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("groups", [1, 4])
def test_fold_bn_into_following_conv_without_padding(groups):
    torch.manual_seed(0)
    model = perturb_bn(BnConv(padding=0, groups=groups).eval())
    stats = fold(model, torch.randn(1, 8, 9, 9)).trace[0].pass_stats
    assert stats == {"into_previous": 0, "into_next": 1, "affine": 0, "left": 0}


def test_fold_bn_into_padded_conv_only_without_shift():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 9, 9)
    # a shift would reach the zero border through the folded bias: must not fold
    shifted = perturb_bn(BnConv(padding=1).eval())
    assert fold(shifted, x).trace[0].pass_stats["affine"] == 1
    # a pure scale commutes with zero padding: folds exactly
    scaled = perturb_bn(BnConv(padding=1).eval())
    with torch.no_grad():
        scaled.bn.bias.zero_()
        scaled.bn.running_mean.zero_()
    assert fold(scaled, x).trace[0].pass_stats["into_next"] == 1


def test_fold_bn_into_linear_both_ways():
    torch.manual_seed(0)
    model = perturb_bn(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 5), nn.BatchNorm1d(5)).eval())
    stats = fold(model, torch.randn(3, 6)).trace[0].pass_stats
    assert stats == {"into_previous": 1, "into_next": 1, "affine": 0, "left": 0}


def test_fold_bn_into_linear_built_without_bias_slot():
    g = Graph()
    x = g.add_input("x", (2, 4), DType.float32)
    y = g.create_node("linear", [x, g.add_constant("w", torch.randn(3, 4), trainable=True)]).output
    gen = torch.Generator().manual_seed(1)
    params = [g.add_constant(n, torch.rand(3, generator=gen) + 0.5) for n in ("gamma", "beta", "mean", "var")]
    g.set_outputs([g.create_node("batch_norm", [y, *params], {"eps": 1e-5}).output])
    inp = torch.randn(2, 4)
    (expected,) = run(g, [inp])
    result = make_pass("fold-bn", {}).run(g, PassContext())
    g.verify()
    assert result.stats["into_previous"] == 1
    assert [n.op for n in g.nodes] == ["linear"] and len(g.constants) == 2  # w, b: old ones removed
    assert rel_error(run(g, [inp])[0], expected) < 1e-6


class DenseLike(nn.Module):
    """DenseNet's pattern: BN after a concat, then BN -> ReLU -> conv; neither can be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.norm = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1))))


def test_fold_bn_falls_back_to_exact_affine():
    torch.manual_seed(0)
    result = fold(perturb_bn(DenseLike().eval()), torch.randn(1, 3, 12, 12))
    assert result.trace[0].pass_stats == {"into_previous": 0, "into_next": 0, "affine": 1, "left": 0}
    mul = next(n for n in result.graph.nodes if n.op == "mul")
    add = mul.output.users()[0]
    assert add.op == "add" and mul.inputs[0].producer.op == "concat"
    assert mul.inputs[1].shape == (8, 1, 1) and add.inputs[1].shape == (8, 1, 1)
    assert not {"norm_weight", "norm_bias", "norm_running_mean", "norm_running_var"} & set(result.graph.constants)


def test_fold_bn_into_next_can_be_disabled():
    torch.manual_seed(0)
    model = perturb_bn(BnConv(padding=0).eval())
    result = fold(model, torch.randn(1, 8, 9, 9), "fold-bn{into_next=false}")
    assert result.trace[0].pass_stats["affine"] == 1


# ---------------------------------------------------------------------------- fold-constants
def constant_graph() -> Graph:
    """x @ permute(W) * exp(c) * dropout(d) + expand(1.0): three of these are constant."""
    g = Graph()
    x = g.add_input("x", (2, 1024), DType.float32)
    w = g.add_constant("w", torch.randn(8, 1024), trainable=True)
    wt = g.create_node("permute", [w], {"perm": [1, 0]}).output  # 32 KiB -> 32 KiB: folded
    scale = g.create_node("exp", [g.add_constant("c", torch.randn(8))]).output  # small: folded
    kept = g.create_node("dropout", [g.add_constant("d", torch.randn(8))], {"p": 0.0}).output  # mode-dependent
    neg = g.create_node(OPAQUE, [g.add_constant("e", torch.randn(8))],
                        {"impl": OpaqueImpl("neg", "function", (Slot(0),), fn=torch.neg)},
                        output_types=[((8,), DType.float32)]).output  # opaque: never evaluated by passes
    y = g.create_node("matmul", [x, wt]).output
    for factor in (scale, kept, neg):
        y = g.create_node("mul", [y, factor]).output
    one = g.add_constant("one", torch.tensor(1.0))
    big = g.create_node("expand", [one], {"shape": [2, 1024]}).output  # 4 B -> 8 KiB: refused
    g.set_outputs([y, g.create_node("add", [x, big]).output])
    return g


def test_fold_constants_folds_constant_subexpressions_only():
    g = constant_graph()
    inp = torch.randn(2, 1024)
    expected = run(g, [inp])
    result = make_pass("fold-constants", {}).run(g, PassContext())
    g.verify()
    assert result.changed and result.stats == {"folded": 2, "too_big": 1}
    ops = [n.op for n in g.nodes]
    assert "permute" not in ops and "exp" not in ops
    assert {"dropout", OPAQUE, "expand"} <= set(ops)
    assert "w" not in g.constants and "c" not in g.constants  # orphaned inputs removed
    folded = g.nodes[ops.index("matmul")].inputs[1]
    assert folded.is_constant and folded.shape == (1024, 8) and folded.meta["trainable"]
    assert folded.const_value.is_contiguous()
    for got, want in zip(run(g, [inp]), expected):
        assert rel_error(got, want) < 1e-6  # a contiguous W.T may take another BLAS path
    # a graph it cannot improve: no edit at all
    version, before = g.version, print_graph(g)
    assert not make_pass("fold-constants", {}).run(g, PassContext()).changed
    assert g.version == version and print_graph(g) == before


def test_fold_constants_growth_limit_is_an_option():
    g = constant_graph()
    result = make_pass("fold-constants", {"max_growth": "inf"}).run(g, PassContext())
    assert result.stats == {"folded": 3, "too_big": 0}


def test_canonicalize_runs_to_a_fixed_point():
    g = Graph()
    x = g.add_input("x", (1, 4), DType.float32)
    two = g.add_constant("two", torch.tensor(2.0))
    one = g.create_node("div", [two, two]).output  # folds to 1.0, making x * 1 an identity
    y = g.create_node("identity", [g.create_node("mul", [x, one]).output]).output
    g.create_node("relu", [x])  # dead
    g.set_outputs([g.create_node("sigmoid", [y]).output])
    inp = torch.randn(1, 4)
    (expected,) = run(g, [inp])
    result = make_pass("canonicalize", {}).run(g, PassContext())
    g.verify()
    assert result.changed and result.stats["iterations"] == 2
    assert result.stats["fold-constants.folded"] == 1 and result.stats["remove-identity.removed"] == 2
    assert [n.op for n in g.nodes] == ["sigmoid"] and not g.constants
    assert torch.equal(run(g, [inp])[0], expected)


def test_passes_leave_a_graph_they_cannot_improve_unchanged(tiny):
    model, (x,) = tiny
    pipeline = "fold-bn,canonicalize,fold-bn,fold-constants,canonicalize"
    trace = slimgraph.optimize(model, pipeline, example_inputs=x, rtol=1e-5).trace
    assert [r.changed for r in trace] == [True, True, False, False, False]
    assert all(r.diff == "" for r in trace[2:]) and trace[0].diff and trace[1].diff
    assert trace[0].pass_stats["into_previous"] == 1 and trace[2].pass_stats["left"] == 0


@pytest.mark.parametrize("pipeline, option", [
    ("fold-constants{max_growth=-1}", "max_growth"),
    ("fold-constants{max_growth=nan}", "max_growth"),
    ("fold-constants{max_growth=big}", "max_growth"),
    ("fold-bn{into_next=maybe}", "into_next"),
    ("fold-bn{into_prev=true}", "into_prev"),
    ("canonicalize{max_iterations=0}", "max_iterations"),
    ("canonicalize{max_growth=-2}", "max_growth"),
])
def test_bad_options_raise_pass_error_naming_the_option(tiny, pipeline, option):
    model, x = tiny
    with pytest.raises(PassError, match=option):
        slimgraph.optimize(model, pipeline, example_inputs=x)


def test_bad_option_values_are_checked_when_built_directly():
    with pytest.raises(PassError, match="into_next"):
        FoldBatchNorm(into_next="yes")
    assert math.isinf(make_pass("canonicalize", {"max_growth": "inf"}).max_growth)


class DenseWays(nn.Module):
    """Dense layers spelled as tracers leave them: x @ W + b (GPT-2's Conv1D), b + x @ W, x @ W
    with a [1, 1, N] bias, x @ W whose product is read twice (no bias joins), and a matmul of two
    activations (not a layer)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(8, 12, generator=gen))
        self.b = nn.Parameter(torch.randn(12, generator=gen))
        self.w2 = nn.Parameter(torch.randn(12, 6, generator=gen))
        self.b2 = nn.Parameter(torch.randn(1, 1, 6, generator=gen))

    def forward(self, x):
        h = torch.relu(x @ self.w + self.b)
        g = self.b2 + h @ self.w2
        twice = h @ self.w2
        return g, twice * twice + twice, torch.softmax(x @ x.transpose(1, 2), -1)


def test_linear_form_makes_dense_layers_linear_with_their_biases():
    model, x = DenseWays().eval(), torch.randn(2, 5, 8)
    result = slimgraph.optimize(model, "linear-form", example_inputs=x,
                                dynamic_dims={"x": {0: "batch", 1: "seq"}})
    assert result.trace[0].pass_stats == {"linears": 3, "with_bias": 2}
    linears = [n for n in result.graph.nodes if n.op == "linear"]
    assert [n.inputs[2] is not None for n in linears] == [True, True, False]  # no bias: an empty third input
    assert [n.op for n in result.graph.nodes].count("matmul") == 1  # activations times activations stays
    y = torch.randn(3, 7, 8)
    with torch.no_grad():
        want = model(y)
    for got in (run(result.graph, [y]), result.to_torch()(y), run_onnxruntime(result.to_onnx(), [y])):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "linear-form" in [p for p in slimgraph.passes.available()]
