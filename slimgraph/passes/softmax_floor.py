"""``floor-softmax``: keep masked softmax inputs out of the range where exp gives denormals.

An attention mask adds a huge negative number (torch.finfo(float32).min in Hugging Face models)
to the scores it hides. Softmax then takes exp of values far below -87, whose results are
denormal (or flush to zero through one): onnxruntime's CPU exp runs about 10x slower on them on
Intel Xeons (bench/transformers.py's profile: Softmax was a third of MiniLM's int8 time), and x86
denormal arithmetic is slow wherever the thread does not flush them.

``softmax(x) == softmax(max(x, max(x) - 80))`` to float32 precision: an entry below the row's max
minus 80 has probability under e^-80 (about 1.8e-35) either way, far below what float32 resolves
next to the row's largest probability (at least 1 / row length). A row that is all -inf stays
all -inf (its softmax is NaN as before, and the where() after it that attention carries
makes the row 0, as torch's attention does). Three cheap ops (a row max, a subtraction, a max) per softmax.

A masked ``attention`` node holds its softmax inside: it is written out (attention.py's
``write_out``, the ops the ONNX backend writes for it) so that its softmax can be floored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgraph.errors import PassError
from slimgraph.ir import Graph
from slimgraph.passes.attention import write_out
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass

MASKING_OPS = ("add", "sub", "where")  # how masks reach a softmax


@register_pass
@dataclass
class FloorSoftmax(Pass):
    """Clamp each masked softmax's input at its max minus ``margin`` (exact in float32).

    Options: margin (how far below the max an input may go: exp(-margin) must stay a normal float
    and negligible next to 1, so 20 to 87)."""

    name = "floor-softmax"
    description = "clamp masked softmax inputs at row max - 80: no denormal exps (slow on x86), exact in float32"
    exact = True

    margin: float = 80.0

    def __post_init__(self) -> None:
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 20 <= self.margin <= 87:
            raise PassError(f"pass 'floor-softmax' option 'margin': {self.margin!r} is not in [20, 87]")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        written_out = []
        for node in graph.nodes:
            if node.op == "attention" and len(node.inputs) > 3 and node.inputs[0].dtype.is_float:
                written_out.append(node.name)
                write_out(graph, node, self.name)
        floored = []
        for node in graph.nodes:
            x = node.inputs[0] if node.op == "softmax" else None
            if x is None or x.producer is None or x.producer.op not in MASKING_OPS \
                    or x.dtype is None or not x.dtype.is_float:
                continue  # a floored input is made by `maximum`: the pass does not apply twice
            axis = node.attrs["axis"]
            row_max = graph.create_node("amax", [x], {"axes": [axis], "keepdim": True}, name=f"{node.name}_row_max",
                                        before=node, meta={"origin": self.name})
            margin = graph.add_constant(f"{node.name}_margin", torch.tensor(self.margin, dtype=x.dtype.torch))
            floor = graph.create_node("sub", [row_max.outputs[0], margin], name=f"{node.name}_floor", before=node,
                                      meta={"origin": self.name})
            clamped = graph.create_node("maximum", [x, floor.outputs[0]], name=f"{node.name}_floored", before=node,
                                        meta={"origin": self.name})
            node.set_input(0, clamped.outputs[0])
            floored.append(node.name)
        stats = {"floored": floored}
        if written_out:
            stats["written_out"] = written_out
        return PassResult(bool(floored or written_out), stats)
