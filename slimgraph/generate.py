"""Greedy decoding on a cached step graph (see frontends/torch/kv_cache.py), in onnxruntime or torch.

The loop is Hugging Face's greedy search: the prompt runs once with an empty past, then each
step feeds only the new token and the presents of the step before as the next past. Position ids
count the real tokens (left padding does not shift them); a sequence that produced an end token
is filled with the pad token until every sequence has ended or ``max_new_tokens`` are made.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slimgraph.errors import SlimgraphError
from slimgraph.ir import Graph

BACKENDS = ("onnxruntime", "torch")
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")

_NUMPY_OF = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(bfloat16)": None}


@dataclass
class Step:
    """One generation step on some runtime: the inputs it takes (file names, in order), the shape
    [heads, head_dim] and dtype of each past, and how to run it (feeds by name -> outputs by name)."""

    inputs: list[str]
    past: dict[str, tuple[tuple[int, int], torch.dtype]]
    run: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    eos_token_id: Any = None
    pad_token_id: Any = None

    def __post_init__(self) -> None:
        missing = [n for n in ("input_ids", "attention_mask") if n not in self.inputs]
        if missing or not self.past:
            raise SlimgraphError("generate needs a step graph with input_ids, attention_mask and "
                                 "past_key_values.{i}.key/.value inputs (optimize(..., kv_cache=True)); "
                                 f"this one takes {', '.join(self.inputs)}")


def _graph_step(graph: Graph, backend: str) -> Step:
    """A Step running the IR graph's emitted PyTorch module or ONNX model."""
    from slimgraph.backends.onnx import io_names

    names = {id(v): name for v, name in io_names(graph)}
    inputs = [names.get(id(v), v.name) for v in graph.inputs]
    outputs = [names.get(id(v), v.name) for v in graph.outputs]
    past = {name: ((v.shape[1], v.shape[3]), v.dtype.torch) for name, v in zip(inputs, graph.inputs)
            if _PAST.fullmatch(name) and v.rank == 4}
    info = graph.meta.get("kv_cache", {})
    if backend == "torch":
        from slimgraph.api import to_torch

        module = to_torch(graph).eval()

        def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                result = module(*(feeds[n] for n in inputs))
            return dict(zip(outputs, result if isinstance(result, tuple) else (result,)))

        return Step(inputs, past, run, info.get("eos_token_id"), info.get("pad_token_id"))
    from slimgraph.api import to_onnx

    return _onnx_step(to_onnx(graph))


def _onnx_step(model: Any) -> Step:
    import onnx
    import onnxruntime as ort

    from slimgraph.onnx_proto import KV_CACHE_METADATA

    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise SlimgraphError(f"{model}: no such ONNX file")
        meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        source = str(model)
    elif isinstance(model, onnx.ModelProto):
        meta = {p.key: p.value for p in model.metadata_props}
        source = model.SerializeToString()
    else:
        raise SlimgraphError(f"generate takes an ONNX path or ModelProto, or a slimgraph Graph; "
                             f"got {type(model).__name__}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise SlimgraphError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
    inputs = [i.name for i in session.get_inputs()]
    past = {}
    for i in session.get_inputs():
        if _PAST.fullmatch(i.name):
            heads, head_dim = i.shape[1], i.shape[3]
            dtype = _NUMPY_OF.get(i.type)
            if not (isinstance(heads, int) and isinstance(head_dim, int)) or dtype is None:
                raise SlimgraphError(f"input {i.name} is {i.type} {i.shape}: generate needs [batch, heads, "
                                     "past, head_dim] with heads and head_dim fixed, in float16/32/64")
            past[i.name] = ((heads, head_dim), torch.from_numpy(np.zeros(0, dtype)).dtype)
    output_names = [o.name for o in session.get_outputs()]
    info = json.loads(meta.get(KV_CACHE_METADATA, "{}"))

    def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = session.run(output_names, {n: feeds[n].numpy() for n in inputs})
        return {n: torch.from_numpy(r) for n, r in zip(output_names, result)}

    return Step(inputs, past, run, info.get("eos_token_id"), info.get("pad_token_id"))


def _token_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(t) for t in (x if isinstance(x, (list, tuple)) else [x])]


def decode(step: Step, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
           eos_token_id: Any = "default", pad_token_id: Any = "default") -> torch.Tensor:
    """Greedy decoding: ``input_ids`` followed by up to ``max_new_tokens`` tokens, [batch, seq + new]."""
    from slimgraph.frontends.torch.kv_cache import positions_of

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise SlimgraphError("input_ids must be an integer tensor [batch, seq]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SlimgraphError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    if mask.shape != input_ids.shape:
        raise SlimgraphError(f"attention_mask is {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
    ends = _token_list(step.eos_token_id if eos_token_id == "default" else eos_token_id)
    pad = step.pad_token_id if pad_token_id == "default" else pad_token_id
    pad = pad if pad is not None else (ends[0] if ends else None)
    tokens, ids = input_ids.to(torch.long), input_ids.to(torch.long)
    past = {name: torch.zeros(batch, heads, 0, dim, dtype=dtype) for name, ((heads, dim), dtype) in step.past.items()}
    running = torch.ones(batch, dtype=torch.bool)
    for _ in range(max_new_tokens):
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        if "position_ids" in step.inputs:
            feeds["position_ids"] = positions_of(mask, ids.shape[1])
        out = step.run(feeds)
        chosen = out["logits"][:, -1].argmax(-1)
        if ends:
            chosen = torch.where(running, chosen, torch.full_like(chosen, pad))
            running &= ~torch.isin(chosen, torch.tensor(ends))
        tokens = torch.cat([tokens, chosen[:, None]], 1)
        ids = chosen[:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1)
        past = {name: out[name.replace("past_key_values", "present")] for name in past}
        if ends and not running.any():
            break
    return tokens


def generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
             attention_mask: torch.Tensor | None = None, backend: str = "onnxruntime",
             eos_token_id: Any = "default", pad_token_id: Any = "default") -> torch.Tensor:
    """Greedy decoding with the cached step graph ``model``: a path to its ONNX file, an ONNX
    ModelProto, or a slimgraph Graph (``backend`` "onnxruntime" or "torch"). End and pad tokens
    default to the model's own (recorded at import, and in the ONNX file's metadata)."""
    if backend not in BACKENDS:
        raise SlimgraphError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if isinstance(model, Graph):
        step = _graph_step(model, backend)
    elif backend == "torch":
        raise SlimgraphError("backend='torch' runs a slimgraph Graph (result.generate); an ONNX file runs in "
                             "onnxruntime")
    else:
        step = _onnx_step(model)
    return decode(step, input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id)
