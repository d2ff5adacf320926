"""fuse{target=onnxruntime}: attention into onnxruntime's MultiHeadAttention, exact in the
interpreter, the PyTorch backend and onnxruntime, at other batch and sequence sizes."""

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import SlimgraphError
from slimgraph.ir import run
from tests.frontends.test_transformers import FAMILIES, eager, rel_error


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_attention_blocks_fuse_and_stay_exact(family):
    build, make_inputs, names = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    inputs = make_inputs(2, 12)
    key = next(iter(inputs))
    dims = {key: {0: "batch"}} if family == "vit" else {k: {0: "batch", 1: "seq"} for k in inputs}
    result = slimgraph.optimize(model, "dce,fuse", example_inputs=inputs, dynamic_dims=dims)
    record = list(result.trace)[-1]
    assert record.pass_stats["attention_fused"] == 2  # both layers; the numerical check passed too
    nodes = [n.op for n in result.graph.nodes]
    assert nodes.count("multi_head_attention") == 2 and "softmax" not in nodes
    proto = result.to_onnx()
    assert [n.op_type for n in proto.graph.node].count("MultiHeadAttention") == 2
    module = result.to_torch()
    for feed in (make_inputs(3, 9, seed=1), make_inputs(1, 16, seed=2)):
        if family == "vit":
            feed = make_inputs(3, 32, seed=1)
        want = eager(model, feed, names)
        values = list(feed.values())
        for got in (run(result.graph, values), module(*values), run_onnxruntime(proto, values)):
            got = got if isinstance(got, (tuple, list)) else (got,)
            assert all(rel_error(a, w) < 1e-4 for a, w in zip(got, want))


def test_nn_multihead_attention_becomes_the_kernel_too():
    layer = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = layer

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 5, 16)
    result = slimgraph.optimize(SelfAttention().eval(), "fuse", example_inputs=(x,))
    assert list(result.trace)[-1].pass_stats["attention_fused"] == 1
    with torch.no_grad():
        want = layer(x, x, x, need_weights=False)[0]
    assert rel_error(run_onnxruntime(result.to_onnx(), [x])[0], want) < 1e-5


def test_a_softmax_that_is_not_attention_is_left_alone_and_said_why():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(-1))
    result = slimgraph.optimize(net, "fuse", example_inputs=(torch.randn(2, 8),))
    record = list(result.trace)[-1]
    assert not record.changed and record.pass_stats["attention_fused"] == 0
    assert "last dim of [batch, heads, seq, seq]" in next(iter(record.pass_stats["not_attention"].values()))


def test_unknown_target_is_refused():
    with pytest.raises(SlimgraphError, match="target 'tensorrt'"):
        slimgraph.optimize(torch.nn.Linear(2, 2), "fuse{target=tensorrt}", example_inputs=(torch.randn(1, 2),))
