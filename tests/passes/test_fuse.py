"""fuse{target=onnxruntime}: attention into onnxruntime's MultiHeadAttention, exact in the
interpreter, the PyTorch backend and onnxruntime, at other batch and sequence sizes."""

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import SlimgraphError
from slimgraph.ir import run
from tests.frontends.test_transformers import FAMILIES, eager, rel_error

# family -> (attention blocks fused, layer norms fused with their residual add)
EXPECTED = {"bert": (2, 4), "gpt2": (2, 4), "t5": (2, 0), "vit": (2, 4)}


@pytest.mark.parametrize("pipeline", ["dce,fuse", "onnxruntime-fp32,fuse"])  # the preset floors masked softmaxes
@pytest.mark.parametrize("family", list(EXPECTED))
def test_fusions_are_exact_in_every_runtime_at_other_sizes(family, pipeline):
    build, make_inputs, names = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    inputs = make_inputs(2, 12)
    dims = {"pixel_values": {0: "batch"}} if family == "vit" else {k: {0: "batch", 1: "seq"} for k in inputs}
    result = slimgraph.optimize(model, pipeline, example_inputs=inputs, dynamic_dims=dims)
    stats = list(result.trace)[-1].pass_stats  # the numerical check after the pass passed too
    assert (stats["attention_fused"], stats["skip_layer_norm_fused"]) == EXPECTED[family]
    ops = [n.op for n in result.graph.nodes]
    assert ops.count("multi_head_attention") == 2 and not {"softmax", "amax", "maximum"} & set(ops)
    proto = result.to_onnx()
    kernels = [n.op_type for n in proto.graph.node if n.domain == "com.microsoft"]
    assert kernels.count("MultiHeadAttention") == 2
    assert kernels.count("SkipLayerNormalization") == EXPECTED[family][1]
    module = result.to_torch()
    feeds = [make_inputs(3, 32, seed=1)] if family == "vit" else [make_inputs(3, 9, seed=1), make_inputs(1, 16, seed=2)]
    for feed in feeds:
        want = eager(model, feed, names)
        values = list(feed.values())
        for got in (run(result.graph, values), module(*values), run_onnxruntime(proto, values)):
            got = got if isinstance(got, (tuple, list)) else (got,)
            assert all(rel_error(a, w) < 1e-4 for a, w in zip(got, want))


def test_one_fusion_at_a_time():
    build, make_inputs, _ = FAMILIES["bert"]
    torch.manual_seed(0)
    inputs = make_inputs(2, 12)
    graph = slimgraph.import_model(build().eval(), inputs)
    feed = tuple(inputs.values())
    only_norms = list(slimgraph.optimize(graph, "fuse{ops=[skip_layer_norm]}", example_inputs=feed).trace)[-1]
    assert (only_norms.pass_stats["attention_fused"], only_norms.pass_stats["skip_layer_norm_fused"]) == (0, 4)
    with pytest.raises(SlimgraphError, match="not among attention, skip_layer_norm"):
        slimgraph.optimize(graph, "fuse{ops=[gelu]}", example_inputs=feed)


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
