"""torch.nn.Module -> IR Graph: pick the tracing path, bind the example inputs, convert.

torch.fx first (fast), torch.export when fx cannot trace the model or leaves calls opaque that
export converts; ``graph.meta["source"]`` says which path was taken and ``graph.meta["import"]``
why. The user's model is never touched: a private copy is traced in eval mode (import captures
inference semantics; the PyTorch backend restores trainable modules).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from slimgraph.errors import ModelImportError
from slimgraph.frontends.torch import tracing
from slimgraph.frontends.torch.converter import DEFAULT, Converter, first_line
from slimgraph.frontends.torch.copying import private_copy
from slimgraph.ir import OPAQUE, Graph

# torch.fx and torch.export patch process-wide state while they trace (functions, module calls,
# dynamo's config): two threads tracing at once break each other, so imports take turns
_TRACING = threading.RLock()


def import_torch(model: torch.nn.Module, example_inputs: Any, dynamic_dims: Mapping | None = None) -> Graph:
    """``example_inputs``: a tensor, a tuple of positional tensors, or a mapping from the forward's
    argument names to tensors (what a Hugging Face tokenizer returns). ``dynamic_dims``: which dims
    stay symbolic, by argument name, e.g. ``{"input_ids": {0: "batch", 1: "seq"}}``. Thread-safe:
    concurrent imports run one at a time."""
    with _TRACING:
        return _import_torch(model, example_inputs, dynamic_dims)


def _import_torch(model: torch.nn.Module, example_inputs: Any, dynamic_dims: Mapping | None) -> Graph:
    if not isinstance(model, torch.nn.Module):
        raise ModelImportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _example_args(model, example_inputs)
    dims = _check_dynamic_dims(model, args, kwargs, dynamic_dims)
    graph = _import(model, args, kwargs, dims, adopt_parameters=True)
    if graph is None:  # the model's forward wrote to a parameter the graph adopted: import again, cloning
        graph = _import(model, args, kwargs, dims, adopt_parameters=False)
    return graph


def _argument_names(model: torch.nn.Module, args: tuple) -> list[str]:
    """The forward's parameter names for the positional example inputs."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i].name if i < len(params) else f"input_{i}" for i in range(len(args))]


def _check_dynamic_dims(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_dims: Mapping | None
                        ) -> dict[str, dict[int, str]]:
    """dynamic_dims checked against the example inputs: {argument name: {axis: symbol}}."""
    if not dynamic_dims:
        return {}
    if not isinstance(dynamic_dims, Mapping):
        raise ModelImportError("dynamic_dims must map argument names to {axis: symbol name}")
    tensors = dict(zip(_argument_names(model, args), args)) | kwargs
    checked: dict[str, dict[int, str]] = {}
    for name, axes in dynamic_dims.items():
        tensor = tensors.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise ModelImportError(f"dynamic_dims names {name!r}, which is not one of the example inputs "
                                   f"({', '.join(k for k, v in tensors.items() if isinstance(v, torch.Tensor))})")
        if not isinstance(axes, Mapping):
            raise ModelImportError(f"dynamic_dims[{name!r}] must map axes to symbol names, e.g. {{0: 'batch'}}")
        checked[name] = {}
        for axis, symbol in axes.items():
            if not isinstance(axis, int) or not -tensor.dim() <= axis < tensor.dim():
                raise ModelImportError(f"dynamic_dims[{name!r}]: axis {axis!r} is not a dim of a "
                                       f"{tensor.dim()}-d input")
            if not isinstance(symbol, str) or not symbol.isidentifier() or symbol.startswith("_"):
                raise ModelImportError(f"dynamic_dims[{name!r}][{axis}]: symbol {symbol!r} must be an identifier")
            if tensor.shape[axis] < 2:
                raise ModelImportError(
                    f"dynamic_dims[{name!r}][{axis}] ({symbol}) is {tensor.shape[axis]} in the example inputs: "
                    f"trace symbolic dims at size 2 or more (torch.export specializes sizes 0 and 1)")
            checked[name][axis % tensor.dim()] = symbol
    return checked


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
    tensors = [*args, *kwargs.values()]
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


