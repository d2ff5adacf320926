"""Every op the registry holds, drawn alone (ir_graphs.py with ``ops=[op]``, a few seeds each: other
attributes, ranks, float32 and float64): the PyTorch backend and onnxruntime compute what the
interpreter computes, and both targets import back without an opaque node. A new op fails here
until it has a sampler, both emitters and both importers."""

from __future__ import annotations

import math

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import run
from slimgraph.ir.ops import registered_ops
from tests.fuzz import ir_graphs
from tests.fuzz.ir_graphs import NOT_DRAWN, RandomGraph, Rejected, drawable_ops
from tests.fuzz.properties import onnx_file

SEEDS = range(6)


def test_every_registered_op_is_drawn():
    """Alone where it can be (ops that read integers, booleans or size-1 dims need a graph that makes
    them first), else in the random graphs of the suite's seeds."""
    assert set(registered_ops()) == drawable_ops() | set(NOT_DRAWN)
    drawn = {op for op in drawable_ops() for seed in SEEDS if op in RandomGraph(seed, nodes=1, ops=[op]).drawn}
    drawn |= {op for seed in range(60) for op in RandomGraph(seed).drawn}
    assert drawn == drawable_ops(), f"never drawn: {sorted(drawable_ops() - drawn)}"


def _switch_off(monkeypatch, rule: tuple) -> None:
    """The generator with one rejection rule, (owner, name, verdict), always giving ``verdict``: another
    rule is then tested alone."""
    owner, name, verdict = rule
    monkeypatch.setattr(owner, name, lambda *args: verdict)


@pytest.mark.parametrize("rule,off", [("var reads values where 16-bit rounding moves it", (RandomGraph, "_low", True)),
                                      ("as float16 holds them", (ir_graphs, "_sensitive", False))])
def test_var_of_rows_that_are_all_rounding_is_not_drawn(rule, off, monkeypatch):
    """Rows of pi / 4 with some elements one bit lower (torch's float32 atan2(t, t): its SIMD body and
    scalar tail round apart, ir 1000248) have a var of 1e-15 in torch and 0 in onnxruntime: no backend
    can match a residue. Each of two rules rejects it alone: the stability of var's inputs under 16-bit
    rounding, and the float16 model (0 against 1e-15, weighed against its own peak). Rows that are
    exactly constant (var 0 everywhere) and random ones are drawn."""
    _switch_off(monkeypatch, off)
    random = RandomGraph(0, nodes=1, ops=["relu"])
    x = next(e for e in random.pool if e.value.name == "x")
    attrs = {"axes": [1], "correction": 1, "keepdim": True}
    random.node("var", [x], attrs)
    pi4 = torch.full(x.shape, math.pi / 4, dtype=x.value.dtype.torch)
    x.data = (pi4, pi4.clone())
    random.node("var", [x], attrs)
    lower = pi4.clone()
    lower[:, 0] = torch.nextafter(lower[:, 0], torch.zeros((), dtype=lower.dtype))  # the rows var reads: along axis 1
    x.data = (pi4, lower)
    with pytest.raises(Rejected, match=rule):
        random.node("var", [x], attrs)


@pytest.mark.parametrize("rule,off", [
    ("group_norm of a group nearly constant beside its mean", (RandomGraph, "_wide", True)),
    ("its float32 value is over 1e-5 of its peak off its float64 value", (ir_graphs, "_group_norm_cancels", False))])
def test_group_norm_of_a_group_constant_beside_its_mean_is_not_drawn(rule, off, monkeypatch):
    """torch's group_norm computes x * (gamma * rstd) + (beta - mean * gamma * rstd): over copies of
    14.25 (rstd 1 / sqrt(eps)) those terms are 4506 and cancel, leaving the bias a float32 ulp of
    4506 off (ir 3001204: 2.7e-4 between two forms of it). Each of two rules rejects it alone: the
    analytic one for group_norm and the comparison of every node with its float64 value. The same
    group with a spread is drawn."""
    _switch_off(monkeypatch, off)
    random = RandomGraph(0, nodes=1, ops=["relu"])
    x = next(e for e in random.pool if e.value.name == "x")
    c = x.shape[1]
    inputs = [x, random.const((c,), "positive"), random.const((c,))]
    spread = torch.arange(math.prod(x.shape), dtype=x.value.dtype.torch).reshape(x.shape) / 4 + 14.25
    x.data = (spread, spread.clone())
    random.node("group_norm", inputs, {"num_groups": 1, "eps": 1e-5})
    copies = torch.full(x.shape, 14.25, dtype=x.value.dtype.torch)
    x.data = (copies, copies.clone())
    with pytest.raises(Rejected, match=rule):
        random.node("group_norm", inputs, {"num_groups": 1, "eps": 1e-5})

