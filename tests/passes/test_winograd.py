"""winograd: exact transforms, fp32 error against float64, whole models, what is left alone."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import PassError, UnsupportedError
from slimgraph.ir import DType, Graph, print_graph, run
from slimgraph.passes import PassContext, make_pass, parse_pipeline
from slimgraph.passes.winograd import (
    POINTS,
    TARGETS,
    Winograd,
    choose_tile,
    cook_toom,
    load_cost_table,
    rewrite_conv,
)
from tests.conftest import rel_error

torchvision = pytest.importorskip("torchvision")

SAME = {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1}


def conv_graph(n: int, c: int, k: int, h: int, w: int, pads=(1, 1, 1, 1), bias: bool = True,
               seed: int = 0, dtype: DType = DType.float32) -> Graph:
    """One 3x3 conv, He-initialized (outputs keep the input's scale, as in a trained net)."""
    gen = torch.Generator().manual_seed(seed)
    g = Graph("layer")
    x = g.add_input("x", (n, c, h, w), dtype)
    weight = g.add_constant("w", (torch.randn(k, c, 3, 3, generator=gen) * (2 / (9 * c)) ** 0.5).to(dtype.torch))
    b = g.add_constant("b", (torch.randn(k, generator=gen) * 0.1).to(dtype.torch)) if bias else None
    g.set_outputs([g.create_node("conv", [x, weight, b], {**SAME, "pads": list(pads)}, name="conv").output])
    return g


def float64_reference(g: Graph, x: torch.Tensor) -> torch.Tensor:
    conv = g.find_node("conv")
    w, b = (v.const_value.double() if v is not None else None for v in conv.inputs[1:3])
    pt, pl, pb, pr = conv.attrs["pads"]
    return F.conv2d(F.pad(x.double(), [pl, pr, pt, pb]), w, b)


def im2col_conv(g: Graph, x: torch.Tensor) -> torch.Tensor:
    """The layer as a direct conv in fp32 by im2col and one matrix product."""
    conv = g.find_node("conv")
    w, b = (v.const_value if v is not None else None for v in conv.inputs[1:3])
    pt, pl, pb, pr = conv.attrs["pads"]
    padded = F.pad(x, [pl, pr, pt, pb])
    y = w.reshape(w.shape[0], -1) @ F.unfold(padded, 3)
    y = y if b is None else y + b[:, None]
    return y.reshape(x.shape[0], w.shape[0], padded.shape[2] - 2, padded.shape[3] - 2)


def rms_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(err) / rms(ref): unlike the max error, stable from one random layer to the next."""
    return float((y.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def winograd(g: Graph, m: int, points=None) -> Graph:
    g = g.clone()
    rewrite_conv(g, g.find_node("conv"), m, points)
    return g


def onnx_ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def onnx_convs(proto) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(kernel_shape, strides) of every Conv node."""
    attrs = [{a.name: tuple(a.ints) for a in n.attribute} for n in proto.graph.node if n.op_type == "Conv"]
    return [(a["kernel_shape"], a["strides"]) for a in attrs]


# ---------------------------------------------------------------------------- transforms
def correlate_1d(at, g_mat, bt, g, d):
    u = [sum(gi * x for gi, x in zip(row, g)) for row in g_mat]
    v = [sum(bi * x for bi, x in zip(row, d)) for row in bt]
    return [sum(a * ui * vi for a, ui, vi in zip(row, u, v)) for row in at]


def test_cook_toom_reproduces_lavin_gray_f2():
    at, g, bt = cook_toom(2, 3, [0, 1, -1])
    half = Fraction(1, 2)
    assert bt == [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    assert g == [[1, 0, 0], [half, half, half], [half, -half, half], [0, 0, 1]]
    assert at == [[1, 1, 1, 0], [0, 1, -1, -1]]


@pytest.mark.parametrize("m,points", [
    (2, POINTS[2]), (4, POINTS[4]), (4, [0, 1, -1, Fraction(1, 2), Fraction(-1, 2)]), (4, [0, 1, -1, 2, -2]),
    (6, [0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)]), (3, [0, 1, -1, 3]),
])
def test_cook_toom_is_exact_correlation(m, points):
    """In exact arithmetic F(m,3) is the correlation itself, in 1-D and nested to 2-D."""
    rng = random.Random(m)
    at, g_mat, bt = cook_toom(m, 3, points)
    alpha = m + 2
    for _ in range(5):
        g = [Fraction(rng.randint(-9, 9)) for _ in range(3)]
        d = [Fraction(rng.randint(-9, 9)) for _ in range(alpha)]
        assert correlate_1d(at, g_mat, bt, g, d) == [sum(d[i + j] * g[j] for j in range(3)) for i in range(m)]
    # 2-D: Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A in float64 with small integers is exact too
    at, g_mat, bt = (torch.tensor([[float(x) for x in r] for r in mat], dtype=torch.float64)
                     for mat in (at, g_mat, bt))
    g2 = torch.randint(-4, 5, (3, 3), dtype=torch.float64)
    d2 = torch.randint(-4, 5, (alpha, alpha), dtype=torch.float64)
    y = at @ ((g_mat @ g2 @ g_mat.T) * (bt @ d2 @ bt.T)) @ at.T
    expected = F.conv2d(d2[None, None], g2[None, None])[0, 0]
    assert torch.allclose(y, expected, atol=1e-9), (y, expected)


def test_cook_toom_rejects_bad_points():
    with pytest.raises(ValueError, match="distinct"):
        cook_toom(2, 3, [0, 1, 1])
    with pytest.raises(ValueError, match="needs 3"):
        cook_toom(2, 3, [0, 1])


# ---------------------------------------------------------------------------- fp32 error
# Sampled so every value appears: C, K in {16, 64, 256}; H, W in {7, 14, 28, 56, 9, 13}; batch
# 1 and 4; padding 1, 0 (valid) and asymmetric; with and without bias.
LAYERS = [
    (1, 16, 16, 56, 56, (1, 1, 1, 1), True),
    (4, 16, 64, 28, 28, (1, 1, 1, 1), False),
    (1, 64, 256, 14, 14, (1, 1, 1, 1), True),
    (4, 256, 16, 7, 7, (1, 1, 1, 1), True),
    (1, 256, 256, 13, 9, (0, 0, 0, 0), True),
    (4, 64, 64, 9, 13, (2, 1, 0, 1), False),
    (1, 16, 256, 7, 56, (1, 1, 1, 1), True),
    (4, 64, 16, 56, 28, (1, 0, 1, 2), True),
]


@pytest.mark.parametrize("n,c,k,h,w,pads,bias", LAYERS)
def test_error_against_float64(n, c, k, h, w, pads, bias):
    g = conv_graph(n, c, k, h, w, pads, bias)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))
    ref = float64_reference(g, x)
    direct = run(g, [x])[0]
    f2 = run(winograd(g, 2), [x])[0]
    f4 = run(winograd(g, 4), [x])[0]
    assert f2.shape == f4.shape == ref.shape
    # "direct fp32" is two algorithms whose errors differ by machine: oneDNN's conv sums in short
    # blocks on Intel Xeons with AVX-512 (2-3x more accurate than F(2x2) at 256 input channels there),
    # im2col + the fp32 GEMM that Winograd's own channel sums run on does not; F(2x2) is held to the
    # error of a direct fp32 conv, either of them (0.3-1.5x the worse one on both machine kinds)
    rms_direct = max(rms_error(direct, ref), rms_error(im2col_conv(g, x), ref))
    max_direct = max(rel_error(direct.double(), ref), rel_error(im2col_conv(g, x).double(), ref))
    assert rms_error(f2, ref) <= 2 * rms_direct
    assert rel_error(f2.double(), ref) <= 2 * max_direct
    assert rel_error(f4.double(), ref) <= 1e-5


