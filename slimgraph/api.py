"""The public entry points: import_model, optimize, to_torch, load_weights and OptimizeResult."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimgraph.errors import ModelImportError, SlimgraphError
from slimgraph.ir import Graph
from slimgraph.measure import RUNTIMES, Snapshots
from slimgraph.measure import measure as measure_latency
from slimgraph.passes import NumericalCheck, Pass, PassContext, PassManager, Trace, TraceInstrument, to_passes
from slimgraph.passes.instruments import Instrument


def import_model(model: Any, example_inputs: Any = None, dynamic_dims: dict | None = None, *,
                 max_constant_bytes: int | None = None, kv_cache: bool = False) -> Graph:
    """A torch.nn.Module (with example_inputs), an ONNX file path or ModelProto, or a Graph (copied)
    as an IR Graph. The model is never modified. ``dynamic_dims`` names the dims that stay symbolic,
    by the forward's argument names, as torch.onnx.export's dynamic_axes:
    ``{"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}``.
    ``max_constant_bytes`` caps what an ONNX file's stored tensors may declare (default 32 GiB):
    a file over it is refused before anything is allocated for it. ``kv_cache=True`` imports a
    decoder LLM (example_inputs: ``(input_ids,)``) as one generation step against a key/value
    cache, with Optimum's inputs and outputs (see frontends/torch/kv_cache.py)."""
    example_inputs = as_tensors(example_inputs)
    if kv_cache:
        return _import_cached(model, example_inputs, dynamic_dims)[0]
    if isinstance(model, torch.nn.Module):
        from slimgraph.frontends.torch import import_torch

        return import_torch(model, example_inputs, dynamic_dims)
    if isinstance(model, Graph):
        return model.clone()
    import onnx

    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        from slimgraph.frontends.onnx import MAX_CONSTANT_BYTES, import_onnx

        if isinstance(example_inputs, dict):
            raise ModelImportError("an ONNX model takes example_inputs as a sequence in its inputs' order")
        return import_onnx(model, example_inputs, MAX_CONSTANT_BYTES if max_constant_bytes is None
                           else max_constant_bytes)
    raise ModelImportError(
        f"cannot import a {type(model).__name__}: expected a torch.nn.Module, an ONNX path or ModelProto, or a Graph")


def _import_cached(model: Any, example_inputs: Any, dynamic_dims: dict | None) -> tuple[Graph, list[torch.Tensor]]:
    """A decoder's cached step graph and the example inputs it was traced with."""
    if not isinstance(model, torch.nn.Module):
        raise ModelImportError("kv_cache=True imports a torch decoder (a Hugging Face causal LM); an ONNX file "
                               "with past_key_values inputs is already a step graph: import it as it is")
    if dynamic_dims:
        raise ModelImportError("kv_cache=True makes batch, seq and past_seq symbolic itself: drop dynamic_dims")
    if isinstance(example_inputs, dict):
        example_inputs = example_inputs.get("input_ids")
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1:
        example_inputs = example_inputs[0]
    from slimgraph.frontends.torch.importer import _TRACING
    from slimgraph.frontends.torch.kv_cache import import_cached

    with _TRACING:
        return import_cached(model, example_inputs)


def as_tensors(example_inputs: Any) -> Any:
    """Example inputs as torch tensors: one tensor or array, a sequence of them or a dict by name;
    numpy arrays (what onnxruntime users hold) are taken as they are."""
    import numpy as np

    def one(x: Any, where: str) -> Any:
        if isinstance(x, np.ndarray) or np.isscalar(x) and not isinstance(x, (str, bytes)):
            array = np.asarray(x)
            if array.dtype.kind not in "biuf":
                raise SlimgraphError(f"example input {where}: numpy dtype {array.dtype} is not supported "
                                     "(strings and objects have no tensor form)")
            return torch.from_numpy(array.copy())
        return x

    if example_inputs is None or isinstance(example_inputs, torch.Tensor):
        return example_inputs
    if isinstance(example_inputs, np.ndarray):
        return (one(example_inputs, "0"),)
    if isinstance(example_inputs, dict):
        return {k: one(v, repr(k)) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (list, tuple)):
        return type(example_inputs)(one(x, str(i)) for i, x in enumerate(example_inputs))
    return example_inputs


def sample_inputs(graph: Graph, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic random inputs matching the graph's input types; integers stay within the
    tables they index (token ids below the vocabulary size, token types below 2)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else 1 for d in v.shape]
        if v.dtype.is_float:
            out.append(torch.randn(shape, generator=gen).to(v.dtype.torch))
        else:
            out.append(torch.randint(0, _index_bound(v, 8), shape, generator=gen).to(v.dtype.torch))
    return out


_SHAPE_ONLY = {"cast", "identity", "reshape", "unsqueeze", "squeeze", "expand", "slice", "flatten"}


def _index_bound(value, default: int, depth: int = 4) -> int:
    """The smallest size ``value`` indexes (embedding ids, take indices), through shape-only ops."""
    bound = default
    for use in value.uses:
        node = use.node
        if node.op == "embedding" and use.index == 1:
            bound = min(bound, node.inputs[0].shape[0])
        elif node.op == "take" and use.index == 1:
            bound = min(bound, node.inputs[0].shape[node.attrs["axis"]])
        elif node.op in _SHAPE_ONLY and depth > 0:
            bound = min(bound, _index_bound(node.outputs[0], default, depth - 1))
    return max(bound, 1)


@dataclass
class OptimizeResult:
    graph: Graph
    trace: Trace
    example_inputs: tuple[torch.Tensor, ...] | None = None
    snapshots: Snapshots | None = None  # the graph before the pipeline and after each pass

    def report(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a self-contained HTML report of what every pass did (see slimgraph/report.py)."""
        from slimgraph.report import write_report

        if self.snapshots is None or self.snapshots.before is None:
            raise SlimgraphError("this result holds no per-pass graphs to report (it did not come from optimize)")
        return write_report(self.trace, self.snapshots.graphs(), path, overwrite=overwrite)

    def to_torch(self) -> torch.nn.Module:
        return to_torch(self.graph)

    def save_torch(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write folder/model.py (needs only torch, has ``load(folder)``) and folder/weights.pt."""
        from slimgraph.backends.pytorch import save_torch

        folder = Path(folder)
        existing = [p for p in ("model.py", "weights.pt", "modules.pt") if (folder / p).exists()]
        if existing and not overwrite:
            raise SlimgraphError(f"{folder}: {', '.join(existing)} already exist (pass overwrite=True)")
        return save_torch(self.graph, folder)

    def to_onnx(self, path: str | os.PathLike | None = None, opset: int | None = None, overwrite: bool = False,
                quant_format: str = "qdq", dynamic_batch: bool = False, external_data: bool | None = None):
        """The graph as a checked ONNX ModelProto, written to ``path`` if given (never overwriting
        an existing file unless asked). An int8 graph is written as QDQ (``quant_format="qdq"``)
        or with its integer kernels written out (``"qoperator"``: QLinearConv, QGemm, ...).
        ``dynamic_batch=True`` makes the leading dim of inputs and outputs symbolic.
        ``external_data`` writes the tensors to ``<path>.data`` (default: where they pass 1 GiB)."""
        return to_onnx(self.graph, path, opset=opset, overwrite=overwrite, quant_format=quant_format,
                       dynamic_batch=dynamic_batch, external_data=external_data)

    def summary(self) -> str:
        return self.trace.summary()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, *, backend: str = "onnxruntime",
                 attention_mask: torch.Tensor | None = None, **tokens: Any) -> torch.Tensor:
        """Greedy decoding with the optimized step graph of ``optimize(..., kv_cache=True)`` on the
        emitted ONNX model (``backend="onnxruntime"``) or PyTorch module (``"torch"``): the prompt
        and up to ``max_new_tokens`` new tokens, as Hugging Face's ``generate(do_sample=False)``.
        ``eos_token_id`` / ``pad_token_id`` default to the model's own."""
        from slimgraph.generate import generate

        return generate(self.graph, input_ids, max_new_tokens, attention_mask=attention_mask, backend=backend,
                        **tokens)


def to_torch(graph: Graph) -> torch.nn.Module:
    """An nn.Module that computes ``graph``; its generated source is in ``.code``."""
    from slimgraph.backends.pytorch import to_torch as emit

    return emit(graph)


def load_weights(graph: Graph, module: torch.nn.Module) -> int:
    """Copy the trained weights of a module made by ``to_torch(graph)`` back into the graph (see
    ``slimgraph.backends.pytorch.load_weights``). A module wrapped for data-parallel training
    (``DistributedDataParallel``, ``DataParallel``) is read through its ``.module``."""
    from slimgraph.backends.pytorch import load_weights as load

    while isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        module = module.module
    return load(graph, module)


def to_onnx(graph: Graph, path: str | os.PathLike | None = None, opset: int | None = None, overwrite: bool = False,
            quant_format: str = "qdq", dynamic_batch: bool = False, external_data: bool | None = None):
    """Emit ``graph`` as an ONNX ModelProto (checked with onnx.checker, full check), optionally saved;
    ``quant_format`` ("qdq" or "qoperator") is the form of an int8 graph; ``dynamic_batch`` makes
    the leading dim of inputs and outputs symbolic; ``external_data`` writes the tensors to
    ``<path>.data`` beside the file (default: where the constants pass 1 GiB)."""
    from slimgraph.backends.onnx import to_onnx as emit

    return emit(graph, path, opset=opset, overwrite=overwrite, quant_format=quant_format,
                dynamic_batch=dynamic_batch, external_data=external_data)


def _fits(tensor: torch.Tensor, value) -> bool:
    """Whether ``tensor`` can feed input ``value``: the same rank and size on every dim but the
    batch and the symbolic ones (a graph with a symbolic seq takes any sequence length)."""
    if tensor.dim() != value.rank:
        return False
    sym = value.sym or (None,) * value.rank
    return all(i == 0 or s is not None or a == b for i, (a, b, s) in enumerate(zip(tensor.shape, value.shape, sym)))


def optimize(
    model: Any,
    passes: str | Sequence[str | Pass] | Pass,
    example_inputs: Any = None,
    verify: bool = True,
    *,
    fixed_point: bool = False,
    instruments: Sequence[Instrument] = (),
    rtol: float = 1e-4,
    calibration_data: Any = None,
    dynamic_dims: dict | None = None,
    max_constant_bytes: int | None = None,
    measure: str | None = None,
    measure_threads: int = 1,
    kv_cache: bool = False,
) -> OptimizeResult:
    """Import ``model`` (never modified), run ``passes`` and return the graph and its trace.

    With ``verify`` (the default) the graph is verified after every pass and each pass is run
    numerically against its input on sample inputs: exact passes must stay within ``rtol``,
    lossy ones report ``max_abs_error`` in the trace. ``calibration_data`` is an iterable of
    input tuples (or single tensors) for passes that observe activations, e.g. ``quantize``.
    ``dynamic_dims`` keeps dims symbolic and ``max_constant_bytes`` caps an ONNX file's stored
    tensors (see ``import_model``). ``measure="onnxruntime"`` (or ``"torch"``) times the graph after
    every pass on the example inputs (``measure_threads`` threads, interleaved runs, medians) into
    each record's ``latency_ms``; lossy passes also record ``layer_errors`` (worst value first).
    ``kv_cache=True``: a decoder LLM (example_inputs ``(input_ids,)``) becomes one generation step
    against a key/value cache; ``result.generate`` decodes with it. Its ``calibration_data`` are
    prompts (input_ids tensors [batch, seq]), observed as the step that reads them with an empty cache.
    """
    pipeline = to_passes(passes)  # bad names and options fail before any work
    example_inputs = as_tensors(example_inputs)
    if kv_cache:  # verified on the step it was traced with: new tokens against a real past
        graph, example_inputs = _import_cached(model, example_inputs, dynamic_dims)
        example_inputs = tuple(example_inputs)
    else:
        graph = import_model(model, example_inputs, dynamic_dims, max_constant_bytes=max_constant_bytes)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):  # by argument name, as the graph's inputs are named
        example_inputs = tuple(example_inputs[v.name] for v in graph.inputs if v.name in example_inputs)
    inputs = tuple(example_inputs) if example_inputs is not None else tuple(sample_inputs(graph))
    if len(inputs) != len(graph.inputs):
        raise SlimgraphError(f"the graph takes {len(graph.inputs)} inputs, example_inputs has {len(inputs)}")
    for value, tensor in zip(graph.inputs, inputs):
        if not isinstance(tensor, torch.Tensor) or not _fits(tensor, value):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise SlimgraphError(f"example input for %{value.name}: expected {value.type_str()}, got {got}")
    if measure is not None and measure not in RUNTIMES:
        raise SlimgraphError(f"measure={measure!r} is not one of {', '.join(RUNTIMES)}")
    snapshots = Snapshots()  # the graph after each pass (structure only: constants are shared)
    chosen: list[Instrument] = [TraceInstrument(), snapshots]
    if verify:
        chosen.append(NumericalCheck(inputs, rtol=rtol))
    chosen += list(instruments)
    if kv_cache and calibration_data is not None:
        from slimgraph.frontends.torch.kv_cache import prefill_feeds

        calibration_data = [prefill_feeds(graph, item) for item in calibration_data]
    ctx = PassContext(example_inputs=inputs, calibration_data=calibration_data)
    trace = PassManager(pipeline, chosen, verify=verify, fixed_point=fixed_point).run(graph, ctx)
    if measure:
        measure_latency(snapshots, trace, measure, inputs, threads=measure_threads)
    return OptimizeResult(graph, trace, inputs, snapshots)
