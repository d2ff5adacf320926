"""The handler tables: which function converts each torch call to canonical IR ops.

A handler gets the converter, the call's IR-side args/kwargs (Values, Python values,
BatchDims) and torch's concrete result; it returns the IR-side result or raises Unhandled
(the converter then decomposes the call, or makes it opaque). Keys: module classes (exact
type: a subclass with its own forward is traced into), functions and aten OpOverloads, and
Tensor method names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slimgraph.frontends.torch.dims import concrete
from slimgraph.ir import Value


class Unhandled(Exception):
    """A handler declines a call it cannot map exactly."""


Handler = Callable[..., Any]
MODULES: dict[type, Handler] = {}
FUNCTIONS: dict[Any, Handler] = {}
METHODS: dict[str, Handler] = {}


def find_handler(kind: str, target: Any) -> Handler | None:
    if kind == "call_module":
        return MODULES.get(type(target))
    if kind == "call_method":
        return METHODS.get(target)
    try:
        return FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


def _registrar(table: dict):
    def register(*keys: Any):
        def deco(fn: Handler) -> Handler:
            for key in keys:
                table[key] = fn
            return fn

        return deco

    return register


module = _registrar(MODULES)  # @module(nn.Conv2d, ...): by exact class
function = _registrar(FUNCTIONS)  # @function(F.relu, torch.ops.aten.relu.default, ...)
method = _registrar(METHODS)  # @method("view", "reshape"): Tensor methods by name


def sizes_arg(args: tuple, kwargs: dict, name: str) -> tuple:
    """Sizes given as varargs (x.permute(0, 2, 1)) or as one sequence (x.permute([0, 2, 1]), dims=...)."""
    values = args[1:] if len(args) > 1 else (kwargs.get(name),)
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]
    return tuple(values)


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def tensor_arg(x: Any) -> Value:
    if not isinstance(x, Value):
        raise Unhandled
    return x


def ints(x: Any, n: int) -> list[int]:
    x = concrete(x)
    return list(x) if isinstance(x, (list, tuple)) else [x] * n


def pads_from(padding: Any, n: int) -> list[int]:
    p = ints(padding, n)
    return p + p



def aten_equivalent(kind: str, target: Any, args: tuple, kwargs: dict, real: Any) -> Any:
    """The aten overload that a torch.* function or Tensor method of the same name computes with
    these arguments (``torch.cumsum(x, -1)`` is ``aten.cumsum.default(x, -1)``), checked by running
    it on the example values; None when there is none or no handler for it."""
    import torch

    name = target if kind == "call_method" else getattr(target, "__name__", None)
    if kind == "call_module" or not isinstance(name, str) or not isinstance(real, torch.Tensor):
        return None
    if kind == "call_function" and getattr(torch, name, None) is not target:
        return None  # only torch.* builtins share aten's argument conventions
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    for overload in packet.overloads():
        op = getattr(packet, overload)
        if op not in FUNCTIONS:
            continue
        try:
            with torch.no_grad():
                again = op(*args, **kwargs)
        except Exception:
            continue
        if isinstance(again, torch.Tensor) and again.shape == real.shape and again.dtype == real.dtype \
                and torch.equal(again, real):
            return op
    return None