def test_f4_default_points_beat_0_1_2():
    """0, ±1, 1/2, -2 has about half the fp32 error of 0, ±1, ±2 (ANCHORS.md, Barabasz et al.)."""
    g = conv_graph(1, 64, 64, 28, 28)
    x = torch.randn(1, 64, 28, 28, generator=torch.Generator().manual_seed(1))
    ref = float64_reference(g, x)
    default = rms_error(run(winograd(g, 4), [x])[0], ref)
    plain = rms_error(run(winograd(g, 4, [0, 1, -1, 2, -2]), [x])[0], ref)
    assert default < 0.8 * plain


@pytest.mark.parametrize("m", [2, 4])
def test_layer_in_onnxruntime_at_batch_2(m):
    """The ONNX form at N > 1 (N stays outside K through the GEMM and the two transposes)."""
    g = conv_graph(2, 16, 24, 13, 10, pads=(1, 0, 2, 1))
    x = torch.randn(2, 16, 13, 10, generator=torch.Generator().manual_seed(1))
    proto = slimgraph.to_onnx(winograd(g, m))
    ref = float64_reference(g, x)
    assert rel_error(run_onnxruntime(proto, [x])[0].double(), ref) < 1e-5
    assert onnx_ops(proto).count("MatMul") == 2 and onnx_convs(proto) == [((m + 2, m + 2), (m, m))]
    # onnxruntime runs a general 6-D Transpose several times slower than one that moves one axis
    perms = [list(a.ints) for n in proto.graph.node if n.op_type == "Transpose" for a in n.attribute]
    assert perms and all(len(p) <= 4 for p in perms)


