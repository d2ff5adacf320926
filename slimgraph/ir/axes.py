"""Axis attributes in one canonical sign.

torch counts axes from the end (``softmax(x, dim=-1)``), ONNX files count them either way, passes
write whichever they like; the same op would print ``axis=-1`` from one frontend and ``axis=3``
from another. ``Graph.create_node`` therefore stores every axis-like attribute of the ops below as
its non-negative index (``axis % rank``), so one computation prints one way whoever built it. An
axis outside [-rank, rank) is left as it is: inference then names the error.

The rank an attribute counts in is input 0's (``in``), or output 0's (``out``: unsqueeze's axes
index the result).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimgraph.ir.node import Node

_IN_AXIS = ("softmax", "log_softmax", "concat", "split", "select", "gather", "take", "gather_elements", "scatter",
            "cumsum", "topk", "sort", "quantize_linear", "dequantize_linear", "fake_quant")
_IN_AXES = ("slice", "squeeze", "mean", "sum", "amax", "amin", "prod", "any", "var", "argmax", "argmin", "index",
            "index_put")

# op -> {attribute: the port whose rank it counts in}
AXIS_ATTRS: dict[str, dict[str, str]] = {
    **{op: {"axis": "in"} for op in _IN_AXIS},
    **{op: {"axes": "in"} for op in _IN_AXES},
    "unsqueeze": {"axes": "out"},
    "flip": {"dims": "in"},
    "roll": {"dims": "in"},
    "permute": {"perm": "in"},
    "flatten": {"start": "in", "end": "in"},
    "diagonal": {"dim1": "in", "dim2": "in"},
}


def _canonical(value: Any, rank: int) -> Any:
    if type(value) is int:
        return value + rank if -rank <= value < 0 else value
    if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        return [_canonical(v, rank) for v in value]
    return value  # None (a per-tensor quantizer), or something inference refuses


def normalize_axes(node: Node) -> None:
    """Rewrite ``node``'s axis attributes (see AXIS_ATTRS) as non-negative indices, in place."""
    for attr, port in AXIS_ATTRS.get(node.op, {}).items():
        values = node.inputs if port == "in" else node.outputs
        ref = values[0] if values else None
        if attr in node.attrs and ref is not None and ref.shape is not None:
            node.attrs[attr] = _canonical(node.attrs[attr], len(ref.shape))
