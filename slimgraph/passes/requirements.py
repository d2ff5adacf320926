"""What a pass may require of its input graph, checked by the PassManager before it runs."""

from __future__ import annotations

from collections.abc import Callable

from slimgraph.errors import PassError
from slimgraph.ir import Graph

# name -> check(graph) returning None when satisfied, else the reason it is not
REQUIREMENTS: dict[str, Callable[[Graph], str | None]] = {
    "static-shapes": lambda g: next(
        (f"%{v.name} has shape {v.type_str()}" for v in g.values()
         if v.shape is None or not all(isinstance(d, int) for d in v.shape)), None),
    "no-batch-norm": lambda g: next(
        (f"node {n.name} is a batch_norm (run fold-bn first)" for n in g.nodes if n.op == "batch_norm"), None),
}


def check_requirements(pass_, graph: Graph) -> None:
    for name in pass_.requires:
        check = REQUIREMENTS.get(name)
        if check is None:
            raise PassError(f"pass {pass_.name} requires unknown property {name!r}")
        reason = check(graph)
        if reason is not None:
            raise PassError(f"pass {pass_.name} requires {name}: {reason}")
