"""A decoder LLM as the graph of one generation step against a key/value cache.

Traced as is, a Hugging Face causal LM recomputes the whole sequence on every call. Generation
runs one step per new token, reading the keys and values of the tokens before from a cache. The
step graph has Optimum's interface (graph.meta["io_names"] holds the file names; the IR's names
are identifiers):

    inputs   input_ids [batch, seq], attention_mask [batch, past_seq + seq],
             position_ids [batch, seq] (where the forward takes them),
             past_key_values.{i}.key / .value [batch, kv_heads, past_seq, head_dim]
    outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past_seq + seq, head_dim]

The first call takes an empty past (past_seq = 0). The cache is rebuilt inside the traced forward
from the past tensors (a DynamicCache), so torch.export sees plain tensors in and out.
"""

from __future__ import annotations

import inspect
from typing import Any

import sympy
import torch
from torch.utils import _pytree as pytree

from slimgraph.errors import ModelImportError
from slimgraph.frontends.torch import tracing
from slimgraph.frontends.torch.converter import Converter, first_line
from slimgraph.frontends.torch.copying import private_copy
from slimgraph.ir import OPAQUE, Graph

BATCH, SEQ, PAST = "batch", "seq", "past_seq"


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward's keyword for the cache: ``cache`` (transformers 5.x) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ModelImportError(f"kv_cache=True needs a decoder whose forward takes past_key_values (a Hugging Face "
                           f"causal LM); {type(model).__name__}.forward does not")


def _cache_of(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise ModelImportError("the decoder returned no cache (past_key_values) with use_cache=True")


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from a transformers cache object or the legacy tuple of tuples."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache))
    else:
        pairs = [tuple(layer[:2]) for layer in cache]
    if not pairs or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for pair in pairs for t in pair):
        raise ModelImportError(f"the decoder's cache ({type(cache).__name__}) does not hold one [batch, heads, "
                               "seq, head_dim] key and value per layer (sliding-window, hybrid and state-space "
                               "caches have no past_key_values form)")
    return pairs


def _make_cache(model: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=pairs, config=model.config)
    except TypeError:  # older transformers
        return DynamicCache.from_legacy_cache(tuple(pairs))


