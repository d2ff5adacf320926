"""Value: one tensor in the graph, with its producer and every use (like onnx-ir's Value)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from slimgraph.ir.dtypes import DType

if TYPE_CHECKING:
    from slimgraph.ir.node import Node

Dim = int | str  # a str is a symbolic size, e.g. "N" for the batch
Shape = tuple[Dim, ...]


class Use(NamedTuple):
    node: Node
    index: int  # which input of `node`


class Value:
    """A tensor: a graph input, a constant (``const_value`` set) or a node output.

    ``uses`` is maintained by Graph and Node mutation methods; never edit it by hand.
    """

    __slots__ = ("name", "shape", "dtype", "producer", "output_index", "uses", "const_value", "meta", "sym")

    def __init__(
        self,
        name: str,
        shape: Shape | None,
        dtype: DType | None,
        const_value: torch.Tensor | None = None,
    ) -> None:
        self.name = name
        self.shape: Shape | None = tuple(shape) if shape is not None else None
        self.dtype = dtype
        self.producer: Node | None = None
        self.output_index = 0
        self.uses: list[Use] = []
        self.const_value = const_value
        self.meta: dict = {}
        # per dim, its expression over the graph's symbols (None where static); see ir/symbolic.py.
        # ``shape`` keeps the sizes of the traced example (the hints) either way.
        self.sym: tuple | None = None

    @property
    def is_constant(self) -> bool:
        return self.const_value is not None

    @property
    def rank(self) -> int:
        assert self.shape is not None
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape or ():
            n *= d if isinstance(d, int) else 1
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * (self.dtype.itemsize if self.dtype else 4)

    def type_str(self) -> str:
        dt = self.dtype.short if self.dtype else "?"
        if self.shape is None:
            return f"{dt}[?]"
        if self.sym:
            from slimgraph.ir.symbolic import python_expr

            dims = [python_expr(e).replace(" ", "") if e is not None else str(d) for e, d in zip(self.sym, self.shape)]
            return f"{dt}[{','.join(dims)}]"
        return f"{dt}[{','.join(str(d) for d in self.shape)}]"

    def dim(self, axis: int):
        """Dim ``axis`` as a SymDim where it is symbolic, else its int size."""
        if self.sym and self.sym[axis] is not None:
            from slimgraph.ir.symbolic import SymDim

            return SymDim(self.sym[axis], self.shape[axis])
        return self.shape[axis]

    def users(self) -> list[Node]:
        """Distinct consumer nodes, in order of first use."""
        seen: dict[int, Node] = {}
        for use in self.uses:
            seen.setdefault(id(use.node), use.node)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type_str()}"
