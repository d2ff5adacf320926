"""Every public function of torch.nn.functional converts to canonical IR ops and computes what torch
computes, or sits in NOT_OPS / NOT_CONVERTED with the reason. A function with no direct handler
converts through its Core ATen decomposition, so this measures the whole torch.fx path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimgraph
from slimgraph.ir import OPAQUE

g = torch.Generator().manual_seed(0)


def r(*shape):
    return torch.randn(*shape, generator=g)


X4, X3, X5, X2 = r(2, 4, 8, 8), r(2, 4, 12), r(1, 2, 4, 6, 6), r(4, 6)
W4, W3, W5 = r(6, 4, 3, 3), r(6, 4, 3), r(3, 2, 3, 3, 3)
LABELS, PROBS = torch.tensor([1, 0, 5, 2]), torch.rand(4, 6, generator=g)
IDS = torch.tensor([[1, 3, 0], [2, 2, 4]])
TABLE = r(5, 3)
Q = r(2, 2, 5, 4)
C1 = r(3, 6, 6)
C2 = r(3, 4, 5)
C3 = r(5)
C4 = r(4, 3, 3)
C5 = r(4, 3, 3, 3)
C6 = r(2, 3, 2, 2, 2)
C7 = r(4)
C8 = r(4)
C9 = r(4)
C10 = r(4)
C11 = r(8)
C12 = r(8)
C13 = r(3, 6)
C14 = r(3)
C15 = r(4)
C16 = r(8)

# name -> (function of the inputs, inputs): the call a model makes
SAMPLES = {
    "adaptive_avg_pool1d": (lambda x: F.adaptive_avg_pool1d(x, 3), (X3,)),
    "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, (3, 2)), (X4,)),
    "adaptive_avg_pool3d": (lambda x: F.adaptive_avg_pool3d(x, 2), (X5,)),
    "adaptive_max_pool1d": (lambda x: F.adaptive_max_pool1d(x, 3), (X3,)),
    "adaptive_max_pool2d": (lambda x: F.adaptive_max_pool2d(x, 2), (X4,)),
    "adaptive_max_pool3d": (lambda x: F.adaptive_max_pool3d(x, 2), (X5,)),
    "affine_grid": (lambda t: F.affine_grid(t, [2, 4, 5, 6], align_corners=False), (r(2, 2, 3),)),
    "alpha_dropout": (lambda x: F.alpha_dropout(x, 0.3, training=False), (X4,)),
    "avg_pool1d": (lambda x: F.avg_pool1d(x, 3, 2, 1), (X3,)),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), (X4,)),
    "avg_pool3d": (lambda x: F.avg_pool3d(x, 2), (X5,)),
    "batch_norm": (lambda x: F.batch_norm(x, torch.ones(4) * 0.1, torch.ones(4) * 2, torch.ones(4), torch.zeros(4)),
                   (X4,)),
    "bilinear": (lambda a, b: F.bilinear(a, b, C1), (X2, X2)),
    "binary_cross_entropy": (lambda p: F.binary_cross_entropy(p, PROBS), (PROBS.flip(0),)),
    "binary_cross_entropy_with_logits": (lambda x: F.binary_cross_entropy_with_logits(x, PROBS), (X2,)),
    "celu": (lambda x: F.celu(x, 0.7), (X4,)),
    "channel_shuffle": (lambda x: F.channel_shuffle(x, 2), (X4,)),
    "conv1d": (lambda x: F.conv1d(x, W3, padding="same"), (X3,)),
    "conv2d": (lambda x: F.conv2d(x, W4, stride=2, padding=1), (X4,)),
    "conv3d": (lambda x: F.conv3d(x, W5, padding=1), (X5,)),
    "conv_tbc": (lambda x: F.conv_tbc(x, C2, C3, 1), (r(7, 2, 4),)),
    "conv_transpose1d": (lambda x: F.conv_transpose1d(x, C4, stride=2), (X3,)),
    "conv_transpose2d": (lambda x: F.conv_transpose2d(x, C5, stride=2, padding=1, output_padding=1), (X4,)),
    "conv_transpose3d": (lambda x: F.conv_transpose3d(x, C6), (X5,)),
    "cosine_embedding_loss": (lambda a, b: F.cosine_embedding_loss(a, b, torch.tensor([1, -1, 1, -1])),
                              (X2, X2.flip(0))),
    "cosine_similarity": (lambda a, b: F.cosine_similarity(a, b), (X2, X2.flip(0))),
    "cross_entropy": (lambda x: F.cross_entropy(x, LABELS), (X2,)),
    "dropout": (lambda x: F.dropout(x, 0.5, training=False), (X4,)),
    "dropout1d": (lambda x: F.dropout1d(x, 0.5, training=False), (X3,)),
    "dropout2d": (lambda x: F.dropout2d(x, 0.5, training=False), (X4,)),
    "dropout3d": (lambda x: F.dropout3d(x, 0.5, training=False), (X5,)),
    "elu": (lambda x: F.elu(x), (X4,)),
    "embedding": (lambda i: F.embedding(i, TABLE), (IDS,)),
    "embedding_bag": None,  # listed below
    "feature_alpha_dropout": (lambda x: F.feature_alpha_dropout(x, 0.3, training=False), (X4,)),
    "fold": None,
    "gelu": (lambda x: F.gelu(x, approximate="tanh"), (X4,)),
    "glu": (lambda x: F.glu(x, 1), (X4,)),
    "grid_sample": (lambda x, gr: F.grid_sample(x, gr, align_corners=False), (X4, r(2, 5, 6, 2).tanh())),
    "group_norm": (lambda x: F.group_norm(x, 2, C7, C8), (X4,)),
    "gumbel_softmax": None,
    "hardshrink": (lambda x: F.hardshrink(x, 0.5), (X4,)),
    "hardsigmoid": (lambda x: F.hardsigmoid(x), (X4,)),
    "hardswish": (lambda x: F.hardswish(x), (X4,)),
    "hardtanh": (lambda x: F.hardtanh(x, -0.5, 0.5), (X4,)),
    "hinge_embedding_loss": (lambda x: F.hinge_embedding_loss(x, torch.ones(4, 6).sign()), (X2,)),
    "huber_loss": (lambda x: F.huber_loss(x, X2.flip(0)), (X2,)),
    "instance_norm": (lambda x: F.instance_norm(x, weight=C9, bias=C10), (X4,)),
    "interpolate": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), (X4,)),
    "kl_div": (lambda x: F.kl_div(x.log_softmax(-1), PROBS, reduction="batchmean"), (X2,)),
    "l1_loss": (lambda x: F.l1_loss(x, X2.flip(0)), (X2,)),
    "layer_norm": (lambda x: F.layer_norm(x, [8], C11, C12), (X4,)),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), (X4,)),
    "linear": (lambda x: F.linear(x, C13, C14), (X2,)),
    "local_response_norm": (lambda x: F.local_response_norm(x, 3), (X4,)),
    "log_softmax": (lambda x: F.log_softmax(x, -1), (X4,)),
    "logsigmoid": (lambda x: F.logsigmoid(x), (X4,)),
    "lp_pool1d": (lambda x: F.lp_pool1d(x.abs(), 2.0, 3), (X3,)),
    "lp_pool2d": (lambda x: F.lp_pool2d(x.abs(), 2.0, 2), (X4,)),
    "lp_pool3d": (lambda x: F.lp_pool3d(x.abs(), 2.0, 2), (X5,)),
    "margin_ranking_loss": (lambda a, b: F.margin_ranking_loss(a, b, torch.ones(6)), (X2[0], X2[1])),
    "max_pool1d": (lambda x: F.max_pool1d(x, 3, 2, 1), (X3,)),
    "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), (X4,)),
    "max_pool3d": (lambda x: F.max_pool3d(x, 2), (X5,)),
    "mish": (lambda x: F.mish(x), (X4,)),
    "mse_loss": (lambda x: F.mse_loss(x, X2.flip(0)), (X2,)),
    "multi_margin_loss": (lambda x: F.multi_margin_loss(x, LABELS), (X2,)),
    "multilabel_margin_loss": None,
    "multilabel_soft_margin_loss": (lambda x: F.multilabel_soft_margin_loss(x, PROBS.round()), (X2,)),
    "nll_loss": (lambda x: F.nll_loss(x.log_softmax(-1), LABELS), (X2,)),
    "normalize": (lambda x: F.normalize(x, dim=1), (X4,)),
    "one_hot": (lambda i: F.one_hot(i, 5), (IDS,)),
    "pad": (lambda x: F.pad(x, (1, 2, 0, 1), mode="reflect"), (X4,)),
    "pairwise_distance": (lambda a, b: F.pairwise_distance(a, b), (X2, X2.flip(0))),
    "pixel_shuffle": (lambda x: F.pixel_shuffle(x, 2), (X4,)),
    "pixel_unshuffle": (lambda x: F.pixel_unshuffle(x, 2), (X4,)),
    "poisson_nll_loss": (lambda x: F.poisson_nll_loss(x, PROBS), (X2,)),
    "prelu": (lambda x: F.prelu(x, C15), (X4,)),
    "relu": (lambda x: F.relu(x), (X4,)),
    "relu6": (lambda x: F.relu6(x * 4), (X4,)),
    "rms_norm": (lambda x: F.rms_norm(x, [8], C16), (X4,)),
    "rrelu": (lambda x: F.rrelu(x, training=False), (X4,)),
    "scaled_dot_product_attention": (lambda q: F.scaled_dot_product_attention(q, q.flip(2), q, is_causal=True), (Q,)),
    "selu": (lambda x: F.selu(x), (X4,)),
    "sigmoid": (lambda x: F.sigmoid(x), (X4,)),
    "silu": (lambda x: F.silu(x), (X4,)),
    "smooth_l1_loss": (lambda x: F.smooth_l1_loss(x, X2.flip(0)), (X2,)),
    "soft_margin_loss": (lambda x: F.soft_margin_loss(x, torch.ones(4, 6)), (X2,)),
    "softmax": (lambda x: F.softmax(x, 1), (X4,)),
    "softmin": (lambda x: F.softmin(x, 1), (X4,)),
    "softplus": (lambda x: F.softplus(x, beta=2.0), (X4,)),
    "softshrink": (lambda x: F.softshrink(x, 0.5), (X4,)),
    "softsign": (lambda x: F.softsign(x), (X4,)),
    "tanh": (lambda x: F.tanh(x), (X4,)),
    "tanhshrink": (lambda x: F.tanhshrink(x), (X4,)),
    "threshold": (lambda x: F.threshold(x, 0.1, -1.0), (X4,)),
    "triplet_margin_loss": (lambda a: F.triplet_margin_loss(a, a.flip(0), a.roll(1, 0)), (X2,)),
    "triplet_margin_with_distance_loss": (lambda a: F.triplet_margin_with_distance_loss(a, a.flip(0), a.roll(1, 0)),
                                          (X2,)),
    "unfold": (lambda x: F.unfold(x, 3, padding=1), (X4,)),
    "upsample": (lambda x: F.upsample(x, scale_factor=2), (X4,)),
    "upsample_bilinear": (lambda x: F.upsample_bilinear(x, scale_factor=2), (X4,)),
    "upsample_nearest": (lambda x: F.upsample_nearest(x, size=(5, 11)), (X4,)),
}
# in-place and indices-returning variants call the functions above
ALIASES = {"celu_": "celu", "elu_": "elu", "hardtanh_": "hardtanh", "leaky_relu_": "leaky_relu", "relu_": "relu",
           "rrelu_": "rrelu", "selu_": "selu", "threshold_": "threshold",
           "native_channel_shuffle": "channel_shuffle"}
for _name in ("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool1d", "max_pool2d",
              "max_pool3d"):
    ALIASES[f"{_name}_with_indices"] = _name

# public names that are not tensor functions
NOT_OPS = {"Callable", "DType", "Optional", "ScalingType", "SwizzleType", "Tensor", "assert_int_or_pair",
           "boolean_dispatch", "handle_torch_function", "has_torch_function", "has_torch_function_unary",
           "has_torch_function_variadic", "multi_head_attention_forward"}  # the last: nn.MultiheadAttention's body
NOT_CONVERTED = {
    "random at inference too (a deployed graph is deterministic)": [
        "gumbel_softmax", "fractional_max_pool2d", "fractional_max_pool3d", "fractional_max_pool2d_with_indices",
        "fractional_max_pool3d_with_indices"],
    "no IR op yet (Core ATen's _embedding_bag, col2im, _pdist_forward; rare in deployed models)": [
        "embedding_bag", "fold", "pdist"],
    "max_unpool scatters by the indices max_pool returned; those indices are not converted": [
        "max_unpool1d", "max_unpool2d", "max_unpool3d"],
    "CTC and multilabel-margin losses loop over targets (data-dependent)": ["ctc_loss", "multilabel_margin_loss"],
    "checks its input's values in Python (a data-dependent raise)": ["gaussian_nll_loss"],
    "low-precision GEMM kernels (scaled_mm, grouped_mm: CUDA fp8)": [
        "scaled_mm", "scaled_grouped_mm", "grouped_mm", "linear_cross_entropy"],
}


def public_functions() -> list[str]:
    return sorted(n for n in dir(F) if not n.startswith("_") and callable(getattr(F, n)))


def test_every_public_function_is_sampled_or_listed():
    listed = {n for names in NOT_CONVERTED.values() for n in names}
    unaccounted = [n for n in public_functions()
                   if n not in NOT_OPS and n not in listed and n not in ALIASES and SAMPLES.get(n) is None]
    assert unaccounted == []
    ops = len(public_functions()) - len(NOT_OPS)
    print(f"torch.nn.functional coverage: {ops - len(listed)} of {ops}")  # the README quotes it


class Call(torch.nn.Module):
    """A model calling ``fn``: torch.fx records the call (a forward of fixed arity)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Call2(Call):
    def forward(self, x, y):
        return self.fn(x, y)


