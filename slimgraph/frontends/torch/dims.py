"""Host-side sizes the torch converter tracks while it walks a traced graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimgraph.ir import Value


@dataclass(frozen=True)
class BatchDim:
    """An int that is ``factor`` times the batch size of ``source`` (its dim 0).

    A reshape target keeps it symbolic: "N" in front when the factor is 1, else -1 (e.g. the
    batch times the number of windows in shifted-window attention).
    """

    value: int
    source: Value
    factor: int = 1

    def __index__(self) -> int:
        return self.value

    def scaled(self, multiplier: int) -> BatchDim:
        return BatchDim(self.value * multiplier, self.source, self.factor * multiplier)

    def divided(self, divisor: int) -> BatchDim | int:
        if self.factor % divisor:
            return self.value // divisor  # no longer a whole multiple of the batch: concrete
        return BatchDim(self.value // divisor, self.source, self.factor // divisor)


def concrete(x: Any) -> Any:
    """Python value of an IR-side argument (BatchDim -> int), recursively."""
    if isinstance(x, BatchDim):
        return x.value
    if isinstance(x, (list, tuple)):
        return type(x)(concrete(v) for v in x)
    return x

