"""lowrank: accuracy at half the parameters, the break-even guard, exactness, options, no-ops."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import slimgraph
from slimgraph.api import import_model
from slimgraph.errors import PassError
from slimgraph.ir import DType, Graph, graph_stats, print_graph, run, verify
from slimgraph.passes import PassContext, make_pass, to_passes
from slimgraph.passes.lowrank import candidate, factor, rewrite, weight_matrix
from tests.conftest import rel_error


@contextlib.contextmanager
def one_thread():
    """Tiny matmuls run ~10x slower on two busy threads than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layer_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- (a) digits MLP
@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    selection = pytest.importorskip("sklearn.model_selection")
    x, y = datasets.load_digits(return_X_y=True)
    xtr, xte, ytr, yte = selection.train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    xtr, xte = (torch.tensor(a / 16.0, dtype=torch.float32) for a in (xtr, xte))
    return xtr, torch.tensor(ytr), xte, torch.tensor(yte)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def test_digits_mlp_keeps_accuracy_at_half_the_parameters(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 10))
    with one_thread():
        train(mlp, xtr, ytr, epochs=30, lr=1e-3)
        before = accuracy(mlp, xte, yte)
        assert before > 95  # a real classifier, or keeping its accuracy proves nothing
        # Weight energy alone keeps ranks near break-even; the training set whitens the inputs.
        result = slimgraph.optimize(mlp, "lowrank{energy=0.999,whiten=true}", example_inputs=xtr)
        small = result.to_torch()
        after = accuracy(small, xte, yte)
    stats = result.trace[0].pass_stats
    assert stats["factored"] >= 2
    assert layer_params(small) <= 0.5 * layer_params(mlp)  # trainable, ready for a fine-tune
    assert graph_stats(result.graph)["params"] == layer_params(small)
    assert after >= before - 1.0, (before, after, stats["layers"])