class CachedStep(torch.nn.Module):
    """One generation step of ``model`` with its cache as plain tensors: takes input_ids,
    attention_mask, [position_ids,] then key and value of each layer; returns a dict of logits
    and the present keys and values. Its forward's signature names every tensor (torch.export's
    guards mishandle a ``*past`` parameter)."""

    def __init__(self, model: torch.nn.Module, layers: int, positions: bool) -> None:
        super().__init__()
        self.model, self.layers, self.positions = model, layers, positions
        self.cache_argument = _cache_argument(model)
        names = ["input_ids", "attention_mask"] + (["position_ids"] if positions else [])
        names += [f"past_key_values_{i}_{kind}" for i in range(layers) for kind in ("key", "value")]
        self.names = names
        parameter = inspect.Parameter
        signature = inspect.Signature([parameter(n, parameter.POSITIONAL_OR_KEYWORD) for n in names])

        def forward(*tensors: torch.Tensor) -> dict:
            return self.step(*tensors)

        forward.__signature__ = signature
        self.forward = forward

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> dict:
        kwargs = {}
        if self.positions:
            kwargs["position_ids"], rest = rest[0], rest[1:]
        pairs = [(rest[2 * i], rest[2 * i + 1]) for i in range(self.layers)]
        kwargs[self.cache_argument] = _make_cache(self.model, pairs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        result = {"logits": out.logits}
        for i, (key, value) in enumerate(cache_tensors(_cache_of(out))):
            result[f"present.{i}.key"], result[f"present.{i}.value"] = key, value
        return result


def positions_of(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last ``new`` tokens as Hugging Face's generate makes them: the count of
    real tokens before each (left padding does not shift positions); 1 on padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -new:].contiguous()


def _distinct(size: int, taken: set[int]) -> int:
    """``size``, moved up past 0, 1 and the sizes in ``taken``: torch.export specializes 0 and 1
    and may equate dims that are the same size in the example."""
    size = max(size, 2)
    while size in taken:
        size += 1
    return size


def trace_feeds(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], bool, int]:
    """Example inputs for tracing a step, from the prompt ``input_ids``: the model runs the prompt
    (its own cache gives the layers' key/value shapes and dtypes), then a step of new tokens reads
    that cache. Sizes: batch, new tokens and past length distinct and at least 2."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ModelImportError("kv_cache=True takes example_inputs=(input_ids,): an integer tensor [batch, seq]")
    batch = _distinct(input_ids.shape[0], set())
    new = _distinct(3, {batch})
    past = _distinct(input_ids.shape[1], {batch, new})
    ids = input_ids.repeat((batch + input_ids.shape[0] - 1) // input_ids.shape[0], 1)[:batch]
    ids = ids.repeat(1, (past + new + ids.shape[1] - 1) // ids.shape[1])[:, :past + new]
    prompt, step = ids[:, :past].contiguous(), ids[:, past:].contiguous()  # views with offsets trip export
    positions = "position_ids" in inspect.signature(model.forward).parameters
    with torch.no_grad():
        cache = _cache_of(model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True))
    pairs = cache_tensors(cache)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    feeds = [step, mask] + ([positions_of(mask, new)] if positions else [])
    feeds += [t.detach().clone() for pair in pairs for t in pair]
    return feeds, positions, len(pairs)


def import_cached(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[Graph, list[torch.Tensor]]:
    """The step graph of ``model`` (never modified) and the example inputs it was traced with."""
    _cache_argument(model)  # a decoder with a cache, before anything runs
    copy, private = private_copy(model)
    copy.eval()
    try:
        feeds, positions, layers = trace_feeds(copy, input_ids)
        step = CachedStep(copy, layers, positions)
    except ModelImportError:
        raise
    except Exception as exc:
        raise ModelImportError(f"kv_cache=True: running {type(model).__name__} on the prompt with its cache "
                               f"failed: {first_line(exc)}") from exc
    names = ["input_ids", "attention_mask"] + (["position_ids"] if positions else [])
    names += [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    dynamic = torch.export.Dim.DYNAMIC
    head = [{0: dynamic, 1: dynamic}] * (len(names) - 2 * layers)
    shapes = tuple(head + [{0: dynamic, 2: dynamic}] * (2 * layers))
    args = tuple(feeds)
    seq, past = sympy.Symbol(SEQ), sympy.Symbol(PAST)
    syms = {"input_ids": (BATCH, SEQ), "position_ids": (BATCH, SEQ), "attention_mask": (BATCH, past + seq)}
    leaves = [leaf for _, leaf in pytree.tree_flatten_with_path((args, {}))[0]]
    ir_names = [name.replace(".", "_") for name in names]
    try:
        program, paths = tracing.export(step, args, {}, shapes)
        lowered = tracing.lower(program)
    except Exception as exc:
        raise ModelImportError(f"kv_cache=True: torch.export could not trace a step of {type(model).__name__} "
                               f"with symbolic batch, sequence and past length: {first_line(exc)}") from exc

    def convert(module: torch.fx.GraphModule) -> Graph:
        converter = Converter(module, "torch.export")
        converter.private = private
        graph = converter.convert(leaves, [name.replace(".", "_") for name in tracing.output_names(paths)],
                                  ir_names, [syms.get(name, (BATCH, None, PAST, None)) for name in names])
        if not converter.finish():
            raise ModelImportError("kv_cache=True: the decoder's forward writes to its own parameters")
        return graph

    graph = tracing.convert_program(program, lowered, convert)
    opaque = [n.name for n in graph.nodes if n.op == OPAQUE]
    if opaque:
        raise ModelImportError(f"kv_cache=True: {len(opaque)} call(s) of the step have no IR form "
                               f"({', '.join(opaque[:5])})")
    out_names = tracing.output_names(paths)
    graph.name = type(model).__name__
    graph.meta["source"] = "torch.export"
    graph.meta["import"] = "kv_cache=True: one generation step with past_key_values"
    graph.meta["io_names"] = {"inputs": names, "outputs": out_names}
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    graph.meta["kv_cache"] = {"layers": layers, "eos_token_id": getattr(config, "eos_token_id", None),
                              "pad_token_id": getattr(config, "pad_token_id", None)}
    return graph, feeds


def prefill_feeds(graph: Graph, prompt: Any) -> tuple[torch.Tensor, ...]:
    """The step graph's inputs that read ``prompt`` (input_ids [batch, seq], or a 1-tuple of it)
    with an empty cache, as the first step of generation does: calibration data from prompts."""
    if isinstance(prompt, (tuple, list)) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype.is_floating_point:
        raise ModelImportError("with kv_cache=True, calibration_data holds prompts: integer input_ids "
                               "tensors [batch, seq]")
    batch, seq = prompt.shape
    mask = torch.ones(batch, seq, dtype=torch.long)
    feeds = {"input_ids": prompt.long(), "attention_mask": mask, "position_ids": positions_of(mask, seq)}
    return tuple(feeds[v.name] if v.name in feeds else
                 torch.zeros(batch, v.shape[1], 0, v.shape[3], dtype=v.dtype.torch) for v in graph.inputs)
