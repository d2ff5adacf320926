"""How a torch model becomes an fx graph: torch.fx (fast) or torch.export decomposed to Core ATen.

torch.fx records the calls a forward makes (modules, functions, Tensor methods) in 0.03 s for a
resnet50, but fails on data-dependent Python control flow. torch.export handles those, then
``run_decompositions`` lowers everything to torch's Core ATen opset, except the ops in ``KEEP``:
the ones the IR has canonical forms for (a decomposed linear would come back as a transpose and
an addmm, which pruning and quantization no longer recognize as a layer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

aten = torch.ops.aten


def _overloads(*names: str) -> list[torch._ops.OpOverload]:
    """OpOverloads by "name.overload" (default when none), skipping ones this torch lacks."""
    found = []
    for full in names:
        name, _, overload = full.partition(".")
        packet = getattr(aten, name, None)
        op = getattr(packet, overload or "default", None) if packet is not None else None
        if op is not None:
            found.append(op)
    return found


# Composite ops kept whole through run_decompositions: each has a handler mapping it to one
# canonical IR op (the converter's coverage test checks that).
KEEP = _overloads(
    "linear", "matmul", "conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding",
    "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input",
    "layer_norm", "group_norm", "batch_norm", "instance_norm",
    "scaled_dot_product_attention", "silu", "hardswish", "hardsigmoid", "softplus", "mish", "prelu", "selu",
    "log_sigmoid", "pad", "roll",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d",
    "upsample_nearest1d.vec", "upsample_nearest3d.vec", "upsample_linear1d.vec", "upsample_bicubic2d.vec",
    "upsample_trilinear3d.vec",
)


def decompositions() -> dict:
    table = torch.export.default_decompositions()
    for op in KEEP:
        table.pop(op, None)
    return table


def _converts_as_is(graph: torch.fx.Graph) -> bool:
    """Whether every op of an exported graph already has a handler (no decomposition needed)."""
    from slimgraph.frontends.torch.ops import find_handler

    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and find_handler("call_function", node.target) is None:
            return False
        if node.op in ("call_module", "call_method"):
            return False
    return True


def trace_fx(model: torch.nn.Module, constants: dict[str, Any] | None = None) -> torch.fx.Graph:
    """torch.fx.symbolic_trace without wrapping the result in a GraphModule: its generated code is
    never run here, and the submodules it would hold are the model's own. ``constants``: arguments
    traced as these values (fx's concrete_args)."""
    return torch.fx.Tracer().trace(model, concrete_args=constants or None)


def lower(program: torch.export.ExportedProgram, decompose: bool | None = None
          ) -> tuple[torch.fx.GraphModule, bool]:
    """The program's unlifted module decomposed to Core ATen (but KEEP), and whether it was. With
    ``decompose`` None only where some op has no handler: decomposing costs as much as exporting.
    A handler can still refuse its arguments (a topk that is not sorted); a caller whose undecomposed
    module converts to opaque nodes lowers it again with ``decompose=True``."""
    decomposed = decompose if decompose is not None else not _converts_as_is(program.graph)
    if decomposed:
        program = program.run_decompositions(decompositions())
    return program.module(check_guards=False), decomposed


def convert_program(program: torch.export.ExportedProgram, lowered: tuple[torch.fx.GraphModule, bool],
                    convert: Callable[[torch.fx.GraphModule], Any]) -> Any:
    """``convert(module)`` (an IR graph, or None) of the program ``lowered`` (``lower(program)``).
    Where it was not decomposed and a handler refused its arguments there (an opaque node, or a
    SlimgraphError: a symbolic size it cannot keep), converted again decomposed: whichever leaves
    fewer opaque nodes (the first where decomposing fails)."""
    from slimgraph.errors import SlimgraphError
    from slimgraph.ir import OPAQUE

    def opaque(graph: Any) -> int:
        return sum(1 for n in graph.nodes if n.op == OPAQUE)

    module, decomposed = lowered
    try:
        first, error = convert(module), None
    except SlimgraphError as exc:
        if decomposed:
            raise
        first, error = None, exc
    if decomposed or (first is not None and not opaque(first)):
        return first
    try:
        second = convert(lower(program, decompose=True)[0])
    except Exception:
        second = None
    if second is not None and (first is None or opaque(second) < opaque(first)):
        return second
    if error is not None:
        raise error
    return first


def export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None
           ) -> tuple[torch.export.ExportedProgram, list[str]]:
    """torch.export: the program (``lower`` gives its module, placeholders in the order of the
    flattened (args, kwargs)) and the pytree path of each output, e.g. "['logits']"."""
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    spec = program.call_spec.out_spec
    structure = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths = [path for path, _ in pytree.tree_flatten_with_path(structure)[0]]
    return program, paths


def output_names(paths: list) -> list[str | None]:
    """Graph output names from pytree paths when the model returns a mapping (a dict or a
    Hugging Face ModelOutput): its keys, e.g. "logits". Tuples and single tensors keep the names
    of the nodes that compute them."""
    names: list[str | None] = []
    for path in paths:
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        names.append("_".join(str(k) for k in keys) if keys and isinstance(keys[0], str) else None)
    return names


class _Call(torch.nn.Module):
    """A function call with its tensor arguments as the module's inputs (for torch.export)."""

    def __init__(self, fn: Any, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, *tensors: torch.Tensor) -> Any:
        from slimgraph.ir.opaque import fill

        return self.fn(*fill(self.args, list(tensors)), **fill(self.kwargs, list(tensors)))


def export_call(fn: Any, args: tuple, kwargs: dict, tensors: list[torch.Tensor], batched: list[bool]
                ) -> torch.export.ExportedProgram | None:
    """One call (``args``/``kwargs`` templates whose Slots index ``tensors``) exported, with the batch
    dim of the ``batched`` tensors dynamic so the body keeps it symbolic (traced at batch + 1: export
    specializes sizes 0 and 1). None when it cannot be exported."""
    from torch.export import Dim

    examples = tuple(torch.cat([t, t[:1]]) if b else t for t, b in zip(tensors, batched))
    specs = tuple({0: Dim.AUTO} if b else None for b in batched)
    module = _Call(fn, args, kwargs)
    for inputs, shapes in ((examples, (specs,)), (tuple(tensors), None)):  # fall back to static shapes
        try:
            return torch.export.export(module, inputs, dynamic_shapes=shapes, strict=False)
        except Exception:
            continue
    return None