# ---------------------------------------------------------------------------- (b) break-even guard
def linear_chain(shapes: list[tuple[int, int]], seed: int = 0) -> Graph:
    """x -> linear -> ... with weights (out, in) = shapes; consecutive shapes must chain."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph()
    x = g.add_input("x", (2, shapes[0][1]), DType.float32)
    for i, (m, n) in enumerate(shapes):
        w = g.add_constant(f"w{i}", torch.randn(m, n, generator=gen) / math.sqrt(n), trainable=True)
        b = g.add_constant(f"b{i}", torch.randn(m, generator=gen), trainable=True)
        x = g.create_node("linear", [x, w, b], name=f"fc{i}").output
    g.set_outputs([x])
    return g


def test_guard_refuses_exactly_where_the_rank_does_not_pay():
    # rank_ratio=0.6 -> r = 38 on every layer; break-even mn/(m+n): 64x64 32, 256x64 51.2, 84x64 36.3
    g = linear_chain([(64, 64), (256, 64), (64, 256), (84, 64)])
    x = torch.randn(2, 64)
    (expected,) = run(g, [x])
    params = graph_stats(g)["params"]
    result = make_pass("lowrank", {"rank_ratio": 0.6}).run(g, PassContext())
    layers = result.stats["layers"]
    assert {k for k, v in layers.items() if "refused" in v} == {"fc0", "fc3"}
    assert "break-even 32.0" in layers["fc0"]["refused"] and "36.3" in layers["fc3"]["refused"]
    for name, bias in (("fc1", 256), ("fc2", 64)):
        info = layers[name]
        assert info["rank"] == 38 and info["params_after"] == 38 * (256 + 64) + bias
        assert 0 < info["energy"] < 1 and 0 < info["rel_error"] < 1
    assert graph_stats(g)["params"] == params - result.stats["params_before"] + result.stats["params_after"]
    assert [n.name for n in g.nodes] == ["fc0", "fc1_v", "fc1_u", "fc2_v", "fc2_u", "fc3"]
    assert {"w1", "w2"}.isdisjoint(g.constants)  # orphaned weights removed, the biases reused
    verify(g)
    assert run(g, [x])[0].shape == expected.shape


def test_guard_at_the_break_even_boundary():
    # 64x64: r = 32 saves exactly nothing (32 * 128 == 64 * 64), r = 31 saves a little
    refused = make_pass("lowrank", {"rank_ratio": 0.5}).run(linear_chain([(64, 64)]), PassContext())
    assert not refused.changed and "rank 32 >= break-even 32.0" in refused.stats["layers"]["fc0"]["refused"]
    paid = make_pass("lowrank", {"rank_ratio": 31 / 64}).run(linear_chain([(64, 64)]), PassContext())
    assert paid.changed and paid.stats["layers"]["fc0"]["params_after"] == 31 * 128 + 64


def test_params_ratio_keeps_each_layer_within_its_budget():
    g = linear_chain([(64, 48), (10, 64)])
    result = make_pass("lowrank", {"params_ratio": 0.5}).run(g, PassContext())
    for info in result.stats["layers"].values():
        assert info["params_after"] <= 0.5 * info["params_before"]
        # and the next rank up would exceed it
        m, n = map(int, info["shape"].split("x"))
        assert info["params_after"] + m + n > 0.5 * info["params_before"]


@pytest.mark.heavy
def test_vit_b_16_guard_refuses_layers_where_rank_does_not_pay():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    graph = import_model(model, (torch.randn(1, 3, 224, 224),))
    with one_thread():
        result = make_pass("lowrank", {"rank_ratio": 0.6}).run(graph, PassContext())
    layers = result.stats["layers"]
    # r = 460: the 768x3072 MLP layers (break-even 614.4) pay; the 768x768 attention projections
    # and patch embedding (conv_proj as cout x cin*16*16), break-even 384, and the 1000x768 head
    # (434.4) do not.
    factored = {k for k, v in layers.items() if "refused" not in v}
    assert factored == {f"encoder_layers_encoder_layer_{i}_mlp_{j}" for i in range(12) for j in (0, 3)}
    projections = {f"encoder_layers_encoder_layer_{i}_self_attention_{p}_proj" for i in range(12) for p in "qkv"}
    projections |= {f"encoder_layers_encoder_layer_{i}_self_attention_out_proj" for i in range(12)}
    assert set(layers) - factored == {"conv_proj", "heads_head"} | projections
    assert "break-even 384.0" in layers["conv_proj"]["refused"]
    assert "break-even 434.4" in layers["heads_head"]["refused"]
    verify(graph)


# ---------------------------------------------------------------------------- (c) exactness
CONV_CASES = [  # (mode, kernel, stride, pads [begin..., end...], dilation)
    ("channel", (1, 1), [1, 1], [0, 0, 0, 0], [1, 1]),
    ("channel", (1, 1), [2, 2], [1, 0, 1, 0], [1, 1]),
    ("channel", (3, 3), [2, 1], [1, 2, 0, 1], [1, 2]),
    ("spatial", (3, 3), [1, 1], [1, 1, 1, 1], [1, 1]),
    ("spatial", (3, 5), [2, 1], [1, 2, 0, 1], [2, 1]),
]


def conv_graph(cin: int, cout: int, kernel, stride, pads, dilation, weight: torch.Tensor | None = None) -> Graph:
    g = Graph()
    x = g.add_input("x", (2, cin, 13, 11), DType.float32)
    w = g.add_constant("w", weight if weight is not None else torch.randn(cout, cin, *kernel), trainable=True)
    b = g.add_constant("b", torch.randn(cout), trainable=True)
    y = g.create_node("conv", [x, w, b], {"stride": stride, "pads": pads, "dilation": dilation, "groups": 1})
    g.set_outputs([y.output])
    return g


@pytest.mark.parametrize("mode,kernel,stride,pads,dilation", CONV_CASES)
def test_full_rank_factors_reproduce_the_conv(mode, kernel, stride, pads, dilation):
    torch.manual_seed(0)
    g = conv_graph(6, 10, kernel, stride, pads, dilation)
    x = torch.randn(2, 6, 13, 11)
    (expected,) = run(g, [x])
    cand = candidate(g.nodes[0], mode)
    a, b, _ = factor(weight_matrix(cand), min(cand.m, cand.n))
    rewrite(g, cand, a, b)
    verify(g)
    assert [n.op for n in g.nodes] == ["conv", "conv"] and set(g.constants) == {"b", "w_v", "w_u"}
    assert rel_error(run(g, [x])[0], expected) < 1e-5


def test_full_rank_factors_reproduce_the_linear():
    g = linear_chain([(12, 20)])
    x = torch.randn(2, 20)
    (expected,) = run(g, [x])
    cand = candidate(g.nodes[0], "channel")
    rewrite(g, cand, *factor(weight_matrix(cand), 12)[:2])
    assert rel_error(run(g, [x])[0], expected) < 1e-5


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_pass_reproduces_a_low_rank_conv_in_interpreter_and_torch_module(mode):
    # A 3x3 conv whose matrix (in the mode's layout) has rank 4: all its energy is in 4 ranks.
    gen = torch.Generator().manual_seed(1)
    cin = cout = 16
    if mode == "channel":
        weight = (torch.randn(cout, 4, generator=gen) @ torch.randn(4, cin * 9, generator=gen)).reshape(cout, cin, 3, 3)
    else:  # M[(o, j), (c, i)] of rank 4
        m = torch.randn(cout * 3, 4, generator=gen) @ torch.randn(4, cin * 3, generator=gen)
        weight = m.reshape(cout, 3, cin, 3).permute(0, 2, 3, 1).contiguous()
    model = torch.nn.Conv2d(cin, cout, 3, padding=1).eval()
    with torch.no_grad():
        model.weight.copy_(weight / 10)
    x = torch.randn(1, cin, 12, 12)
    result = slimgraph.optimize(model, f"lowrank{{energy=0.9999,conv={mode}}}", example_inputs=x)
    kernels = [tuple(n.inputs[1].shape) for n in result.graph.nodes]
    assert kernels == ([(4, 16, 3, 3), (16, 4, 1, 1)] if mode == "channel" else [(4, 16, 3, 1), (16, 4, 1, 3)])
    (info,) = result.trace[0].pass_stats["layers"].values()
    assert info["rank"] == 4 and info["energy"] == pytest.approx(1.0) and info["rel_error"] < 1e-6
    with torch.no_grad():
        expected = model(x)
        assert rel_error(result.to_torch()(x), expected) < 1e-5
        assert rel_error(run(result.graph, [x])[0], expected) < 1e-5


# ---------------------------------------------------------------------------- whitening
def test_whitening_minimizes_the_error_on_the_calibration_inputs():
    gen = torch.Generator().manual_seed(0)
    # Inputs that live mostly in 6 of 48 directions, as trained activations do.
    basis = torch.randn(6, 48, generator=gen)
    calib = torch.randn(512, 6, generator=gen) @ basis + 0.01 * torch.randn(512, 48, generator=gen)
    errors = {}
    for whiten in (False, True):
        g = linear_chain([(40, 48)], seed=3)
        (expected,) = run(g, [calib])
        ctx = PassContext(example_inputs=(torch.zeros(1, 48),), calibration_data=[calib[:256], (calib[256:],)])
        result = make_pass("lowrank", {"rank_ratio": 0.15, "whiten": whiten}).run(g, ctx)
        info = result.stats["layers"]["fc0"]
        bias = g.constants["b0"].const_value
        out = run(g, [calib])[0]
        errors[whiten] = float(torch.linalg.norm(out - expected) / torch.linalg.norm(expected - bias))
        if whiten:  # the reported output error is the measured one (bias excluded)
            assert info["whitened"] and info["output_error"] == pytest.approx(errors[whiten], rel=1e-3)
    assert errors[True] < 0.1 * errors[False], errors


def test_interpreter_capture_is_backward_compatible():
    g = linear_chain([(8, 6), (4, 8)])
    x = torch.randn(2, 6)
    (plain,) = run(g, [x])
    hidden = g.nodes[0].output
    outputs, captured = run(g, [x], capture=[hidden])
    assert torch.equal(outputs[0], plain)
    w, b = g.constants["w0"].const_value, g.constants["b0"].const_value
    assert torch.allclose(captured[hidden], x @ w.T + b)


# ---------------------------------------------------------------------------- (d) options
@pytest.mark.parametrize("spec,option", [
    ("lowrank{energy=1.5}", "energy"),
    ("lowrank{rank_ratio=0}", "rank_ratio"),
    ("lowrank{params_ratio=1}", "params_ratio"),
    ("lowrank{energy=abc}", "energy"),
    ("lowrank{rank_ratio=0.5,energy=0.9}", "rank_ratio, energy"),
    ("lowrank", "rank_ratio, energy, params_ratio"),
    ("lowrank{energy=0.9,conv=diagonal}", "conv"),
])
def test_bad_options_name_the_option(spec, option):
    with pytest.raises(PassError, match=option):
        to_passes(spec)


def test_whiten_without_any_inputs_is_an_error():
    with pytest.raises(PassError, match="whiten"):
        make_pass("lowrank", {"energy": 0.9, "whiten": True}).run(linear_chain([(64, 64)]), PassContext())


# ---------------------------------------------------------------------------- (e) nothing to do
def test_nothing_to_factor_leaves_the_graph_untouched(tiny):
    model, inputs = tiny
    # full rank is at or above break-even everywhere; conv=off refuses convs outright and a
    # 10% budget leaves the 4x8 classifier no rank at all
    for spec in ("lowrank{rank_ratio=1.0}", "lowrank{energy=1.0,whiten=true}", "lowrank{params_ratio=0.1,conv=off}"):
        graph = import_model(model, inputs)
        before = print_graph(graph)
        result = slimgraph.optimize(graph, spec, example_inputs=inputs)
        record = result.trace[0]
        assert not record.changed and record.diff == "" and print_graph(result.graph) == before, spec
        layers = record.pass_stats["layers"]
        assert set(layers) == {"conv1", "conv2", "fc"} and all(v["refused"] for v in layers.values())
    no_layers = Graph()
    x = no_layers.add_input("x", (1, 4), DType.float32)
    no_layers.set_outputs([no_layers.create_node("relu", [x]).output])
    version = no_layers.version
    assert not make_pass("lowrank", {"energy": 0.5}).run(no_layers, PassContext()).changed
    assert no_layers.version == version


# ---------------------------------------------------------------------------- global budget
def test_global_budget_spends_ranks_where_the_whitened_spectrum_needs_them():
    """fc0 reads inputs that live in 4 directions (little rank needed), fc1 and fc2 read white
    noise (every direction counts). One budget of 40% of their parameters: the total stays within
    it, fc0 gets less rank than the others, and the output error on held-out data is below that of
    40% for each layer."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 64, generator=gen)

    def inputs(n):
        low = torch.randn(n, 4, generator=gen) @ basis + 0.01 * torch.randn(n, 64, generator=gen)
        return low, torch.randn(n, 64, generator=gen)

    def graph() -> Graph:
        g = Graph()
        low, full = g.add_input("low", (2, 64), DType.float32), g.add_input("full", (2, 64), DType.float32)
        outs = []
        for i, x in enumerate((low, full, full)):
            w = g.add_constant(f"w{i}", torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) / 8)
            b = g.add_constant(f"b{i}", torch.zeros(64))
            outs.append(g.create_node("linear", [x, w, b], name=f"fc{i}").output)
        g.set_outputs(outs)
        return g

    calib, held_out = [inputs(256) for _ in range(2)], inputs(512)
    errors, layers = {}, {}
    for scope in ("global", "layer"):
        g = graph()
        expected = run(g, list(held_out))
        result = make_pass("lowrank", {"params_ratio": 0.4, "whiten": True, "scope": scope}).run(
            g, PassContext(calibration_data=calib))
        layers[scope] = result.stats["layers"]
        errors[scope] = sum(rel_error(y, e) for y, e in zip(run(g, list(held_out)), expected))
    glob = layers["global"]
    assert sum(info["params_after"] for info in glob.values()) <= 0.4 * 3 * (64 * 64 + 64)
    assert glob["fc0"]["rank"] < min(glob["fc1"]["rank"], glob["fc2"]["rank"]), glob
    assert {info["rank"] for info in layers["layer"].values()} == {12}
    assert errors["global"] < 0.9 * errors["layer"], errors  # measured 0.83x


def test_global_scope_needs_a_parameter_budget():
    with pytest.raises(PassError, match="option 'scope'"):
        make_pass("lowrank", {"energy": 0.9, "scope": "global"})
    with pytest.raises(PassError, match="option 'scope'"):
        make_pass("lowrank", {"params_ratio": 0.5, "scope": "everywhere"})
