"""Real data: network slimming, a 50% global bn_gamma prune and a short fine-tune on digits."""

import pytest
import torch

import slimgraph
from slimgraph.ir import graph_stats
from tests.realdata.digits import DigitsResNet, digits_data, slimming_prune

pytest.importorskip("sklearn")

# Accuracy points lost from the fp32 model: the largest bench/digits_spread.py measured over 5 seeds x
# 2 CPU float paths (bench/results/digits_spread.md; at most 1.39), plus two test images (0.56
# points). A pruner that keeps the wrong channels loses several points more.
PRUNE_DROP = 2.0


def test_slimming_prune_finetune_keeps_accuracy(one_thread):
    run = slimming_prune(seed=0)
    assert run.base > 90
    xte = run.data[2]
    pruned = slimgraph.to_torch(run.result.graph)
    kept = graph_stats(run.result.graph)["params"] / graph_stats(slimgraph.import_model(run.model, xte[:1]))["params"]
    print(f"digits: fp32 {run.base:.2f}% -> pruned 50% + fine-tune {run.after:.2f}% (params kept {kept:.2f})")
    assert kept < 0.6
    assert run.after >= run.base - PRUNE_DROP
    # the ONNX backend computes the same pruned model
    from slimgraph.backends.onnx import run_onnxruntime

    (logits,) = run_onnxruntime(run.result.to_onnx(), [xte[:1]])
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
