"""Prune -> fine-tune -> prune again, and network slimming's sparsity penalty.

    result = slimgraph.iterative_prune(model, x, train_fn, ratio=0.5, steps=3, schedule="gradual")

``train_fn(module)`` is the user's own loop: it fine-tunes the nn.Module made from the current
graph (in place); its weights then come back into the graph before the next pruning step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from slimgraph.api import OptimizeResult, import_model
from slimgraph.errors import SlimgraphError
from slimgraph.passes import NumericalCheck, PassContext, PassManager, Trace, TraceInstrument, make_pass


def bn_l1_penalty(module: torch.nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """Network slimming (Liu et al. 2017): strength * sum |gamma| over every BatchNorm.

    Add it to the loss in a plain training loop; it drives unneeded channels' scales to zero so
    ``prune{criterion=bn_gamma}`` can remove them.
    """
    gammas = [m.weight for m in module.modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not gammas:
        raise SlimgraphError("the module has no BatchNorm with a learnable scale to penalize")
    return strength * torch.stack([g.abs().sum() for g in gammas]).sum()


def sparsity_schedule(ratio: float, steps: int, schedule: str) -> list[float]:
    """Cumulative share of channels removed after each step.

    ``gradual`` is Zhu & Gupta (2017): s_t = ratio * (1 - (1 - t/steps)^3), large steps first
    while the network has redundancy, small ones at the end; ``linear`` spreads them evenly.
    """
    if schedule == "gradual":
        return [ratio * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]
    if schedule == "linear":
        return [ratio * t / steps for t in range(1, steps + 1)]
    raise SlimgraphError(f"schedule {schedule!r}: expected gradual or linear")


def iterative_prune(
    model: Any,
    example_inputs: Any,
    train_fn: Callable[[torch.nn.Module], Any] | None,
    *,
    ratio: float = 0.5,
    steps: int = 3,
    schedule: Literal["gradual", "linear"] = "gradual",
    verify: bool = True,
    **prune_options: Any,
) -> OptimizeResult:
    """Prune to ``ratio`` in ``steps`` (each followed by ``train_fn``), returning the final graph
    and one trace across all steps. ``prune_options`` go to the prune pass (criterion, scope, ...).
    """
    from slimgraph.backends.pytorch import load_weights, to_torch

    if steps < 1:
        raise SlimgraphError(f"steps must be at least 1, got {steps}")
    if not 0 <= ratio < 1:
        raise SlimgraphError(f"ratio {ratio} is outside [0, 1)")
    graph = import_model(model, example_inputs)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    trace = Trace()
    done = 0.0
    for target in sparsity_schedule(ratio, steps, schedule):
        step_ratio = 1 - (1 - target) / (1 - done)  # of the channels still there
        done = target
        prune = make_pass("prune", {"ratio": step_ratio, **prune_options})
        instruments = [TraceInstrument()] + ([NumericalCheck(inputs)] if verify else [])
        PassManager([prune], instruments, verify=verify).run(graph, PassContext(example_inputs=inputs), trace)
        if train_fn is not None:
            module = to_torch(graph).train()
            train_fn(module)
            load_weights(graph, module)
    return OptimizeResult(graph, trace, inputs)