def test_runs_at_any_batch_and_in_float64():
    g = conv_graph(1, 16, 8, 11, 10, bias=True)
    rewritten = winograd(g, 4)
    x = torch.randn(3, 16, 11, 10)
    ref = float64_reference(g, x)
    assert rel_error(run(rewritten, [x])[0].double(), ref) < 1e-5
    assert rel_error(slimgraph.to_torch(rewritten)(x).detach().double(), ref) < 1e-5
    g64 = conv_graph(2, 8, 8, 9, 9, dtype=DType.float64)
    x64 = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    assert rel_error(run(winograd(g64, 4), [x64])[0], float64_reference(g64, x64)) < 1e-12


# ---------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("name,expected", [("resnet18", 13), pytest.param("vgg11", 8, marks=pytest.mark.heavy)])
def test_whole_model_tile4(name, expected):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = model(x)
    result = slimgraph.optimize(model, "winograd{tile=4}", example_inputs=(x,))
    record = result.trace[0]
    assert record.pass_stats["f4"] == expected  # every 3x3 stride-1 conv
    assert 0 < record.max_rel_error < 1e-4  # lossy: the trace reports its error
    assert not [n for n in result.graph.nodes if n.op == "conv" and n.inputs[1].shape[2:] == (3, 3)
                and n.attrs["stride"] == [1, 1]]
    assert rel_error(run(result.graph, [x])[0], reference) < 1e-4
    with torch.no_grad():
        assert rel_error(result.to_torch()(x), reference) < 1e-4
    # onnxruntime runs the Winograd layers themselves: per layer a 6x6 stride-4 tiling Conv and
    # two MatMuls (the α² GEMMs with the transformed weights U, the output transform Aᵀ⊗Aᵀ)
    proto = result.to_onnx()
    convs = onnx_convs(proto)
    assert convs.count(((6, 6), (4, 4))) == expected and ((3, 3), (1, 1)) not in convs
    matmuls = [n.input[0] for n in proto.graph.node if n.op_type == "MatMul"]
    assert sum(name.endswith("winograd_u") for name in matmuls) == expected
    assert matmuls.count("winograd_f4_output") == expected
    assert rel_error(run_onnxruntime(proto, [x])[0], reference) < 1e-4


