"""Properties every pass must keep on graphs nobody wrote by hand (tests/fuzz/nets.py): exact
passes keep the outputs in the interpreter, the PyTorch backend and onnxruntime; pruning removes
exactly what zeroing the same channels removes. A failure names its seed: RandomNet(seed)."""

from __future__ import annotations

import os

import pytest
import torch

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import run
from slimgraph.passes.prune import apply_plan, plan_pruning, zero_plan
from tests.conftest import rel_error
from tests.fuzz.nets import RandomNet

# the test suite's budget; a longer campaign: SLIMGRAPH_FUZZ_SEEDS=10000 pytest tests/fuzz
SEEDS = range(int(os.environ.get("SLIMGRAPH_FUZZ_SEEDS", "60")))


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_passes_keep_outputs_in_every_backend(seed):
    model = RandomNet(seed).eval()
    x = model.example()
    result = slimgraph.optimize(model, "dce,fold-bn,remove-identity,canonicalize", example_inputs=x)
    other = model.example(batch=2, seed=1)
    with torch.no_grad():
        want = model(other)
    assert rel_error(run(result.graph, [other])[0], want) < 1e-4, f"RandomNet({seed}): interpreter"
    assert rel_error(result.to_torch()(other), want) < 1e-4, f"RandomNet({seed}): PyTorch backend"
    assert rel_error(run_onnxruntime(result.to_onnx(), [other])[0], want) < 1e-4, f"RandomNet({seed}): onnxruntime"


@pytest.mark.parametrize("seed", SEEDS)
def test_pruning_removes_exactly_what_zeroing_removes(seed):
    model = RandomNet(seed).eval()
    x = model.example()
    graph = slimgraph.import_model(model, (x,))
    plan = plan_pruning(graph, 0.5)
    zeroed, pruned = graph.clone(), graph.clone()
    zero_plan(zeroed, plan)
    apply_plan(pruned, plan)
    pruned.verify()
    assert rel_error(run(pruned, [x])[0], run(zeroed, [x])[0]) < 1e-4, f"RandomNet({seed})"
