"""A small pattern matcher for local rewrites (in the spirit of tinygrad's and xDSL's).

    P("reshape", P("reshape", x=Any_("x")))      # a reshape of a reshape; binds the inner input

``match(pattern, value)`` returns the bindings or None; ``explain`` says why a value did not
match, which is what you want when a rewrite silently does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimgraph.ir import Node, Value


@dataclass
class Any_:
    """Matches any value (optionally binding it by name)."""

    bind: str | None = None


@dataclass
class P:
    """Matches a value produced by ``op`` whose inputs match ``inputs`` (None = don't care).

    ``where(node)`` adds a check; ``single_use`` requires the value to have one consumer so the
    rewrite may delete its producer.
    """

    op: str
    inputs: tuple = ()
    bind: str | None = None
    where: Callable[[Node], bool] | None = None
    single_use: bool = False
    _kw: dict[str, Any] = field(default_factory=dict)

    def __init__(self, op: str, *inputs: Any, bind: str | None = None,
                 where: Callable[[Node], bool] | None = None, single_use: bool = False) -> None:
        self.op, self.inputs, self.bind, self.where, self.single_use = op, inputs, bind, where, single_use


def explain(pattern: P | Any_, value: Value | None, bindings: dict[str, Any] | None = None) -> str | None:
    """None if ``value`` matches (filling ``bindings``), else the reason it does not."""
    bindings = bindings if bindings is not None else {}
    if isinstance(pattern, Any_):
        if pattern.bind:
            bindings[pattern.bind] = value
        return None
    if value is None or value.producer is None:
        return f"{'nothing' if value is None else '%' + value.name} is not produced by {pattern.op}"
    node = value.producer
    if node.op != pattern.op:
        return f"%{value.name} comes from {node.op}, not {pattern.op}"
    if pattern.single_use and len(value.uses) != 1:
        return f"%{value.name} has {len(value.uses)} uses"
    if pattern.where is not None and not pattern.where(node):
        return f"node {node.name} fails the pattern's condition"
    for i, sub in enumerate(pattern.inputs):
        if sub is None:
            continue
        if i >= len(node.inputs):
            return f"node {node.name} has no input {i}"
        why = explain(sub, node.inputs[i], bindings)
        if why:
            return why
    if pattern.bind:
        bindings[pattern.bind] = node
    return None


def match(pattern: P | Any_, value: Value | None) -> dict[str, Any] | None:
    bindings: dict[str, Any] = {}
    return bindings if explain(pattern, value, bindings) is None else None
