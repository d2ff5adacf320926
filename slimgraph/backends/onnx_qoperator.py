"""QDQ -> QOperator: write the integer kernels of a folded int8 ONNX model into the file.

``to_onnx`` writes int8 models in QDQ form: float ops between DequantizeLinear (DQ) and
QuantizeLinear (Q) nodes, which onnxruntime fuses into integer kernels when it loads the
model. ``to_qoperator`` rewrites such a model, units that fuse becoming the kernels themselves
(standard ONNX where it has them, onnxruntime's ``com.microsoft`` contrib ops elsewhere):

    DQ(x), DQ(w int8)[, DQ(b int32)] -> Conv -> Q              QLinearConv
    DQ(a), DQ(b) -> MatMul -> Q                                QLinearMatMul
    DQ(a), DQ(b) -> MatMul [-> Add(bias)], float out           MatMulIntegerToFloat   (com.microsoft)
    DQ(a), DQ(b)[, DQ(c int32)] -> Gemm [-> Q]                 QGemm                  (com.microsoft)
    DQ(a), DQ(b) -> Add | Mul -> Q                             QLinearAdd | QLinearMul (com.microsoft)
    DQ(x1), DQ(x2), ... -> Concat -> Q                         QLinearConcat          (com.microsoft)
    DQ(x) -> GlobalAveragePool | AveragePool | Sigmoid | LeakyRelu -> Q
                                                               QLinear<op>            (com.microsoft)
    DQ(x) -> MaxPool | Reshape | Flatten | Transpose ... -> Q  the op on the integers, where Q has the
                                                               DQ's parameters (Dropout as Identity)

A Relu or Clip between an op and its Q is folded away only where onnxruntime drops it too (the
rules, shared with the PyTorch backend, are in ``ort_fusion``). The integer operands must
be per tensor (weights per output channel, zero points 0), biases int32 on the grid input scale x
weight scale, and an op's output of the same integer type as its input (onnxruntime's kernels).
Anything else stays DQ -> float op -> Q, which onnxruntime still runs as it runs the QDQ form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from slimgraph.backends import ort_fusion

MS = "com.microsoft"

# ops that move or select integers unchanged: DQ -> op -> Q with equal parameters is op on the integers
_MOVERS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity",
           "Expand", "Dropout"}
# DQ(x) -> op -> Q with onnxruntime kernels QLinear<op> (com.microsoft), and the attributes each keeps
_UNARY = {"GlobalAveragePool": ("QLinearGlobalAveragePool", ()),
          "AveragePool": ("QLinearAveragePool", ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape",
                                                 "pads", "strides")),
          "Sigmoid": ("QLinearSigmoid", ()),
          "LeakyRelu": ("QLinearLeakyRelu", ("alpha",))}
_QRANGE = ort_fusion.QRANGE


@dataclass
class Quantized:
    """An integer tensor and its parameters (the inputs of the DQ or Q that reads or makes it)."""

    q: gs.Tensor
    scale: gs.Constant
    zero_point: gs.Constant | None
    axis: int | None  # None: per tensor

    @property
    def dtype(self) -> np.dtype | None:
        if self.zero_point is not None:
            return self.zero_point.values.dtype
        return np.dtype(self.q.dtype) if isinstance(self.q, gs.Constant) else None

    @property
    def per_tensor(self) -> bool:
        """Per-tensor 8-bit parameters, as every QLinear activation operand needs."""
        return self.axis is None and self.zero_point is not None and self.dtype in _QRANGE

    def same_as(self, other: Quantized) -> bool:
        return self.per_tensor and other.per_tensor and self.dtype == other.dtype \
            and np.array_equal(self.scale.values, other.scale.values) \
            and np.array_equal(self.zero_point.values, other.zero_point.values)


def _params(node: gs.Node, tensor: gs.Tensor) -> Quantized | None:
    """The parameters of a Q or DQ node, if they are constants."""
    scale = node.inputs[1]
    zero_point = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if not isinstance(scale, gs.Constant) or (zero_point is not None and not isinstance(zero_point, gs.Constant)):
        return None
    if node.attrs.get("block_size", 0) or scale.values.ndim > 1:
        return None
    axis = None
    if scale.values.ndim == 1:
        axis = node.attrs.get("axis", 1)
        rank = len(tensor.shape) if isinstance(tensor, gs.Constant) else None  # without loading the data
        if axis < 0 and rank is not None:
            axis += rank
    return Quantized(tensor, scale, zero_point, axis)


def dequantized(t: gs.Tensor) -> Quantized | None:
    """Where ``t`` is DQ(q): q and its parameters."""
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear" \
            or t.inputs[0].domain not in (None, "", "ai.onnx"):
        return None
    return _params(t.inputs[0], t.inputs[0].inputs[0])


def _bounds(node: gs.Node) -> tuple[str, float | None, float | None] | None:
    """(op, lo, hi) of a Relu or a Clip with constant (or absent) bounds; None for anything else."""
    if node.op == "Relu":
        return "relu", 0.0, None
    if node.op != "Clip" or node.attrs:
        return None
    bounds = []
    for t in node.inputs[1:3]:
        if not t.name:
            bounds.append(None)
        elif isinstance(t, gs.Constant) and t.values.size == 1:
            bounds.append(float(t.values.reshape(())))
        else:
            return None
    bounds += [None] * (2 - len(bounds))
    return "clip", bounds[0], bounds[1]


class _Rewriter:
    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.outputs = {id(t) for t in graph.outputs}
        self.names = set(graph.tensors())
        self.done: set[int] = set()  # ids of nodes replaced (they are dead now; cleanup removes them)
        self.counts: dict[str, int] = {}

    def sole_reader(self, t: gs.Tensor) -> gs.Node | None:
        if id(t) in self.outputs or len(t.outputs) != 1:
            return None
        return t.outputs[0]

    def quantized_output(self, t: gs.Tensor) -> tuple[gs.Node, Quantized] | None:
        """The Q that alone reads ``t`` (through Relu/Clip nodes it makes redundant) and its parameters."""
        bounds: list[tuple[str, float | None, float | None]] = []
        reader = self.sole_reader(t)
        while reader is not None and _bounds(reader) is not None:
            bounds.append(_bounds(reader))
            reader = self.sole_reader(reader.outputs[0])
        if reader is None or reader.op != "QuantizeLinear" or reader.domain not in (None, "", "ai.onnx"):
            return None
        out = _params(reader, reader.outputs[0])
        if out is None or not out.per_tensor:
            return None
        if not ort_fusion.clamps_redundant(bounds, float(out.scale.values), int(out.zero_point.values), out.dtype):
            return None  # a Relu/Clip that onnxruntime keeps (it may clip inside the quantizer's range)
        return reader, out

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return gs.Constant(name, np.ascontiguousarray(values))

    def replace(self, old: gs.Node, op: str, inputs: list[gs.Tensor], end: gs.Node, domain: str = "",
                **attrs) -> None:
        """A node ``op`` that makes ``end``'s output (the Q of the unit that ``old`` starts)."""
        out = end.outputs[0]
        end.outputs.clear()
        self.graph.nodes.append(gs.Node(op, old.name, attrs, inputs, [out], domain=domain or None))
        self.done.update((id(old), id(end)))
        self.counts[op] = self.counts.get(op, 0) + 1

    # ---------------------------------------------------------------------------- units
    def conv(self, node: gs.Node) -> None:
        x, w = dequantized(node.inputs[0]), dequantized(node.inputs[1])
        if x is None or w is None or not x.per_tensor or not self.constant_weight(w, 0) \
                or not ort_fusion.weight_fuses(w.q.dtype, w.zero_point.values):
            return
        bias = self.int32_bias(node.inputs[2], x, w) if len(node.inputs) > 2 and node.inputs[2].name else []
        found = self.quantized_output(node.outputs[0])
        if bias is None or found is None or found[1].dtype != x.dtype:
            return
        end, y = found
        self.replace(node, "QLinearConv", [x.q, x.scale, x.zero_point, w.q, w.scale, w.zero_point, y.scale,
                                           y.zero_point, *bias], end, **node.attrs)

    def gemm(self, node: gs.Node) -> None:
        a, b = dequantized(node.inputs[0]), dequantized(node.inputs[1])
        trans_b = node.attrs.get("transB", 0)
        if a is None or b is None or not a.per_tensor or not self.constant_weight(b, 0 if trans_b else 1):
            return
        c: list[gs.Tensor] = []
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = self.int32_bias(node.inputs[2], a, b)
            if c is None or node.attrs.get("beta", 1.0) != 1.0:
                return
        found = self.quantized_output(node.outputs[0])
        attrs = {k: node.attrs[k] for k in ("alpha", "transA", "transB") if k in node.attrs}
        inputs = [a.q, a.scale, a.zero_point, b.q, b.scale, b.zero_point]
        if found is not None and found[1].dtype == a.dtype:
            end, y = found
            self.replace(node, "QGemm", inputs + [c[0] if c else gs.Variable.empty(), y.scale, y.zero_point], end,
                         domain=MS, **attrs)
        elif self.float_output(node):
            self.replace(node, "QGemm", inputs + c, node, domain=MS, **attrs)

    def matmul(self, node: gs.Node) -> None:
        a, b = dequantized(node.inputs[0]), dequantized(node.inputs[1])
        if a is None or b is None or not a.per_tensor:
            return
        if not b.per_tensor and not self.constant_weight(b, 1):
            return
        found = self.quantized_output(node.outputs[0])
        if found is not None and found[1].dtype == a.dtype:
            end, y = found
            self.replace(node, "QLinearMatMul", [a.q, a.scale, a.zero_point, b.q, b.scale, b.zero_point, y.scale,
                                                 y.zero_point], end)
            return
        if not self.float_output(node):
            return
        inputs = [a.q, b.q, a.scale, b.scale, a.zero_point, b.zero_point]
        add = self.sole_reader(node.outputs[0])
        bias = self.float_bias(add, node.outputs[0], b) if add is not None else None
        if bias is not None:
            self.replace(node, "MatMulIntegerToFloat", inputs + [bias], add, domain=MS)
        else:
            self.replace(node, "MatMulIntegerToFloat", inputs, node, domain=MS)

    def binary(self, node: gs.Node) -> None:
        a, b = dequantized(node.inputs[0]), dequantized(node.inputs[1])
        found = self.quantized_output(node.outputs[0])
        if a is None or b is None or found is None or not a.per_tensor or not b.per_tensor \
                or not a.dtype == b.dtype == found[1].dtype:
            return
        end, y = found
        self.replace(node, f"QLinear{node.op}", [a.q, a.scale, a.zero_point, b.q, b.scale, b.zero_point, y.scale,
                                                 y.zero_point], end, domain=MS)

    def concat(self, node: gs.Node) -> None:
        xs = [dequantized(t) for t in node.inputs]
        found = self.quantized_output(node.outputs[0])
        if found is None or not all(x is not None and x.per_tensor and x.dtype == found[1].dtype for x in xs):
            return
        end, y = found
        inputs = [y.scale, y.zero_point] + [t for x in xs for t in (x.q, x.scale, x.zero_point)]
        self.replace(node, "QLinearConcat", inputs, end, domain=MS, axis=node.attrs["axis"])

    def unary(self, node: gs.Node) -> None:
        x = dequantized(node.inputs[0])
        found = self.quantized_output(node.outputs[0])
        if x is None or found is None or not x.per_tensor or x.dtype != found[1].dtype:
            return
        if any(d != 1 for d in node.attrs.get("dilations", [])):
            return
        op, kept = _UNARY[node.op]
        attrs = {k: node.attrs[k] for k in kept if k in node.attrs}
        if op in ("QLinearGlobalAveragePool", "QLinearAveragePool"):
            attrs["channels_last"] = 0
        end, y = found
        self.replace(node, op, [x.q, x.scale, x.zero_point, y.scale, y.zero_point], end, domain=MS, **attrs)

    def mover(self, node: gs.Node) -> None:
        x = dequantized(node.inputs[0])
        q = self.sole_reader(node.outputs[0])
        if x is None or q is None or q.op != "QuantizeLinear" or any(o.outputs for o in node.outputs[1:]):
            return
        y = _params(q, q.outputs[0])
        if y is None or not x.same_as(y):
            return
        if node.op == "Dropout":  # inference: the identity
            self.replace(node, "Identity", [x.q], q)
        else:
            self.replace(node, node.op, [x.q, *node.inputs[1:]], q, **node.attrs)

    # ---------------------------------------------------------------------------- operands
    def constant_weight(self, w: Quantized, channel_axis: int) -> bool:
        """An int8/uint8 constant, per tensor or per ``channel_axis`` channel (zero points all 0)."""
        if not isinstance(w.q, gs.Constant) or np.dtype(w.q.dtype) not in _QRANGE:
            return False
        if w.axis is None:
            return w.zero_point is not None
        if not (w.axis == channel_axis and (channel_axis == 0 or len(w.q.shape) == 2)):
            return False
        if w.zero_point is None:  # ONNX's default zero point; the QLinear ops want it spelled out
            w.zero_point = self.constant(f"{w.q.name}_zero_point", np.zeros(w.scale.values.shape, w.q.dtype))
        return not w.zero_point.values.any()

    def int32_bias(self, t: gs.Tensor, x: Quantized, w: Quantized) -> list[gs.Tensor] | None:
        """[the int32 constant] where ``t`` is DQ(int32) on the grid x scale * w scale, else None."""
        b = dequantized(t)
        if b is None or not isinstance(b.q, gs.Constant) or b.q.values.dtype != np.int32 or b.q.values.ndim != 1 \
                or (b.zero_point is not None and b.zero_point.values.any()):
            return None
        if not ort_fusion.bias_on_grid(np.broadcast_to(b.scale.values, b.q.shape), x.scale.values, w.scale.values):
            return None
        return [b.q]

    def float_bias(self, add: gs.Node, t: gs.Tensor, b: Quantized) -> gs.Constant | None:
        """The float bias [N] that ``add`` adds to ``t`` (a MatMul's output), if it is a constant or
        the DQ of one; None if ``add`` is anything else."""
        if add.op != "Add" or len(add.inputs) != 2:
            return None
        other = add.inputs[1] if add.inputs[0] is t else add.inputs[0]
        n = b.q.shape[-1] if isinstance(b.q, gs.Constant) else None
        if isinstance(other, gs.Constant) and other.values.dtype == np.float32:
            values = other.values
        else:
            d = dequantized(other)
            if d is None or not isinstance(d.q, gs.Constant) or d.q.values.ndim != 1:
                return None
            zp = 0 if d.zero_point is None else d.zero_point.values.astype(np.float32)
            values = ((d.q.values.astype(np.float32) - zp) * d.scale.values).astype(np.float32)
        if values.ndim != 1 or n is None or values.shape[0] != n:
            return None
        return other if isinstance(other, gs.Constant) else self.constant(f"{other.name}_float", values)

    def float_output(self, node: gs.Node) -> bool:
        """Its output is read by no Q (where the unit did not fuse, the op had better stay float)."""
        return not any(r.op == "QuantizeLinear" for r in node.outputs[0].outputs)

    def run(self) -> dict[str, int]:
        handlers: dict[str, Callable[[gs.Node], None]] = {
            "Conv": self.conv, "Gemm": self.gemm, "MatMul": self.matmul, "Add": self.binary, "Mul": self.binary,
            "Concat": self.concat, **{op: self.unary for op in _UNARY}, **{op: self.mover for op in _MOVERS}}
        for node in list(self.graph.nodes):
            handler = handlers.get(node.op)
            if handler is not None and id(node) not in self.done and node.domain in (None, "", "ai.onnx") \
                    and node.outputs:
                handler(node)
        self.graph.cleanup().toposort()
        return self.counts


def to_qoperator(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The QOperator form of a QDQ model and how many nodes of each integer op it now has."""
    graph = gs.import_onnx(model)
    counts = _Rewriter(graph).run()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    out.producer_name = model.producer_name
    return out, counts