SAMPLED = [n for n in public_functions() if SAMPLES.get(n) is not None]


@pytest.mark.parametrize("name", SAMPLED)
def test_functional_converts_to_canonical_ops(name):
    fn, inputs = SAMPLES[name]
    model = (Call if len(inputs) == 1 else Call2)(fn).eval()
    graph = slimgraph.import_model(model, inputs)
    assert [n.attrs["impl"].target for n in graph.nodes if n.op == OPAQUE] == []
    with torch.no_grad():
        want = model(*inputs)
        got = slimgraph.to_torch(graph)(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5), name


def test_the_torch_backends_forms_convert_directly():
    """What the PyTorch backend writes converts with a handler of its own, not by exporting the call
    and decomposing it (seconds per call, and a decomposed op no longer round-trips as one node)."""
    class Forms(torch.nn.Module):
        def forward(self, x):
            grid = torch.tanh(x[:, :2].permute(0, 2, 3, 1))
            return (F.mish(x), F.softsign(x), F.logsigmoid(x), F.selu(x), F.elu(x, 0.5), F.softplus(x),
                    F.local_response_norm(x, 3, 1e-3, 0.5, 2.0), torch.sort(x, 1, descending=True)[0], x.roll(7),
                    F.grid_sample(x, grid, "nearest", "border", True))

    graph = slimgraph.import_model(Forms(), (X4,))
    assert graph.meta["source"] == "torch.fx" and graph.meta["decomposed"] == []
    assert {"mish", "softsign", "logsigmoid", "selu", "elu", "softplus", "lrn", "sort", "grid_sample"} \
        <= {n.op for n in graph.nodes}
    with torch.no_grad():
        for got, want in zip(slimgraph.to_torch(graph)(X4), Forms()(X4)):
            torch.testing.assert_close(got, want)


