"""How an op's channel dimensions tie its inputs to its outputs.

Each op declares a list of Couplings: sets of tensor dimensions (a port, an operand index, an
axis) that must keep or lose the same channels together. Pruning builds its groups from these
declarations alone; it never matches op names.

Kinds:
  same    -- the dims are indexed identically (channel i of one is channel i of the others).
  concat  -- the output dim is the inputs' dims laid end to end (``params`` = input offsets).
  split   -- the input dim is the outputs' dims laid end to end (``params`` = output offsets).
  group   -- grouped conv: channels move in ``params[0]`` equal groups.
  reshape -- the dim is merged with or split from others (``params`` = (in shape, out shape)).
  select  -- one index (``params[0]``) of the dim is taken and the dim removed.
  frozen  -- the dims cannot lose channels safely (reductions over them, opaque ops).
  unused  -- only the operand's shape is read along these dims, never its values: no link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Port = Literal["in", "out"]


@dataclass(frozen=True)
class DimRef:
    port: Port
    index: int
    axis: int

    def __str__(self) -> str:
        return f"{self.port}{self.index}[{self.axis}]"


@dataclass(frozen=True)
class Coupling:
    kind: str
    dims: tuple[DimRef, ...]
    params: tuple = ()


def inp(index: int, axis: int) -> DimRef:
    return DimRef("in", index, axis)


def out(index: int, axis: int) -> DimRef:
    return DimRef("out", index, axis)


def same(*dims: DimRef) -> Coupling:
    return Coupling("same", tuple(dims))


def frozen(*dims: DimRef) -> Coupling:
    return Coupling("frozen", tuple(dims))


def unused(*dims: DimRef) -> Coupling:
    return Coupling("unused", tuple(dims))
