"""Size arithmetic of an ONNX graph with symbolic dims, done at import.

Exported transformers compute their reshape targets at run time: Shape -> Gather -> Concat ->
Reshape. Where an input's dims are symbols (``batch``, ``seq``), those chains are evaluated here
on numpy object arrays whose entries are ints and SymDims, so the targets reach the IR as
expressions (``[batch, seq, 12, 32]``) and no Shape node survives the import.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from slimgraph.ir.symbolic import SymDim

_INTEGER_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT64,
                  TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8}
OPS = {"Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Reshape", "Cast", "Identity", "Add", "Sub", "Mul",
       "Div", "Equal", "Where", "Max", "Min", "Neg"}


def _sizes_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == object


def applies(op: str, inputs: list, attrs: dict | None = None) -> bool:
    """Whether a node computes sizes: a size-arithmetic op whose data operand(s) hold SymDims (a
    Slice of a constant table up to ``seq`` is a tensor op instead: its data is a plain array). A
    Cast keeps sizes only to an integer type (to bool or float it is a tensor op on them)."""
    if op not in OPS or any(x is not None and not isinstance(x, np.ndarray) for x in inputs):
        return False
    if op == "Cast" and int((attrs or {}).get("to", TensorProto.INT64)) not in _INTEGER_TYPES:
        return False
    if op in ("Add", "Sub", "Mul", "Div", "Equal", "Max", "Min", "Concat"):
        return any(_sizes_array(x) for x in inputs)
    if op == "Where":
        return any(_sizes_array(x) for x in inputs[1:])
    return _sizes_array(inputs[0])


def normalized(x: Any) -> np.ndarray:
    """An evaluated result as an array: an object array where it holds a symbol, else plain int64
    (a Gather of one static dim gives a bare int, which later nodes fold as a constant)."""
    array = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
    if array.dtype == object and not any(isinstance(v, SymDim) for v in array.reshape(-1)):
        return array.astype(bool if all(isinstance(v, (bool, np.bool_)) for v in array.reshape(-1)) and array.size
                            else np.int64)
    return array


def sizes(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = [v if isinstance(v, SymDim) else int(v) for v in values]
    return array


def _ints(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1)]


def _max(a: Any, b: Any) -> Any:
    """max of two sizes: a symbol is at least 1, so max(seq, 1) is seq; anything else must be known."""
    if isinstance(a, SymDim) and isinstance(b, SymDim):
        if a == b:
            return a
        raise ValueError(f"max({a}, {b}) of two symbolic sizes")
    if isinstance(a, SymDim) or isinstance(b, SymDim):
        sym, other = (a, b) if isinstance(a, SymDim) else (b, a)
        if int(other) <= 1:
            return sym
        raise ValueError(f"max({sym}, {other}) depends on the size")
    return max(a, b)


def _min(a: Any, b: Any) -> Any:
    if isinstance(a, SymDim) or isinstance(b, SymDim):
        if isinstance(a, SymDim) and isinstance(b, SymDim) and a == b:
            return a
        other = b if isinstance(a, SymDim) else a
        if not isinstance(other, SymDim) and int(other) >= 2 ** 62:  # "to the end" sentinels
            return a if isinstance(a, SymDim) else b
        raise ValueError(f"min({a}, {b}) depends on the size")
    return min(a, b)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, SymDim) or isinstance(b, SymDim):
        if isinstance(a, SymDim) and isinstance(b, SymDim):
            return a == b
        other = b if isinstance(a, SymDim) else a
        if int(other) < 1:  # a size is never 0 or negative (-1, 0: reshape's wildcards)
            return False
        raise ValueError(f"whether {a} == {b} depends on the size")
    return a == b


def evaluate(node: Any, inputs: list) -> list[np.ndarray]:
    """Outputs of one shape-arithmetic node on object arrays (ValueError where it cannot be known)."""
    op, attrs = node.op, node.attrs
    x = inputs[0]
    if op in ("Cast", "Identity"):
        return [x]
    if op == "Gather":
        return [np.take(x, np.asarray(inputs[1]).astype(np.int64), axis=int(attrs.get("axis", 0)))]
    if op == "Concat":
        return [np.concatenate([np.asarray(i, dtype=object) for i in inputs if i is not None],
                               axis=int(attrs.get("axis", 0)))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else _ints(attrs.get("axes", []))
        if op == "Squeeze":
            return [np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)]
        rank = x.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = np.expand_dims(x, axis)
        return [x]
    if op == "Slice":
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for a, s, e, st in zip(axes, starts, ends, steps):
            index[a] = slice(s, e, st)
        return [x[tuple(index)]]
    if op == "Reshape":
        return [x.reshape(_ints(inputs[1]))]
    a, b = (np.asarray(i, dtype=object) for i in inputs[:2]) if len(inputs) > 1 else (x, None)
    if op == "Neg":
        return [-x]
    if op in ("Add", "Sub", "Mul", "Div"):
        fn = {"Add": lambda p, q: p + q, "Sub": lambda p, q: p - q, "Mul": lambda p, q: p * q,
              "Div": lambda p, q: p // q}[op]
        return [np.frompyfunc(fn, 2, 1)(a, b)]
    if op in ("Max", "Min"):
        return [np.frompyfunc(_max if op == "Max" else _min, 2, 1)(a, b)]
    if op == "Equal":
        return [np.frompyfunc(_equal, 2, 1)(a, b).astype(bool)]
    if op == "Where":
        return [np.where(np.asarray(inputs[0]).astype(bool), inputs[1], inputs[2])]
    raise ValueError(f"{op} is not size arithmetic")