def test_calls_torch_export_records_whole_convert_to_one_op_each():
    """With symbolic dims the import goes through torch.export, whose graph holds pad, roll, selu and
    logsigmoid as calls of their own: kept whole through decomposition, each is one IR op (decomposed,
    pad became index arithmetic and roll an index_select). flatten, a view, always decomposes."""
    class Calls(torch.nn.Module):
        def forward(self, x):
            return (F.pad(x, (1, 2, 0, 1), mode="reflect"), F.pad(x, (1, 1), value=0.5),
                    torch.roll(x, (1, -2), (1, 3)), torch.roll(x, 5), F.selu(x), F.logsigmoid(x),
                    F.hardshrink(x))  # which has no handler: the export is decomposed

    graph = slimgraph.import_model(Calls(), (X4,), {"x": {0: "batch"}})
    assert graph.meta["source"] == "torch.export"
    ops = [n.op for n in graph.nodes]
    assert [ops.count(op) for op in ("pad", "roll", "selu", "logsigmoid", "opaque")] == [2, 2, 1, 1, 0]
    assert "take" not in ops and "index" not in ops
    x = r(3, 4, 8, 8)
    with torch.no_grad():
        for got, want in zip(slimgraph.to_torch(graph)(x), Calls()(x)):
            torch.testing.assert_close(got, want)


def test_unbind_kept_whole_by_torch_export_splits_into_ones():
    """An export that needs no decomposition keeps unbind whole: its parts are size 1 along the axis,
    not the size of what follows it (timm's mobilevit: q, k, v = qkv.unbind(0) split 3 by [4, 4, 4])."""
    class Unbind(torch.nn.Module):
        def forward(self, qkv):
            q, k, v = qkv.unbind(0)
            return q * k + v

    qkv = r(3, 4, 5)
    graph = slimgraph.import_model(Unbind(), (qkv,), {"qkv": {1: "batch"}})
    assert graph.meta["source"] == "torch.export"
    x = r(3, 6, 5)
    torch.testing.assert_close(slimgraph.to_torch(graph)(x), Unbind()(x))
