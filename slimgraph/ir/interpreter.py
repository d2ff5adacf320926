"""Run a Graph on torch tensors with each op's reference implementation."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import overload

import torch

from slimgraph.errors import SlimgraphError
from slimgraph.ir.graph import Graph
from slimgraph.ir.ops import run_reference
from slimgraph.ir.symbolic import graph_bindings
from slimgraph.ir.value import Value


@overload
def run(graph: Graph, inputs: Sequence[torch.Tensor], capture: None = None) -> list[torch.Tensor]: ...
@overload
def run(
    graph: Graph, inputs: Sequence[torch.Tensor], capture: Collection[Value]
) -> tuple[list[torch.Tensor], dict[Value, torch.Tensor]]: ...
def run(graph, inputs, capture=None):
    """Evaluate the graph (inference semantics) and return its outputs.

    With ``capture`` (values of this graph) it returns ``(outputs, {value: tensor})`` as well,
    e.g. for passes that need a layer's inputs on calibration data.
    """
    if len(inputs) != len(graph.inputs):
        raise SlimgraphError(f"graph {graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env: dict[int, torch.Tensor] = {}
    for value, tensor in zip(graph.inputs, inputs):
        env[id(value)] = tensor
    for value in graph.constants.values():
        env[id(value)] = value.const_value
    symbolic = any(v.sym for v in graph.inputs)
    try:
        bindings = graph_bindings(graph.inputs, [tuple(t.shape) for t in inputs]) if symbolic else None
    except ValueError as exc:
        raise SlimgraphError(f"graph {graph.name}: {exc}") from None
    remaining = {id(v): len(v.uses) for v in graph.values()}
    keep = {id(v) for v in graph.outputs} | {id(v) for v in capture or ()}
    with torch.no_grad():
        for node in graph.nodes:
            args = [None if v is None else env[id(v)] for v in node.inputs]
            try:
                results = run_reference(node, args, bindings)
            except SlimgraphError:
                raise
            except Exception as exc:
                raise SlimgraphError(f"node {node.name} ({node.op}) failed to run: {exc}") from exc
            for value, result in zip(node.outputs, results):
                env[id(value)] = result
            # free intermediates as soon as their last consumer ran
            for v in node.inputs:
                if v is not None and v.producer is not None:
                    remaining[id(v)] -= 1
                    if remaining[id(v)] == 0 and id(v) not in keep:
                        env.pop(id(v), None)
    outputs = [env[id(v)] for v in graph.outputs]
    if capture is None:
        return outputs
    missing = [v.name for v in capture if id(v) not in env]
    if missing:
        raise SlimgraphError(f"cannot capture {', '.join('%' + n for n in missing)}: not values of {graph.name}")
    return outputs, {v: env[id(v)] for v in capture}
