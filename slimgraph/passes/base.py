"""Pass, PassResult, PassContext and the pass registry.

A pass is a small dataclass: a ``name``, options as typed fields, and
``run(graph, ctx) -> PassResult``. Plain functions become passes with ``@function_pass``.
"""

from __future__ import annotations

import dataclasses
import threading
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from slimgraph.errors import PassError
from slimgraph.ir import Graph


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes may need beyond the graph: sample inputs and cached analyses."""

    example_inputs: tuple[torch.Tensor, ...] | None = None
    calibration_data: Any = None
    _analyses: dict[Any, tuple[int, int, Any]] = field(default_factory=dict)

    def analysis(self, graph: Graph, compute: Callable[[Graph], Any]) -> Any:
        """``compute(graph)``, cached until the graph changes (its version moves)."""
        key = (id(graph), compute)
        hit = self._analyses.get(key)
        if hit is not None and hit[0] == graph.version:
            return hit[2]
        result = compute(graph)
        self._analyses[key] = (graph.version, id(graph), result)
        return result


@dataclass
class Pass:
    """Base class. Subclasses are dataclasses whose fields are the pass's options."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    exact: ClassVar[bool] = True  # exact passes must keep outputs equal to a tolerance
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def needs_calibration(self) -> bool:
        """Does it run only with ``calibration_data`` (so a CLI can ask for it before loading)?"""
        return False

    def expand(self, graph: Graph) -> list[Pass]:
        """The passes that stand for this one on ``graph`` (a preset chooses its passes by model)."""
        return [self]

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        changed = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default
        }
        if not changed:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_option_text(v)}" for k, v in changed.items()) + "}"


def _option_text(value: Any) -> str:
    """An option as a pipeline string writes it: lists as [a,b]."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_option_text(v) for v in value) + "]"
    return str(value)


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass subclass available by its ``name`` in pipelines."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} registered twice")
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        cls = dataclass(cls)
    _PASSES[cls.name] = cls
    return cls


def function_pass(name: str, description: str = "", exact: bool = True, register: bool = True):
    """Turn ``fn(graph, ctx) -> bool | PassResult`` into a registered, option-less pass."""

    def deco(fn: Callable[[Graph, PassContext], Any]) -> type[Pass]:
        def run(self: Pass, graph: Graph, ctx: PassContext) -> PassResult:
            result = fn(graph, ctx)
            return result if isinstance(result, PassResult) else PassResult(bool(result))

        cls = type(fn.__name__, (Pass,), {
            "name": name, "description": description or (fn.__doc__ or "").strip().split("\n")[0],
            "exact": exact, "run": run, "__module__": fn.__module__,
        })
        cls = dataclass(cls)
        return register_pass(cls) if register else cls

    return deco


def available() -> dict[str, str]:
    """Registered pass names with their one-line descriptions."""
    _load_builtin_passes()
    return {name: cls.description for name, cls in sorted(_PASSES.items())}


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    try:
        return _PASSES[name]
    except KeyError:
        known = ", ".join(sorted(_PASSES))
        raise PassError(f"unknown pass {name!r} (available: {known})") from None


def make_pass(name: str, options: dict[str, Any]) -> Pass:
    """Instantiate a pass from option values (strings from a pipeline are converted by type)."""
    cls = get_pass(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in options.items():
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise PassError(f"pass {name!r} has no option {key!r} (options: {allowed})")
        kwargs[key] = convert_option(name, key, raw, hints.get(key, Any))
    try:
        return cls(**kwargs)
    except PassError:
        raise
    except (TypeError, ValueError) as exc:
        raise PassError(f"pass {name!r}: {exc}") from exc


def convert_option(pass_name: str, key: str, raw: Any, hint: Any) -> Any:
    """Convert a pipeline-string value to the option's declared type, or say why not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    where = f"pass {pass_name!r} option {key!r}"
    if origin in (typing.Union, types.UnionType):
        if raw is None or raw == "none":
            if type(None) in args:
                return None
        for option in args:
            if option is type(None):
                continue
            try:
                return convert_option(pass_name, key, raw, option)
            except PassError:
                continue
        raise PassError(f"{where}: {raw!r} is not a valid {hint}")
    if origin is typing.Literal:
        for choice in args:
            if raw == choice or str(raw) == str(choice):
                return choice
        raise PassError(f"{where}: {raw!r} is not one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        items = raw if isinstance(raw, (list, tuple)) else [raw]
        inner = args[0] if args else Any
        return [convert_option(pass_name, key, item, inner) for item in items]
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "yes", "on"):
            return True
        if str(raw).lower() in ("false", "0", "no", "off"):
            return False
        raise PassError(f"{where}: {raw!r} is not a boolean")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise PassError(f"{where}: {raw!r} is not a number")
        try:
            value = hint(raw) if not isinstance(raw, str) else hint(float(raw)) if hint is float else int(raw)
        except (TypeError, ValueError):
            raise PassError(f"{where}: {raw!r} is not a{'n' if hint is int else ''} {hint.__name__}") from None
        return value
    if hint is str:
        return str(raw)
    return raw


_BUILTIN_LOADED = False
_BUILTIN_LOCK = threading.RLock()  # re-entrant: a pass module may look passes up while it loads


def _load_builtin_passes() -> None:
    """Import every module of slimgraph.passes once, so each registers its passes. Under a lock, and
    marked done only when done: a second thread must not look a pass up while the first imports."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    with _BUILTIN_LOCK:
        if _BUILTIN_LOADED:
            return
        import importlib
        import pkgutil

        import slimgraph.passes as package

        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"slimgraph.passes.{info.name}")
        _BUILTIN_LOADED = True
