"""Mixed precision: ``fp16`` and ``bf16`` lower float32 compute to a 16-bit float type.

What changes:
  * float32 constants (weights) used only by lowered nodes become 16-bit constants; one used
    by both a lowered and a kept node gets a 16-bit copy for the lowered uses;
  * graph inputs stay float32, with one cast to 16 bits after each; graph outputs that were
    float32 are cast back to float32 once;
  * numerically sensitive ops (``KEEP_FP32``: softmax, log_softmax, layer/group/batch norm,
    lrn, mean, sum, prod, tan, attention, whose softmax is inside it, grid_sample, whose kernel
    computes its sampling coordinates in its input's dtype), opaque nodes, quantization ops,
    the ``keep`` list (node names or op types) and, with ``keep_first_last``, the first and
    last conv/linear run in float32.

Casts are placed once per (value, dtype) and always cast from the value's origin, so a value
is never cast to 16 bits and back again: a kept consumer of a float32 value reads it directly.
Integer and bool tensors, float64 values and values that were already 16-bit are untouched,
so a graph that is already in 16 bits, or one this pass has produced, comes out unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from slimgraph.errors import PassError
from slimgraph.ir import Graph, Node, Value, get_op, run
from slimgraph.ir.dtypes import DType
from slimgraph.ir.ops import OPAQUE, infer_types
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass

# Ops computed in float32 regardless: wide dynamic range or long accumulations.
KEEP_FP32 = frozenset({
    "softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm", "lrn", "mean", "sum",
    "tan",  # its poles amplify 16-bit rounding without bound
    "prod",  # a product of many factors leaves 16 bits' range (0.3 ** 24 is 3e-13)
    "attention",  # computes a softmax inside (both backends emit it as one unit)
    # unnormalizes its grid to pixels in the input dtype: 16 bits hold (1 + x) / 2 * (size - 1) to
    # (size - 1) * 2^-12 px, moving a nearest sample across a pixel's edge (x = -1e-4, size 4: pixel 2
    # for 1) and a bilinear one by 0.5 px at 1024; onnxconverter-common keeps Resize / RoiAlign float32 alike
    "grid_sample",
})
# Ops whose 16-bit result is off by the absolute rounding of their input: a large angle stays float32.
PERIODIC = frozenset({"sin", "cos"})
# Quantization ops work on float32 scales and activations: left exactly as they are.
QUANT_OPS = frozenset({"quantize_linear", "dequantize_linear", "fake_quant"})
_WEIGHTED = ("conv", "linear")
_F32 = DType.float32


@dataclass
class _LowPrecision(Pass):
    """Shared implementation; subclasses set ``low`` and ``name``."""

    low: ClassVar[DType]
    exact: ClassVar[bool] = False
    keep: list[str] = field(default_factory=list)
    keep_first_last: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keep, str):
            self.keep = [self.keep]
        if not isinstance(self.keep, (list, tuple)) or not all(isinstance(k, str) and k for k in self.keep):
            raise PassError(f"pass {self.name!r} option 'keep': {self.keep!r} must be a list of node names "
                            "or op types")
        self.keep = list(self.keep)
        if not isinstance(self.keep_first_last, bool):
            raise PassError(f"pass {self.name!r} option 'keep_first_last': {self.keep_first_last!r} "
                            "is not a boolean")

    # ------------------------------------------------------------------ classification
    def _kept_nodes(self, graph: Graph) -> set[int]:
        names = {n.name for n in graph.nodes}
        for k in self.keep:
            if k not in names and k != OPAQUE and get_op(k) is None:
                raise PassError(f"pass {self.name!r} option 'keep': {k!r} is neither a node name in the "
                                "graph nor an op type")
        keep = set(self.keep)
        kept = {id(n) for n in graph.nodes
                if n.op in KEEP_FP32 or n.op in QUANT_OPS or n.op == OPAQUE or n.op in keep or n.name in keep}
        if self.keep_first_last:
            weighted = [n for n in graph.nodes if n.op in _WEIGHTED]
            if weighted:
                kept |= {id(weighted[0]), id(weighted[-1])}
        return kept

    def _floats(self, node: Node) -> list[int]:
        """Indices of the inputs this pass may retype: float32 or the low dtype."""
        return [i for i, v in enumerate(node.inputs) if v is not None and v.dtype in (_F32, self.low)]

    # ------------------------------------------------------------------ the rewrite
    def _out_of_range(self, graph: Graph, ctx: PassContext) -> list[str]:
        """Nodes that read or write a value beyond half the low dtype's largest finite number on the
        example inputs (float16 overflows at 65504, where float32 does not), a value that is not
        zero but wholly below its smallest normal number (6.1e-5: float16 flushes it to zero or keeps
        a few bits), or compute the angle of a sin / cos past 8 times their output's peak, or of a tan:
        they stay float32."""
        limit, tiny = torch.finfo(self.low.torch).max / 2, torch.finfo(self.low.torch).tiny
        if ctx.example_inputs is None or limit >= torch.finfo(torch.float32).max / 2:
            return []
        values = [v for v in graph.inputs if v.dtype == _F32] + [
            v for n in graph.nodes for v in n.outputs if v.dtype == _F32]
        _, captured = run(graph, list(ctx.example_inputs), capture=values)
        peaks = {id(v): float(t.abs().max()) for v, t in captured.items() if t.numel()}
        big = {k for k, peak in peaks.items() if peak > limit or 0 < peak < tiny}
        kept = {n.name for n in graph.nodes if any(v is not None and id(v) in big for v in (*n.inputs, *n.outputs))}
        # the angle of a periodic function and all it is computed from: 16 bits hold it to 2^-11 of its peak,
        # which moves sin / cos by as much: kept where that is past 2^-8 of their own peak (an angle past 8:
        # sin(500) is noise; or sin / cos all near a zero: angles near pi / 2, held to 5e-4, leave cos's 5e-3
        # 10% off); tan's anywhere (1 / cos^2 amplifies its rounding without bound near a pole)
        periodic = [n for n in graph.nodes if n.op == "tan" or n.op in PERIODIC and
                    peaks.get(id(n.inputs[0]), 0) > 8 * peaks.get(id(n.outputs[0]), 1)]
        kept |= {n.name for n in periodic}
        angles, walked = [n.inputs[0] for n in periodic], set()
        while angles:  # past what is kept already for range too: its own inputs may not be
            producer = angles.pop().producer
            if producer is not None and producer.name not in walked and any(v.dtype == _F32 for v in producer.outputs):
                walked.add(producer.name)
                kept.add(producer.name)
                angles += [v for v in producer.inputs if v is not None]
        return [n.name for n in graph.nodes if n.name in kept]

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        low = self.low
        kept = self._kept_nodes(graph)
        stats = {"lowered_nodes": 0, "kept_fp32": 0, "constants": 0, "casts": 0}
        over = set(self._out_of_range(graph, ctx))
        if over:
            kept |= {id(n) for n in graph.nodes if n.name in over}
            stats["kept_for_range"] = sorted(over)

        def mode(node: Node) -> str:
            if node.op == "cast" or not self._floats(node):
                return "neutral"
            return "keep" if id(node) in kept else "low"

        modes = {id(n): mode(n) for n in graph.nodes}
        # 1. constants: float32 weights read by lowered nodes become low-precision constants
        for const in list(graph.constants.values()):
            if const.dtype != _F32 or any(o is const for o in graph.outputs):
                continue
            low_uses = [u for u in const.uses if modes[id(u.node)] == "low"]
            if not low_uses:
                continue
            copy = graph.add_constant(f"{const.name}_{low.short}", const.const_value.to(low.torch),
                                      trainable=const.meta.get("trainable", False))
            for u in low_uses:
                u.node.set_input(u.index, copy)
            if not const.uses:
                graph.remove_constant(const)
            stats["constants"] += 1

        # 2. walk the nodes: cast inputs once per (origin value, dtype), re-infer outputs
        origin: dict[int, Value] = {}  # cast output -> the value it was cast from
        casts: dict[tuple[int, DType], Value] = {}
        was_f32 = {id(v) for v in graph.values() if v.dtype == _F32}

        def as_dtype(value: Value, dtype: DType, before: Node | None) -> Value:
            root = origin.get(id(value), value)
            if root.dtype == dtype:
                return root
            key = (id(root), dtype)
            if key not in casts:
                node = graph.create_node("cast", [root], {"dtype": dtype.name}, name=f"{root.name}_to_{dtype.short}",
                                         before=before, meta={"origin": f"{self.name}:cast"})
                casts[key] = node.output
                origin[id(node.output)] = root
                stats["casts"] += 1
            return casts[key]

        for node in graph.nodes:
            m = modes.get(id(node), "neutral")
            if m == "neutral":
                continue
            for i in self._floats(node):
                v = node.inputs[i]
                if m == "low" and v.dtype == _F32:
                    node.set_input(i, as_dtype(v, low, node))
                elif m == "keep" and v.dtype == low and id(origin.get(id(v), v)) in was_f32:
                    node.set_input(i, as_dtype(v, _F32, node))
            stats["lowered_nodes" if m == "low" else "kept_fp32"] += 1
            if m == "low":
                for value, (shape, dtype) in zip(node.outputs, infer_types(node)):
                    value.shape, value.dtype = shape, dtype

        # 3. graph outputs that were float32 leave as float32
        outputs = []
        for v in graph.outputs:
            if v.dtype == low and id(origin.get(id(v), v)) in was_f32:
                v = as_dtype(v, _F32, None)
            outputs.append(v)
        if any(a is not b for a, b in zip(outputs, graph.outputs)):
            graph.set_outputs(outputs)
        changed = stats["constants"] + stats["casts"] > 0
        if changed:
            graph.touch()
        return PassResult(changed, stats)


@register_pass
@dataclass
class Float16(_LowPrecision):
    """Run float32 compute in float16, keeping numerically sensitive ops in float32.

    Options: ``keep=[...]`` node names or op types also kept in float32;
    ``keep_first_last`` (default False) keeps the first and last conv/linear in float32.
    """

    name = "fp16"
    description = "float16 weights and compute; softmax, norms, reductions (and optionally first/last layer) in fp32"
    low = DType.float16


@register_pass
@dataclass
class BFloat16(_LowPrecision):
    """Run float32 compute in bfloat16, keeping numerically sensitive ops in float32 (options as ``fp16``)."""

    name = "bf16"
    description = "bfloat16 weights and compute; softmax, norms, reductions (and optionally first/last layer) in fp32"
    low = DType.bfloat16