def test_rewrite_shares_transforms_and_drops_old_weights():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)).eval()
    x = torch.randn(1, 8, 12, 12)
    graph = slimgraph.optimize(model, "winograd{tile=2}", example_inputs=(x,)).graph
    names = sorted(graph.constants)
    assert [n for n in names if n.startswith("winograd_f2")] == ["winograd_f2_input", "winograd_f2_output"]
    assert not any(n.endswith("weight") for n in names)  # replaced by the transformed U
    assert sum(n.endswith("winograd_u") for n in names) == 2
    assert [n.op for n in graph.nodes].count("conv") == 2  # only the tiling convs


# ---------------------------------------------------------------------------- left alone
class Others(torch.nn.Module):
    """Convs winograd must not touch: stride 2, depthwise, grouped, dilated, 1x1, 5x5."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
            torch.nn.Conv2d(16, 16, 3, padding=1, groups=4),
            torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2),
            torch.nn.Conv2d(16, 16, 1),
            torch.nn.Conv2d(16, 16, 5, padding=2),
        )

    def forward(self, x):
        return self.layers(x)


def test_other_convs_untouched_and_graph_unchanged():
    graph = slimgraph.import_model(Others().eval(), (torch.randn(1, 8, 16, 16),))
    before, version = print_graph(graph), graph.version
    result = Winograd(tile=4).run(graph, PassContext())
    assert not result.changed and result.stats["rewritten"] == 0
    assert graph.version == version and print_graph(graph) == before
    reasons = sorted(result.stats["layers"].values())
    assert reasons == sorted(["skipped: stride [2, 2]", "skipped: depthwise", "skipped: grouped (4 groups)",
                              "skipped: dilation [2, 2]", "skipped: kernel 1x1", "skipped: kernel 5x5"])
    # through the manager: no diff, no error
    record = slimgraph.optimize(Others().eval(), "winograd{tile=4}", example_inputs=(torch.randn(1, 8, 16, 16),)
                                ).trace[0]
    assert not record.changed and record.diff == "" and record.max_abs_error == 0.0


def test_low_precision_is_left_alone():
    g = conv_graph(1, 8, 8, 8, 8, dtype=DType.float16)
    result = Winograd(tile=2).run(g, PassContext())
    assert not result.changed and "float16" in result.stats["layers"]["conv"]


@pytest.mark.parametrize("make", [
    lambda: make_pass("winograd", {"tile": "3"}),
    lambda: parse_pipeline("winograd{tile=3}"),
    lambda: Winograd(tile=3),
])
def test_bad_tile_option(make):
    with pytest.raises(PassError, match="'tile'"):
        make()


def test_bad_target_option():
    with pytest.raises(PassError, match="'target'"):
        parse_pipeline("winograd{target=tensorrt}")


def test_pipeline_options():
    assert parse_pipeline("winograd{tile=4}")[0].tile == 4
    assert parse_pipeline("winograd")[0].tile == "auto"
    assert parse_pipeline("winograd")[0].target == "onnxruntime"
    assert parse_pipeline("winograd{target=torch}")[0].target == "torch"
    assert not Winograd.exact


# ---------------------------------------------------------------------------- cost model
ORT = [
    {"C": 64, "K": 64, "H": 56, "W": 56, "direct_ms": 2.0, "f2_ms": 2.2, "f4_ms": 1.6, "best": "f4"},
    {"C": 64, "K": 64, "H": 7, "W": 7, "direct_ms": 0.1, "f2_ms": 0.2, "f4_ms": 0.3, "best": "direct"},
    {"C": 128, "K": 128, "H": 56, "W": 56, "direct_ms": 8.0, "f2_ms": 7.0, "f4_ms": 9.0, "best": "f2"},
]
TORCH = [{**ORT[0], "f4_ms": 2.1, "best": "direct"}, *ORT[1:]]
TABLE = {"backends": {"onnxruntime": {"margin": 1.1, "entries": ORT}, "torch": {"margin": 1.1, "entries": TORCH}}}


def test_choose_tile_rule():
    assert choose_tile(64, 64, 56, 56, TABLE)[0] == 4
    assert choose_tile(48, 64, 50, 60, TABLE)[0] == 4  # nearest in log2 space
    assert choose_tile(64, 64, 9, 9, TABLE)[0] is None
    assert choose_tile(128, 128, 112, 112, TABLE)[0] == 2  # beyond the table: nearest edge
    tile, why = choose_tile(64, 128, 56, 56, TABLE)  # equally near f4 and f2: keep direct
    assert tile is None and "tie" in why


def test_choose_tile_follows_the_target_backend():
    assert TARGETS[0] == "onnxruntime"  # the default
    assert choose_tile(64, 64, 56, 56, TABLE, "torch")[0] is None
    assert choose_tile(128, 128, 56, 56, TABLE, "torch")[0] == 2
    with pytest.raises(PassError, match="'tensorrt'"):
        choose_tile(64, 64, 56, 56, TABLE, "tensorrt")


def test_shipped_cost_table_is_consistent():
    table = load_cost_table()
    assert table["rule"] and table["default"] == TARGETS[0] and set(table["backends"]) == set(TARGETS)
    for target, measured in table["backends"].items():
        assert measured["about"].startswith(target)
        shapes = {(e["C"], e["H"]) for e in measured["entries"]}
        assert {32, 512} <= {c for c, _ in shapes} and {7, 112} <= {h for _, h in shapes}
        margin = measured["margin"]
        assert margin >= 1.0
        for e in measured["entries"]:
            fastest = min(("direct", "f2", "f4"), key=lambda v: e[f"{v}_ms"])
            if e["best"] == "direct":
                assert fastest == "direct" or e["direct_ms"] < margin * e[f"{fastest}_ms"]
            else:
                assert e["best"] == fastest and e["direct_ms"] >= margin * e[f"{fastest}_ms"]


@pytest.mark.parametrize("target", TARGETS)
def test_auto_follows_the_cost_model(target):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    graph = slimgraph.import_model(model, (torch.randn(1, 3, 224, 224),))
    convs = {n.name: n for n in graph.nodes if n.op == "conv"}
    expected = {}
    for name, node in convs.items():
        x, w = node.inputs[0], node.inputs[1]
        if w.shape[2:] == (3, 3) and node.attrs["stride"] == [1, 1]:
            expected[name] = choose_tile(x.shape[1], w.shape[0], x.shape[2], x.shape[3], target=target)[0]
    result = Winograd(target=target).run(graph, PassContext())
    layers = result.stats["layers"]
    assert set(layers) == set(convs)
    for name, tile in expected.items():
        assert layers[name].startswith(f"F({tile}x{tile}" if tile else "skipped: cost model"), layers[name]
        assert target in layers[name]  # the reason names whose measurements decided
    assert result.stats["rewritten"] == sum(t is not None for t in expected.values())
    assert result.changed == (result.stats["rewritten"] > 0)


def test_rewrite_conv_refuses_what_it_cannot_do():
    graph = slimgraph.import_model(Others().eval(), (torch.randn(1, 8, 16, 16),))
    strided = next(n for n in graph.nodes if n.op == "conv")
    with pytest.raises(UnsupportedError, match="stride"):
        rewrite_conv(graph, strided, 4)
    layer = conv_graph(1, 4, 4, 8, 8)
    with pytest.raises(UnsupportedError, match="unknown tile"):
        rewrite_conv(layer, layer.find_node("conv"), 3)


def test_auto_rewrites_where_the_table_says_it_pays(monkeypatch):
    import slimgraph.passes.winograd as winograd_module

    monkeypatch.setattr(winograd_module, "load_cost_table", lambda: TABLE)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.MaxPool2d(8),
                                torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.randn(1, 64, 56, 56)
    result = slimgraph.optimize(model, "winograd", example_inputs=(x,))
    layers = list(result.trace[0].pass_stats["layers"].values())
    assert layers[0].startswith("F(4x4,3x3) (cost model: f4") and layers[1].startswith("skipped: cost model")
    with torch.no_grad():
        assert rel_error(result.to_torch()(x), model(x)) < 1e-5