def _import(model: torch.nn.Module, args: tuple, kwargs: dict, dims: dict, adopt_parameters: bool
            ) -> Graph | None:
    model, private = private_copy(model)  # ours to trace and run; the user's stays bit-identical
    model.eval()
    if dims:  # torch.export tracks every size computed from a symbolic dim; fx only if it fails
        try:
            return _import_exported(model, args, kwargs, dims, private if adopt_parameters else {},
                                    "symbolic dims were asked for")
        except ModelImportError as exc:
            export_error = exc
    try:
        fx_graph = tracing.trace_fx(model, _defaults_left(model, args, kwargs))
    except Exception as fx_error:  # data-dependent Python control flow, unsupported builtins...
        if dims:
            raise export_error from None
        return _import_exported(model, args, kwargs, dims, private if adopt_parameters else {},
                                f"torch.fx said: {first_line(fx_error)}")
    converter = Converter(model, "torch.fx", fx_graph=fx_graph)
    if adopt_parameters:
        converter.private = private
    feeds = _fx_feeds(model, fx_graph, args, kwargs)
    placeholders = [str(n.target).lstrip("*") for n in fx_graph.nodes if n.op == "placeholder"]
    graph = converter.convert(feeds, input_syms=[_syms(dims, name, feed) for name, feed in zip(placeholders, feeds)])
    if not converter.finish():
        return None
    graph.meta["source"] = "torch.fx"
    graph.meta["decomposed"] = list(converter.decomposed)
    opaque = sum(1 for n in graph.nodes if n.op == OPAQUE)
    if opaque:  # perhaps torch.export converts what fx left opaque
        reason = f"torch.fx left {opaque} call(s) opaque"
        try:
            exported = _import_exported(model, args, kwargs, dims, {}, reason)
        except Exception:
            exported = None
        if exported is not None and sum(1 for n in exported.nodes if n.op == OPAQUE) < opaque:
            return exported
    return graph


def _syms(dims: dict, name: str, tensor: Any) -> tuple | None:
    axes = dims.get(name)
    if not axes or not isinstance(tensor, torch.Tensor):
        return None
    return tuple(axes.get(a) for a in range(tensor.dim()))


def _import_exported(model: torch.nn.Module, args: tuple, kwargs: dict, dims: dict, private: dict, reason: str
                     ) -> Graph | None:
    names = _argument_names(model, args)
    shapes = None
    if dims:
        # ranges as the model allows (position tables cap a sequence): export finds them; the
        # symbols themselves are ours (sizes are tracked from the inputs' dims, by name)
        shapes = {name: {a: torch.export.Dim.DYNAMIC for a in dims[name]} if name in dims else None
                  for name in [*names, *kwargs]}
    try:
        program, paths = tracing.export(model, args, kwargs, shapes)
        lowered = tracing.lower(program)
    except Exception as export_error:
        raise ModelImportError(f"cannot trace the model: {reason}; torch.export said: "
                               f"{first_line(export_error)}") from export_error
    graph = tracing.convert_program(
        program, lowered, lambda module: _convert_exported(module, paths, args, kwargs, names, dims, private))
    if graph is None:
        return None
    graph.name = type(model).__name__
    graph.meta["source"] = "torch.export"
    graph.meta["import"] = reason
    return graph


def _convert_exported(module: torch.fx.GraphModule, paths: list, args: tuple, kwargs: dict, names: list[str],
                      dims: dict, private: dict) -> Graph | None:
    converter = Converter(module, "torch.export")
    converter.private = private
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    flat = pytree.tree_flatten_with_path((args, kwargs))[0]
    if len(flat) != len(placeholders):
        raise ModelImportError(f"torch.export took {len(placeholders)} inputs for {len(flat)} given")
    leaf_names = [names[path[1].idx] if path[0].idx == 0 and len(path) == 2 else
                  getattr(path[1], "key", None) if len(path) == 2 else None for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    graph = converter.convert(leaves, tracing.output_names(paths), leaf_names,
                              [_syms(dims, n, leaf) if n else None for n, leaf in zip(leaf_names, leaves)])
    return graph if converter.finish() else None


def _defaults_left(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments the caller left at a non-tensor default (``mask=None``): fx must
    trace them as those constants, not as inputs, or ``if mask is None`` takes the other branch."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in signature.parameters.items()
            if name not in bound and p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not isinstance(p.default, torch.Tensor)}


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
