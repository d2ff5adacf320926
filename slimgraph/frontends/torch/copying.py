"""A private copy of the user's model, made as copy.deepcopy makes it, but faster.

Import traces and runs a copy so the user's model stays bit-identical; the copy's parameters
are private, so the graph can adopt them as constants without cloning them a second time.
"""

from __future__ import annotations

import copy
import copyreg
import types
from collections import OrderedDict
from typing import Any

import torch

# Values copy.deepcopy returns as they are (besides tuples of them).
_ATOMIC = frozenset({type(None), int, float, bool, complex, str, bytes, type, range, types.FunctionType,
                     types.BuiltinFunctionType, torch.dtype, torch.device, torch.layout, torch.memory_format})


def _plain_module_class(cls: type) -> bool:
    """Whether copy.deepcopy copies instances of ``cls`` through nn.Module's default state (the
    instance dict, less ``_compiled_call_impl``), which ``private_copy`` reproduces directly."""
    return (getattr(cls, "__deepcopy__", None) is None and cls not in copyreg.dispatch_table
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is torch.nn.Module.__getstate__
            and not hasattr(cls, "__getnewargs_ex__") and not hasattr(cls, "__getnewargs__")
            and all("__slots__" not in vars(k) for k in cls.__mro__))


def private_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[int, torch.nn.Parameter]]:
    """``copy.deepcopy(model)``, and the copy's own parameters (id -> parameter).

    The same copy, made faster: a module of a plain class (see ``_plain_module_class``) is rebuilt
    from its state with immutable attributes kept and empty containers (hook dicts) made anew,
    which is what deepcopy makes of them; everything else (parameters, buffers, other
    attributes, modules of other classes) goes through copy.deepcopy with one shared memo, so
    shared and tied objects stay shared in the copy.
    """
    memo: dict[int, Any] = {}
    plain: dict[type, bool] = {}

    def copy_module(module: torch.nn.Module) -> torch.nn.Module:
        done = memo.get(id(module))
        if done is not None:
            return done
        cls = type(module)
        if cls not in plain:
            plain[cls] = _plain_module_class(cls)
        if not plain[cls]:
            return copy.deepcopy(module, memo)
        new = cls.__new__(cls)
        memo[id(module)] = new
        state = {}
        for key, value in module.__dict__.items():
            kind = type(value)
            if key == "_compiled_call_impl":
                continue  # not part of nn.Module's state
            if kind in _ATOMIC or (kind is tuple and all(type(v) in _ATOMIC for v in value)):
                state[key] = value
            elif id(value) in memo:  # an object met before (deepcopy keeps it shared)
                state[key] = memo[id(value)]
            elif key in ("_modules", "_buffers") and kind is dict:
                state[key] = memo[id(value)] = {}
                for k, v in value.items():
                    state[key][k] = None if v is None else copy_module(v) if key == "_modules" else \
                        _copy_buffer(v, memo)
            elif kind in (dict, OrderedDict, set, list) and not value:
                state[key] = memo[id(value)] = kind()
            else:
                state[key] = copy.deepcopy(value, memo)
        new.__setstate__(state)
        return new

    private = copy_module(model)
    owned = {id(v): v for k, v in memo.items()
             if isinstance(v, torch.Tensor) and isinstance(v, torch.nn.Parameter) and k != id(v)}
    return private, owned


def _copy_buffer(t: Any, memo: dict[int, Any]) -> Any:
    """copy.deepcopy(t, memo). A plain dense CPU tensor that spans its whole storage (nearly every
    buffer) is cloned directly: the same result as Tensor.__deepcopy__'s storage copy, without its
    Python overhead, and the storage is entered in the memo as deepcopy does, so a later view of it
    still shares the copied storage."""
    done = memo.get(id(t))
    if done is not None:
        return done
    if type(t) is not torch.Tensor or not t.is_leaf or t.requires_grad or t.layout is not torch.strided \
            or t.device.type != "cpu" or t.is_quantized or t.is_conj() or t.is_neg() or t.storage_offset() \
            or not t.is_contiguous():
        return copy.deepcopy(t, memo)
    storage, storages = t.untyped_storage(), memo.setdefault("torch", {})
    if storage.nbytes() != t.numel() * t.element_size() or storage._cdata in storages:
        return copy.deepcopy(t, memo)  # a view, or a storage already copied: shared as deepcopy shares it
    new = t.detach().clone()
    memo[id(t)] = new
    storages[storage._cdata] = new.untyped_storage()
    memo.setdefault(id(memo), []).append(t)  # deepcopy's keep-alive: ids in the memo stay unique
    return new