def test_the_float16_model_takes_a_cos_angle_from_float16_where_fp16_does(monkeypatch):
    """fp16 keeps a sin / cos angle float32 only past 8 times its output's peak: below, the angle is
    rounded to 16 bits, and 1 / cos of an angle near 3 pi / 2 moves by 2x (ir 5000495). The float16
    model of the generator computes it so, and rejects the reciprocal (the float64 comparison, which
    rejects it too, switched off)."""
    _switch_off(monkeypatch, (RandomGraph, "_wide", True))
    random = RandomGraph(0, nodes=1, ops=["relu"])
    x = next(e for e in random.pool if e.value.name == "x")
    angles = torch.zeros(x.shape, dtype=x.value.dtype.torch)
    angles.view(-1)[:2] = torch.tensor([4.7093, 0.3])  # cos -0.0031 beside 0.955: the peak stays ~1
    x.data = (angles, angles.clone())
    cos = random.node("cos", [x])
    assert cos.low[0].view(-1)[0] != cos.data[0].view(-1)[0]  # from the angle as float16 holds it
    with pytest.raises(Rejected, match="as float16 holds them"):
        random.node("reciprocal", [cos])


@pytest.mark.parametrize("offset", [0.01, 0.2])
def test_a_nearest_grid_sample_near_a_pixel_edge_is_not_drawn(offset):
    """Nearest sampling jumps where a coordinate crosses a pixel's edge: a coordinate 0.01 px from it
    reads the next pixel in a float16 grid rounded elsewhere (ir 8000212: 9e-2 off in onnxruntime);
    scaling the grid by 1 +- 2^-8 barely moves a coordinate near 0. 0.2 px away it is drawn."""
    random = RandomGraph(0, nodes=1, ops=["relu"])
    image = random.graph.add_constant("image", torch.randn(2, 2, 4, 6, dtype=random.dtype))
    grid = torch.zeros(2, 4, 6, 2, dtype=random.dtype)
    grid[..., 0] = (2 * (2.5 + offset) + 1) / 6 - 1  # pixel x 2.5 + offset (align_corners False, width 6)
    grid[..., 1] = (2 * 1.2 + 1) / 4 - 1  # pixel y 1.2 (height 4)
    value = random.graph.create_node("identity", [random.graph.add_constant("grid", grid)]).outputs[0]
    random.pool.append(ir_graphs.Entry(value, (grid, grid.clone())))  # an inexact grid
    attrs = {"mode": "nearest", "padding_mode": "zeros", "align_corners": False}
    if offset < 0.05:
        with pytest.raises(Rejected, match="near a pixel's edge"):
            random.node("grid_sample", [image, value], attrs)
    else:
        random.node("grid_sample", [image, value], attrs)


def assert_close(got, want, what: str, dtype: torch.dtype) -> None:
    got = got if isinstance(got, (tuple, list)) else (got,)
    assert len(got) == len(want), f"{what}: {len(got)} outputs, not {len(want)}"
    bound = 1e-6 if dtype == torch.float64 else 1e-5  # float64: onnxruntime lacks some double kernels (erf)
    for k, (y, w) in enumerate(zip(got, want)):
        y = torch.as_tensor(y)
        assert tuple(y.shape) == tuple(w.shape) and y.dtype == w.dtype, \
            f"{what}: output {k} is {y.dtype} {tuple(y.shape)}, not {w.dtype} {tuple(w.shape)}"
        error = float((y.double() - w.double()).abs().max()) if w.numel() else 0.0
        scale = max(float(w.double().abs().max()), 1.0) if w.numel() else 1.0
        assert error <= bound * scale, f"{what}: output {k} is {error:.2e} off"


@pytest.mark.parametrize("op", sorted(drawable_ops()))
def test_op_in_every_backend(op):
    for seed in SEEDS:
        random = RandomGraph(seed, nodes=1, ops=[op])
        if op not in random.drawn:
            continue
        graph, inputs = random.graph, random.example()
        want = run(graph, list(inputs))
        at = f"{op} (seed {seed}, {random.dtype})"
        with torch.no_grad():
            assert_close(slimgraph.to_torch(graph)(*inputs), want, f"{at}: PyTorch backend", random.dtype)
        proto = onnx_file(graph, random.symbolic)
        assert_close(run_onnxruntime(proto, list(inputs)), want, f"{at}: onnxruntime", random.dtype)
        back = slimgraph.import_model(proto)
        opaque = [n.name for n in back.nodes if n.op == "opaque"]
        assert not opaque, f"{at}: the ONNX file imports with opaque nodes {opaque}"
        assert_close(run(back, list(inputs)), want, f"{at}: re-imported from ONNX", random.dtype)
        again = slimgraph.import_model(slimgraph.to_torch(graph), inputs, random.dynamic_dims)
        opaque = [n.name for n in again.nodes if n.op == "opaque"]
        assert not opaque, f"{at}: the PyTorch source imports with opaque nodes {opaque}"


@pytest.mark.parametrize("op", sorted(drawable_ops()))
def test_op_keeps_the_symbolic_batch(op):
    """Drawn on a symbolic batch, every output that runs at the other batch with that batch as its
    leading dim declares it symbolic (torch's kernels for resize, constant pad and lrn guard the batch
    to its traced size on fake tensors: their outputs came out static, and what followed baked it in)."""
    for seed in SEEDS:
        random = RandomGraph(seed, nodes=1, ops=[op])
        if op not in random.drawn or not random.symbolic:
            continue
        batch = random.batches[1]
        for entry in random.pool:
            value, data = entry.value, entry.data[1]
            if value.producer is None or not data.dim():
                continue
            declared = batch if value.sym and value.sym[0] is not None else value.shape[0]
            assert data.shape[0] == declared, \
                f"{op} (seed {seed}): %{value.name} is {tuple(data.shape)} at batch {batch} but declares " \
                f"{value.shape} (sym {value.sym})"
