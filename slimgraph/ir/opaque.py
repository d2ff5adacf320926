"""Opaque nodes: anything a frontend cannot map to a canonical op.

The node keeps a callable that reproduces the original computation, so the interpreter and
the PyTorch backend still run it; passes skip opaque nodes and freeze their channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class OpaqueImpl:
    """How to call the original computation.

    kind: "module" (``module`` is called), "method" (``inputs[0].<target>``), anything else calls
    ``fn`` (a Python function, an aten op, or a runner for an ONNX node).
    ``args``/``kwargs`` are templates: each ``Slot(i)`` is replaced by node input i.
    ``source``: the frontend that made it (e.g. "torch"), so backends know what they can emit.
    """

    target: str
    kind: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    module: torch.nn.Module | None = None
    fn: Any = None
    source: str = "torch"
    extra: dict[str, Any] = field(default_factory=dict)  # frontend data, e.g. the ONNX NodeProto

    def __call__(self, inputs: list) -> Any:
        args = fill(self.args, inputs)
        kwargs = fill(self.kwargs, inputs)
        if self.kind == "module":
            return self.module(*args, **kwargs)
        if self.kind == "method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        if self.fn is None:
            from slimgraph.errors import UnsupportedError

            raise UnsupportedError(f"opaque op {self.target} has no implementation to run")
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return self.target


@dataclass(frozen=True)
class Slot:
    index: int


def fill(template: Any, inputs: list) -> Any:
    """Replace every Slot in a nested args template by the matching input."""
    if isinstance(template, Slot):
        return inputs[template.index]
    if isinstance(template, tuple):
        return tuple(fill(t, inputs) for t in template)
    if isinstance(template, list):
        return [fill(t, inputs) for t in template]
    if isinstance(template, dict):
        return {k: fill(v, inputs) for k, v in template.items()}
    return template
