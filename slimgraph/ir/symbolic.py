"""Symbolic sizes: dims that change from call to call (a text model's batch and sequence).

A graph with symbolic dims keeps two views of every shape. ``Value.shape`` holds the sizes of the
example the graph was traced with (its *hints*): every analysis, pass and closed-form inference
works on them as before. ``Value.sym`` holds, per dim, the expression over the graph's symbols
(``batch``, ``seq``, ``seq*12``) or None where the dim is static. Node attributes that are sizes
(a reshape target, an arange's end) hold ``SymDim`` values where they depend on a symbol.

Each symbol is bound to one dim of one graph input (``graph.meta["symbols"]``): the interpreter
reads the sizes of the inputs it is given, and the backends write code that does the same.
Output expressions are inferred by running the op's reference on fake tensors with symbolic
sizes (torch's FakeTensorMode and ShapeEnv), so they never disagree with execution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy

Expr = sympy.Expr


class SymDim:
    """A size that depends on the graph's symbols: an expression, and its value at the hints."""

    __slots__ = ("expr", "hint")

    def __init__(self, expr: Any, hint: int) -> None:
        self.expr = sympy.sympify(expr)
        self.hint = int(hint)

    @staticmethod
    def of(x: Any, hint: int | None = None) -> SymDim | int:
        """A SymDim, or a plain int when the expression has no symbol left."""
        if isinstance(x, SymDim):
            return x
        expr = sympy.sympify(x)
        if expr.is_Integer:
            return int(expr)
        return SymDim(expr, hint if hint is not None else 0)

    def _binary(self, other: Any, op, hint_op) -> SymDim | int:
        if isinstance(other, SymDim):
            return SymDim.of(op(self.expr, other.expr), hint_op(self.hint, other.hint))
        if isinstance(other, int) and not isinstance(other, bool):
            return SymDim.of(op(self.expr, other), hint_op(self.hint, other))
        return NotImplemented

    def __add__(self, other): return self._binary(other, lambda a, b: a + b, lambda a, b: a + b)
    def __radd__(self, other): return self._binary(other, lambda a, b: b + a, lambda a, b: b + a)
    def __sub__(self, other): return self._binary(other, lambda a, b: a - b, lambda a, b: a - b)
    def __rsub__(self, other): return self._binary(other, lambda a, b: b - a, lambda a, b: b - a)
    def __mul__(self, other): return self._binary(other, lambda a, b: a * b, lambda a, b: a * b)
    def __rmul__(self, other): return self._binary(other, lambda a, b: b * a, lambda a, b: b * a)
    def __floordiv__(self, other): return self._binary(other, lambda a, b: sympy.floor(a / b), lambda a, b: a // b)
    def __rfloordiv__(self, other): return self._binary(other, lambda a, b: sympy.floor(b / a), lambda a, b: b // a)
    def __neg__(self): return SymDim.of(-self.expr, -self.hint)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, SymDim) and sympy.simplify(self.expr - other.expr) == 0

    def __hash__(self) -> int:
        return hash(self.expr)

    def __str__(self) -> str:
        return python_expr(self.expr)

    def __repr__(self) -> str:
        return f"SymDim({python_expr(self.expr)}, hint={self.hint})"

    @property
    def symbols(self) -> set[str]:
        return {s.name for s in self.expr.free_symbols}


def python_expr(expr: Expr) -> str:
    """An expression as Python source over int variables named after the symbols (floor division
    written as //), e.g. ``seq*12``, ``batch*seq``, ``(seq - 1)//2``."""
    if isinstance(expr, sympy.floor):
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        return f"({python_expr(num)})//({python_expr(den)})"
    if expr.is_Symbol or expr.is_Integer:
        return str(expr)
    if expr.is_Add:
        return " + ".join(python_expr(a) for a in expr.args).replace("+ -", "- ")
    if expr.is_Mul:
        return "*".join(f"({python_expr(a)})" if a.is_Add else python_expr(a) for a in expr.args)
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
        return "*".join([python_expr(expr.base)] * int(expr.exp))
    raise ValueError(f"size expression {expr} is not integer arithmetic")


def evaluate(expr: Any, bindings: Mapping[str, int]) -> int:
    if isinstance(expr, SymDim):
        expr = expr.expr
    value = sympy.sympify(expr).subs({sympy.Symbol(k): v for k, v in bindings.items()})
    if not value.is_Integer:
        missing = sorted(s.name for s in value.free_symbols)
        raise ValueError(f"size {expr} needs a value for {', '.join(missing)}")
    return int(value)


def has_symbols(obj: Any) -> bool:
    return bool(_sym_dims(obj))


def resolve(obj: Any, bindings: Mapping[str, int] | None) -> Any:
    """``obj`` (attributes) with every SymDim replaced by its value under ``bindings``, or by its
    hint when ``bindings`` is None."""
    return _map_dims(obj, lambda d: d.hint if bindings is None else evaluate(d.expr, bindings))


def graph_bindings(inputs: list, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """Symbol values read off the inputs' sizes (each input dim that is a bare symbol binds it);
    the same symbol read twice must agree."""
    bindings: dict[str, int] = {}
    for value, shape in zip(inputs, shapes):
        for axis, expr in enumerate(value.sym or ()):
            if expr is not None and expr.is_Symbol and axis < len(shape):
                size = int(shape[axis])
                if bindings.setdefault(expr.name, size) != size:
                    raise ValueError(f"symbol {expr.name} is {bindings[expr.name]} in one input and {size} in "
                                     f"%{value.name} (dim {axis})")
    return bindings


# ---------------------------------------------------------------------------- inference
_CACHE: dict[Any, list[tuple | None]] = {}


def _as_expr(expr: Any) -> Expr:
    """torch's own sympy functions (FloorDiv, ...) as plain sympy."""
    from torch.utils._sympy.functions import FloorDiv

    return expr.replace(FloorDiv, lambda a, b: sympy.floor(a / b))


def infer_syms(node, reference) -> list[tuple | None] | None:
    """Per output, the symbolic expression of each dim (None where static), from running
    ``reference(inputs, attrs)`` on fake tensors whose sizes are the graph's symbols. None when
    the op cannot run on fake tensors."""
    import torch
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    try:
        key = (node.op, _key(node.attrs),
               tuple(None if v is None else (v.sym or v.shape, v.shape if v.sym else None, v.dtype)
                     for v in node.inputs))
        hit = _CACHE.get(key)
    except TypeError:  # attributes that cannot be keyed (an opaque node's implementation)
        key, hit = None, None
    if hit is not None:
        return hit
    hints: dict[str, int] = {}  # each symbol at its traced size: guards (slices of bounded tables) hold there
    for v in node.inputs:
        for e, h in zip((v.sym or ()) if v is not None else (), v.shape if v is not None else ()):
            if e is not None and e.is_Symbol:
                hints.setdefault(e.name, h)
    for d in _sym_dims(node.attrs):
        if d.expr.is_Symbol:
            hints.setdefault(d.expr.name, d.hint)
    names = sorted({s.name for v in node.inputs if v is not None and v.sym
                    for e in v.sym if e is not None for s in e.free_symbols}
                   | {s for d in _sym_dims(node.attrs) for s in d.symbols})
    env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    symbols, back = {}, {}
    for name in names:
        hint = hints.get(name, 17)
        s = env.create_symbol(hint, ConstantSource(f"sym_{name}"), dynamic_dim=DimDynamic.DYNAMIC)
        symbols[name] = env.create_symintnode(s, hint=hint)
        back[s] = sympy.Symbol(name)
    namespace = dict(symbols)

    def size(d: Any) -> Any:
        if isinstance(d, SymDim):
            return eval(python_expr(d.expr), {"__builtins__": {}}, namespace)  # our own arithmetic only
        return d

    try:
        with FakeTensorMode(shape_env=env, allow_non_fake_inputs=True):
            fakes = []
            for v in node.inputs:
                if v is None:
                    fakes.append(None)
                    continue
                dims = [size(SymDim(e, h)) if e is not None else h for e, h in zip(v.sym or [None] * v.rank, v.shape)]
                fakes.append(torch.empty(dims, dtype=v.dtype.torch))
            outs = reference(fakes, _map_dims(node.attrs, size))
        outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
        result = []
        for out in outs:
            dims = [_as_expr(d.node.expr).xreplace(back) if isinstance(d, torch.SymInt) else None for d in out.shape]
            dims = [None if d is None or d.is_Integer else d for d in dims]
            result.append(tuple(dims) if any(d is not None for d in dims) else None)
    except Exception:
        return None
    if key is not None:
        _CACHE[key] = result
    return result


def _key(obj: Any) -> Any:
    if isinstance(obj, SymDim):
        return ("sym", str(obj))
    if isinstance(obj, (list, tuple)):
        return tuple(_key(x) for x in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, _key(v)) for k, v in obj.items()))
    hash(obj)
    return obj


def _sym_dims(obj: Any) -> list[SymDim]:
    if isinstance(obj, SymDim):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [d for x in obj for d in _sym_dims(x)]
    if isinstance(obj, dict):
        return [d for x in obj.values() for d in _sym_dims(x)]
    return []


def _map_dims(obj: Any, fn) -> Any:
    if isinstance(obj, SymDim):
        return fn(obj)
    if isinstance(obj, list):
        return [_map_dims(x, fn) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_map_dims(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_dims(v, fn) for k, v in obj.items()}
    return obj
