"""Real data: network slimming, a 50% global bn_gamma prune and a short fine-tune on digits."""

import pytest
import torch

import slimgraph
from slimgraph.ir import graph_stats
from tests.realdata.digits import DigitsResNet, accuracy, digits_data, train

pytest.importorskip("sklearn")


def test_slimming_prune_finetune_keeps_accuracy(one_thread):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_data()
    model = train(DigitsResNet(width=24), xtr, ytr, epochs=10, slimming=1e-3)
    base = accuracy(model, xte, yte)
    assert base > 90

    def finetune(module):
        train(module, xtr, ytr, epochs=6, lr=0.02, seed=1)

    result = slimgraph.iterative_prune(model, xtr[:1], finetune, ratio=0.5, steps=1, criterion="bn_gamma",
                                       scope="global")
    pruned = slimgraph.to_torch(result.graph)
    after = accuracy(pruned, xte, yte)
    kept = graph_stats(result.graph)["params"] / graph_stats(slimgraph.import_model(model, xtr[:1]))["params"]
    print(f"digits: fp32 {base:.2f}% -> pruned 50% + fine-tune {after:.2f}% (params kept {kept:.2f})")
    assert kept < 0.6
    assert after >= base - 1.0
    # the ONNX backend computes the same pruned model
    from slimgraph.backends.onnx import run_onnxruntime

    (logits,) = run_onnxruntime(result.to_onnx(), [xte[:1]])
    assert torch.allclose(logits, pruned(xte[:1]).detach(), atol=1e-4)


def test_gradual_schedule_and_weights_round_trip(one_thread):
    from slimgraph.iterative import sparsity_schedule

    s = sparsity_schedule(0.5, 3, "gradual")
    assert s[-1] == pytest.approx(0.5) and s[0] > s[1] - s[0] > s[2] - s[1] > 0  # big steps first
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits_data()
    calls = []
    result = slimgraph.iterative_prune(DigitsResNet().eval(), xtr[:1], calls.append, ratio=0.5, steps=3)
    assert len(calls) == 3 and len(result.trace) == 3 and result.trace[0].changed
    ratios = [float(r.pipeline_item.split("ratio=")[1].split(",")[0].rstrip("}")) for r in result.trace]
    assert ratios[0] > ratios[1] > ratios[2]  # of the channels left at each step
    # weights trained in the module come back into the graph
    module = slimgraph.to_torch(result.graph)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5)
    slimgraph.load_weights(result.graph, module)
    assert torch.allclose(slimgraph.to_torch(result.graph)(xtr[:2]), module(xtr[:2]))
