"""torch.nn.Module -> IR Graph: pick the tracing path, bind the example inputs, convert.

torch.fx first (fast), torch.export when fx cannot trace the model or leaves calls opaque that
export converts; ``graph.meta["source"]`` says which path was taken and ``graph.meta["import"]``
why. The user's model is never touched: a private copy is traced in eval mode (import captures
inference semantics; the PyTorch backend restores trainable modules).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from slimgraph.errors import ModelImportError
from slimgraph.frontends.torch import tracing
from slimgraph.frontends.torch.converter import DEFAULT, Converter, first_line
from slimgraph.frontends.torch.copying import private_copy
from slimgraph.ir import OPAQUE, Graph


def import_torch(model: torch.nn.Module, example_inputs: Any) -> Graph:
    """``example_inputs``: a tensor, a tuple of positional tensors, or a mapping from the forward's
    argument names to tensors (what a Hugging Face tokenizer returns)."""
    if not isinstance(model, torch.nn.Module):
        raise ModelImportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _example_args(model, example_inputs)
    graph = _import(model, args, kwargs, adopt_parameters=True)
    if graph is None:  # the model's forward wrote to a parameter the graph adopted: import again, cloning
        graph = _import(model, args, kwargs, adopt_parameters=False)
    return graph


def _example_args(model: torch.nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        raise ModelImportError("a torch.nn.Module needs example_inputs (a tensor, a tuple of tensors or a dict)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
        if not all(isinstance(k, str) for k in kwargs):
            raise ModelImportError("example_inputs as a dict must map argument names to tensors")
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise ModelImportError("example_inputs must be a tensor, a tuple of tensors or a dict of them")
    tensors = [t for t in (*args, *kwargs.values())]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ModelImportError("example_inputs must be a tensor or a tuple of tensors (or a dict of them)")
    args = tuple(t.detach() for t in args)
    kwargs = {k: t.detach() for k, t in kwargs.items()}
    try:
        signature = inspect.signature(model.forward)
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ModelImportError(f"example_inputs do not fit {type(model).__name__}.forward: {exc}") from None
    except ValueError:  # no signature (a builtin forward)
        return args, kwargs
    if "use_cache" in signature.parameters and "use_cache" not in kwargs:
        kwargs["use_cache"] = False  # decoders are traced without their KV cache
    return args, kwargs


def _import(model: torch.nn.Module, args: tuple, kwargs: dict, adopt_parameters: bool) -> Graph | None:
    model, private = private_copy(model)  # ours to trace and run; the user's stays bit-identical
    model.eval()
    try:
        fx_graph = tracing.trace_fx(model)
    except Exception as fx_error:  # data-dependent Python control flow, unsupported builtins...
        return _import_exported(model, args, kwargs, private if adopt_parameters else {},
                                f"torch.fx said: {first_line(fx_error)}")
    converter = Converter(model, "torch.fx", fx_graph=fx_graph)
    if adopt_parameters:
        converter.private = private
    graph = converter.convert(_fx_feeds(model, fx_graph, args, kwargs))
    if not converter.finish():
        return None
    graph.meta["source"] = "torch.fx"
    graph.meta["decomposed"] = list(converter.decomposed)
    opaque = sum(1 for n in graph.nodes if n.op == OPAQUE)
    if opaque:  # perhaps torch.export converts what fx left opaque
        reason = f"torch.fx left {opaque} call(s) opaque"
        try:
            exported = _import_exported(model, args, kwargs, {}, reason)
        except Exception:
            exported = None
        if exported is not None and sum(1 for n in exported.nodes if n.op == OPAQUE) < opaque:
            return exported
    return graph


def _import_exported(model: torch.nn.Module, args: tuple, kwargs: dict, private: dict, reason: str
                     ) -> Graph | None:
    try:
        module, paths = tracing.export(model, args, kwargs)
    except Exception as export_error:
        raise ModelImportError(f"cannot trace the model: {reason}; torch.export said: "
                               f"{first_line(export_error)}") from export_error
    converter = Converter(module, "torch.export")
    converter.private = private
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    leaves = pytree.tree_leaves((args, kwargs))
    if len(leaves) != len(placeholders):
        raise ModelImportError(f"torch.export took {len(placeholders)} inputs for {len(leaves)} given")
    graph = converter.convert(leaves, tracing.output_names(paths))
    if not converter.finish():
        return None
    graph.name = type(model).__name__
    graph.meta["source"] = "torch.export"
    graph.meta["import"] = reason
    return graph


def _fx_feeds(model: torch.nn.Module, fx_graph: torch.fx.Graph, args: tuple, kwargs: dict) -> list[Any]:
    """One feed per fx placeholder (named after the forward's parameters), from the bound arguments."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {}
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    if not bound:  # positional only
        return list(args) + [DEFAULT] * (len(placeholders) - len(args))
    return [bound.get(str(p.target).lstrip("*"), DEFAULT) for p in placeholders]
