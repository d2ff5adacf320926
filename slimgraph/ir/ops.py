"""The op registry: one OpDef per canonical op.

An OpDef bundles what every part of slimgraph needs to know about an op:
  * ``reference``: a torch implementation, used by the interpreter and for shape inference
    (run on the ``meta`` device, so inference can never disagree with execution);
  * ``coupling``: how channel dims couple inputs to outputs (see ``coupling.py``);
  * ``macs``: multiply-accumulates, for stats.
Backends keep their own emission tables keyed by op name, so ``ir`` imports no backend.
Adding an op is one ``register_op`` call plus its emission entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from slimgraph.errors import VerificationError
from slimgraph.ir.coupling import Coupling
from slimgraph.ir.dtypes import DType
from slimgraph.ir.symbolic import has_symbols, resolve

if TYPE_CHECKING:
    from slimgraph.ir.node import Node

Reference = Callable[[list[torch.Tensor | None], dict[str, Any]], Any]
TensorType = tuple[tuple[int, ...], DType]

OPAQUE = "opaque"


@dataclass
class OpDef:
    name: str
    reference: Reference
    description: str = ""
    num_inputs: tuple[int, int] = (1, 1)  # (min, max); max -1 = variadic
    coupling: Callable[[Node], list[Coupling]] | None = None
    macs: Callable[[Node], int] | None = None
    # Ops whose result depends on train/eval mode (batch_norm, dropout) say so for backends.
    stateful: bool = False
    # Optional closed-form type inference for hot ops; by default the reference runs on "meta".
    # It may return None for operands it does not cover (odd dtypes, invalid sizes): the
    # reference then runs on "meta", which also gives torch's own error for invalid operands.
    infer: Callable[[Node], list[TensorType] | None] | None = None
    # Optional: the outputs' shapes alone, for symbolic inference (infer_syms runs it on fake tensors
    # whose sizes are symbols), where the reference's kernel guards a symbolic size to its traced value
    # (torch's upsampling kernels do: their outputs would come back static).
    shape_reference: Reference | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, OpDef] = {}


def register_op(name: str, reference: Reference, **kwargs: Any) -> OpDef:
    if name in _REGISTRY:
        raise ValueError(f"op {name!r} registered twice")
    opdef = OpDef(name, reference, **kwargs)
    _REGISTRY[name] = opdef
    return opdef


def get_op(name: str) -> OpDef | None:
    _ensure_loaded()
    return _REGISTRY.get(name)


def registered_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(_REGISTRY)


def is_canonical(op: str) -> bool:
    return op != OPAQUE and get_op(op) is not None


def _ensure_loaded() -> None:
    if not _REGISTRY:
        import slimgraph.ir.opdefs  # noqa: F401  (registers every canonical op)


def run_reference(node: Node, inputs: Sequence[torch.Tensor | None], bindings: dict[str, int] | None = None
                  ) -> tuple[torch.Tensor, ...]:
    """Execute one node; always returns a tuple of output tensors. Symbolic sizes in its attributes
    take their values from ``bindings`` (their traced values, the hints, without)."""
    if node.op == OPAQUE:
        result = node.attrs["impl"](list(inputs))
    else:
        opdef = get_op(node.op)
        if opdef is None:
            raise VerificationError(f"node {node.name}: unknown op {node.op!r}")
        attrs = resolve(node.attrs, bindings) if has_symbols(node.attrs) else node.attrs
        result = opdef.reference(list(inputs), attrs)
    if isinstance(result, torch.Tensor):
        return (result,)
    return tuple(result)


def infer_types(node: Node) -> list[TensorType]:
    """Output shapes and dtypes of a canonical node: closed form where the op has one, else by
    running its reference on meta tensors (so inference never disagrees with execution)."""
    opdef = get_op(node.op)
    if opdef is not None and opdef.infer is not None and all(
        v is None or (v.shape is not None and all(isinstance(d, int) for d in v.shape)) for v in node.inputs
    ):
        try:
            types = opdef.infer(node)
        except Exception as exc:
            raise VerificationError(f"node {node.name} ({node.op}): shape inference failed: {exc}") from exc
        if types is not None:
            return types
    metas: list[torch.Tensor | None] = []
    for v in node.inputs:
        if v is None:
            metas.append(None)
        elif v.shape is None or v.dtype is None or any(not isinstance(d, int) for d in v.shape):
            raise VerificationError(f"node {node.name}: input %{v.name} has no static type")
        else:
            metas.append(torch.empty(v.shape, dtype=v.dtype.torch, device="meta"))
    with torch.no_grad():
        try:
            try:
                outs = run_reference(node, metas)
            except Exception:
                if node.op != OPAQUE:
                    raise
                # opaque code may leave torch (numpy): run it on zeros instead of meta tensors
                outs = run_reference(node, [None if m is None else torch.zeros(m.shape, dtype=m.dtype) for m in metas])
        except VerificationError:
            raise
        except Exception as exc:  # the op rejected its operands: report which node
            raise VerificationError(
                f"node {node.name} ({node.op}): shape inference failed: {exc}"
            ) from exc
    return [(tuple(o.shape), DType.from_torch(o.dtype)) for o in outs]
