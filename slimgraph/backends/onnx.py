"""IR Graph -> ONNX ModelProto (onnx.helper), checked by onnx.checker and runnable in onnxruntime.

Each canonical op has an emitter that appends ONNX nodes to a ``_Builder``; constants become
initializers. Opaque nodes imported from ONNX are written back as their original NodeProto;
opaque torch code has no ONNX form, and the backend lists every such node in one error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from slimgraph.errors import SlimgraphError, UnsupportedError
from slimgraph.ir import OPAQUE, DType, Graph, Node, Value
from slimgraph.ir.opdefs.nn import ceil_adds_no_window
from slimgraph.ir.opdefs.quant import QRANGE, qrange
from slimgraph.ir.symbolic import SymDim, python_expr
from slimgraph.onnx_proto import KV_CACHE_METADATA, outer_names

DEFAULT_OPSET = 17
MIN_OPSET = 13  # the oldest the emitters write; down to LEGACY_OPSET by onnx's version converter
LEGACY_OPSET = 7

_ONNX_DTYPE = {
    DType.float32: TensorProto.FLOAT, DType.float16: TensorProto.FLOAT16, DType.bfloat16: TensorProto.BFLOAT16,
    DType.float64: TensorProto.DOUBLE, DType.int64: TensorProto.INT64, DType.int32: TensorProto.INT32,
    DType.int8: TensorProto.INT8, DType.uint8: TensorProto.UINT8,
    DType.int16: TensorProto.INT16, DType.uint16: TensorProto.UINT16, DType.uint32: TensorProto.UINT32,
    DType.uint64: TensorProto.UINT64, DType.bool: TensorProto.BOOL,
}


def fill_tensor_proto(proto: TensorProto, tensor: torch.Tensor, name: str,
                      external: ExternalData | None = None) -> TensorProto:
    """Write a tensor into ``proto`` in place (one copy of the data: models can be GBs), or with
    ``external`` into the external data file, ``proto`` pointing there."""
    tensor = tensor.detach().cpu().contiguous()
    proto.name = name
    proto.dims.extend(tensor.shape)
    proto.data_type = TensorProto.BFLOAT16 if tensor.dtype == torch.bfloat16 else \
        _ONNX_DTYPE[DType.from_torch(tensor.dtype)]
    if external is not None and tensor.numel() * tensor.element_size() >= EXTERNAL_MIN_BYTES:
        external.store(proto, tensor)
    elif tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw bits
        proto.raw_data = tensor.view(torch.int16).numpy().tobytes()
    else:
        proto.raw_data = tensor.numpy().tobytes()
    return proto


EXTERNAL_MIN_BYTES = 1024  # tensors this large go to the external data file; smaller ones stay inline
EXTERNAL_ALIGN = 4096  # tensor offsets in the data file (page-aligned: onnxruntime can map them)
AUTO_EXTERNAL_BYTES = 1 << 30  # constants beyond this total are written as external data (protobuf's limit: 2 GiB)


class ExternalData:
    """The file beside an ONNX model that holds its large tensors: each written once, straight from
    the graph's constant (no second copy in a protobuf), at an aligned offset."""

    def __init__(self, file: Any, location: str) -> None:
        self.file, self.location = file, location

    def store(self, proto: TensorProto, tensor: torch.Tensor) -> None:
        offset = -self.file.tell() % EXTERNAL_ALIGN
        self.file.write(b"\0" * offset)
        offset = self.file.tell()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        self.file.write(memoryview(tensor.numpy()).cast("B"))
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)),
                           ("length", str(self.file.tell() - offset))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value


def constant_bytes(graph: Graph) -> int:
    return sum(v.const_value.numel() * v.const_value.element_size() for v in graph.constants.values())


class _Builder:
    def __init__(self, graph: Graph, opset: int, model: onnx.ModelProto, external: ExternalData | None = None) -> None:
        self.graph = graph
        self.external = external
        self.opset = opset
        self.nodes = model.graph.node  # appended to in place: no copies of large models
        self.initializers = model.graph.initializer
        self.names: dict[int, str] = {}
        self.used: set[str] = set()
        self.extra_opsets: dict[str, int] = {}
        self.node: Node | None = None
        self.symbols: dict[str, str] = {}  # symbol -> its size tensor, read once from an input's shape

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def name(self, value: Value | None) -> str:
        if value is None:
            return ""
        if id(value) not in self.names:
            self.names[id(value)] = self.fresh(value.name)
            if value.is_constant:
                fill_tensor_proto(self.initializers.add(), value.const_value, self.names[id(value)], self.external)
        return self.names[id(value)]

    def const(self, array: Any, base: str, dtype: Any = None) -> str:
        name = self.fresh(f"{self.node.name}_{base}" if self.node else base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def ints(self, values: Sequence[int], base: str) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), base)

    def sizes(self, values: Sequence[Any], base: str) -> str:
        """A 1-D int64 tensor of sizes: a constant, or computed at run time from the graph inputs'
        shapes where some are symbolic (SymDim)."""
        if not any(isinstance(v, SymDim) for v in values):
            return self.ints(values, base)
        parts = [self.size(v) if isinstance(v, SymDim) else self.ints([v], base) for v in values]
        return self.add("Concat", parts, 1, axis=0)[0]

    def size(self, value: Any) -> str:
        """One size as a 1-element int64 tensor: symbols read off the inputs' shapes, then the
        expression's arithmetic (+, *, floor division)."""
        import sympy

        expr = value.expr if isinstance(value, SymDim) else sympy.sympify(value)
        if expr.is_Integer:
            return self.ints([int(expr)], "size")
        if expr.is_Symbol:
            if expr.name not in self.symbols:
                source = next(((v, a) for v in self.graph.inputs for a, e in enumerate(v.sym or ())
                               if e is not None and e == expr), None)
                if source is None:
                    raise UnsupportedError(f"symbol {expr.name} is not a dim of any graph input")
                shape = self.add("Shape", [self.name(source[0])], 1)[0]
                self.symbols[expr.name] = self.add("Gather", [shape, self.ints([source[1]], "axis")], 1)[0]
            return self.symbols[expr.name]
        if isinstance(expr, sympy.floor):
            num, den = sympy.fraction(sympy.together(expr.args[0]))
            return self.add("Div", [self.size(num), self.size(den)], 1)[0]  # int64 Div of sizes >= 0 floors
        if expr.is_Add or expr.is_Mul:
            acc = self.size(expr.args[0])
            for term in expr.args[1:]:
                acc = self.add("Add" if expr.is_Add else "Mul", [acc, self.size(term)], 1)[0]
            return acc
        raise UnsupportedError(f"size {expr} has no ONNX form")

    def scalar_like(self, number: float, value: Value, base: str) -> str:
        dtype = value.dtype.torch if value.dtype is not None else torch.float32
        return self.initializer(torch.tensor(number, dtype=dtype), base)

    def initializer(self, tensor: torch.Tensor, base: str, prefixed: bool = True) -> str:
        """A new initializer named after the node being written (``prefixed``) or as ``base`` alone."""
        name = self.fresh(f"{self.node.name}_{base}" if self.node and prefixed else base)
        fill_tensor_proto(self.initializers.add(), tensor, name, self.external)
        return name

    def add(self, op: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1, domain: str = "",
            **attrs: Any) -> list[str]:
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{self.node.name}_{op.lower()}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=self.fresh(f"{self.node.name}/{op}"),
                                           domain=domain or None, **attrs))
        return list(outputs)

    def out(self, index: int = 0) -> str:
        return self.name(self.node.outputs[index])

    def inp(self, index: int) -> str:
        return self.name(self.node.inputs[index]) if index < len(self.node.inputs) else ""


Emitter = Callable[[_Builder, Node], None]
EMITTERS: dict[str, Emitter] = {}


def emitter(*ops: str):
    def deco(fn: Emitter) -> Emitter:
        for op in ops:
            EMITTERS[op] = fn
        return fn

    return deco


def _simple(onnx_op: str, **fixed: Any) -> Emitter:
    def emit(b: _Builder, node: Node) -> None:
        b.add(onnx_op, [b.inp(i) for i in range(len(node.inputs))], [b.out()], **fixed)

    return emit


for _op, _onnx in {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp",
                   "log": "Log", "sqrt": "Sqrt", "neg": "Neg", "abs": "Abs",
                   "selu": "Selu", "identity": "Identity", "stochastic_depth": "Identity",
                   "matmul": "MatMul", "maximum": "Max", "minimum": "Min", "hardswish": "HardSwish"}.items():
    EMITTERS[_op] = _simple(_onnx)
EMITTERS["hardsigmoid"] = _simple("HardSigmoid", alpha=1.0 / 6.0, beta=0.5)


def _softplus(b: _Builder, x: str, dtype: DType, outputs: Sequence[str] | int = 1) -> str:
    """Softplus, a 16-bit float one in float32: onnxruntime has no float16 kernel, and at opset 18
    it runs ONNX's function body log(exp(x) + 1) instead, infinite past x = 88.7 (at other opsets it
    casts to float32 itself). With the casts in the file the float32 kernel runs at every opset."""
    if dtype not in (DType.float16, DType.bfloat16):
        return b.add("Softplus", [x], outputs)[0]
    wide = b.add("Softplus", [b.add("Cast", [x], 1, to=TensorProto.FLOAT)[0]], 1)[0]
    return b.add("Cast", [wide], outputs, to=_ONNX_DTYPE[dtype])[0]


@emitter("softplus")
def emit_softplus(b, node):
    _softplus(b, b.inp(0), node.inputs[0].dtype, [b.out()])


EMITTERS["erf"] = _simple("Erf")  # float64: in float32 (NO_DOUBLE_KERNEL)


@emitter("dropout")
def emit_dropout(b, node):
    ratio = b.const(np.asarray(node.attrs.get("p", 0.5), dtype=np.float32), "ratio")
    b.add("Dropout", [b.inp(0), ratio], [b.out()])


@emitter("add", "sub", "mul", "div", "pow")
def emit_binary(b, node):
    op = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow"}[node.op]
    out, mode = node.outputs[0].dtype, node.attrs.get("rounding_mode")
    # an integer division rounded down is computed in double (ONNX's integer Div truncates)
    compute = DType.float64 if mode == "floor" and not out.is_float else out
    names = []
    for v in node.inputs:  # ONNX does not promote types: cast the odd operand
        name = b.name(v)
        if node.op != "pow" and v.dtype != compute:
            name = b.add("Cast", [name], 1, to=_ONNX_DTYPE[compute])[0]
        names.append(name)
    if not mode or (mode == "trunc" and not out.is_float):
        b.add(op, names, [b.out()])
        return
    quotient = b.add("Div", names, 1)[0]
    if mode == "floor":
        rounded = b.add("Floor", [quotient], 1 if compute != out else [b.out()])[0]
        if compute != out:
            b.add("Cast", [rounded], [b.out()], to=_ONNX_DTYPE[out])
    else:  # trunc of a float quotient
        b.add("Mul", [b.add("Sign", [quotient], 1)[0], b.add("Floor", [b.add("Abs", [quotient], 1)[0]], 1)[0]],
              [b.out()])


@emitter("conv")
def emit_conv(b, node):
    a, w = node.attrs, node.inputs[1]
    b.add("Conv", [b.inp(0), b.inp(1), b.inp(2)] if len(node.inputs) > 2 and node.inputs[2] is not None
          else [b.inp(0), b.inp(1)], [b.out()], kernel_shape=list(w.shape[2:]), strides=a["stride"],
          pads=a["pads"], dilations=a["dilation"], group=a["groups"])


@emitter("linear")
def emit_linear(b, node):
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if x.rank == 2:
        b.add("Gemm", [b.inp(0), b.inp(1)] + ([b.inp(2)] if bias is not None else []), [b.out()], transB=1)
        return
    if w.is_constant:
        # named after the weight: linear-form reads <name>_t back as <name>
        wt = b.initializer(w.const_value.t().contiguous(), f"{w.name}_t", prefixed=False)
    elif _transposable_int8_weight(w.producer):
        wt = _dequantize_transposed(b, w.producer)
    else:
        wt = b.add("Transpose", [b.inp(1)], 1, perm=[1, 0])[0]
    if bias is None:
        b.add("MatMul", [b.inp(0), wt], [b.out()])
    else:
        y = b.add("MatMul", [b.inp(0), wt], 1)[0]
        b.add("Add", [y, b.inp(2)], [b.out()])


@emitter("batch_norm")
def emit_batch_norm(b, node):
    b.add("BatchNormalization", [b.inp(i) for i in range(5)], [b.out()], epsilon=node.attrs["eps"],
          momentum=1.0 - node.attrs.get("momentum", 0.1))


@emitter("layer_norm")
def emit_layer_norm(b, node):
    x = node.inputs[0]
    k = len(node.attrs["normalized_shape"])
    w = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    scale = b.inp(1) if w is not None else b.initializer(torch.ones(node.attrs["normalized_shape"],
                                                                     dtype=x.dtype.torch), "ones")
    if b.opset >= 17:
        b.add("LayerNormalization", [b.inp(0), scale] + ([b.inp(2)] if bias is not None else []), [b.out()],
              axis=-k, epsilon=node.attrs["eps"])
        return
    axes = list(range(x.rank - k, x.rank))
    mean = _reduce_mean(b, b.inp(0), axes)
    centered = b.add("Sub", [b.inp(0), mean], 1)[0]
    var = _reduce_mean(b, b.add("Mul", [centered, centered], 1)[0], axes)
    std = b.add("Sqrt", [b.add("Add", [var, b.scalar_like(node.attrs["eps"], x, "eps")], 1)[0]], 1)[0]
    normed = b.add("Mul", [b.add("Div", [centered, std], 1)[0], scale], 1 if bias is not None else [b.out()])[0]
    if bias is not None:
        b.add("Add", [normed, b.inp(2)], [b.out()])


def _reduce_axes(b: _Builder, onnx_op: str, x: str, axes: list[int], keepdims: int = 1, outputs: Any = 1) -> str:
    """A Reduce* node: axes as an input from opset 18 (ReduceSum's from 13), an attribute before."""
    if b.opset >= 18 or (onnx_op == "ReduceSum" and b.opset >= 13):
        return b.add(onnx_op, [x, b.ints(axes, "axes")], outputs, keepdims=keepdims)[0]
    return b.add(onnx_op, [x], outputs, axes=axes, keepdims=keepdims)[0]


def _reduce_mean(b: _Builder, x: str, axes: list[int], keepdims: int = 1, outputs: Any = 1) -> str:
    return _reduce_axes(b, "ReduceMean", x, axes, keepdims, outputs)


@emitter("group_norm")
def emit_group_norm(b, node):
    """A group per channel is InstanceNormalization; other groups are the channels of a reshape to
    [N, groups, -1], normalized without scale, then scaled and shifted per channel."""
    x = node.inputs[0]
    groups = node.attrs["num_groups"]
    w = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if groups == x.shape[1] and x.rank >= 3 and not (x.sym and x.sym[1] is not None):
        scale = b.inp(1) if w is not None else b.initializer(torch.ones(groups, dtype=x.dtype.torch), "ones")
        shift = b.inp(2) if bias is not None else b.initializer(torch.zeros(groups, dtype=x.dtype.torch), "zeros")
        b.add("InstanceNormalization", [b.inp(0), scale, shift], [b.out()], epsilon=node.attrs["eps"])
        return
    grouped = b.add("Reshape", [b.inp(0), b.ints([0, groups, -1], "grouped")], 1)[0]
    ones = b.initializer(torch.ones(groups, dtype=x.dtype.torch), "ones")
    zeros = b.initializer(torch.zeros(groups, dtype=x.dtype.torch), "zeros")
    normed = b.add("InstanceNormalization", [grouped, ones, zeros], 1, epsilon=node.attrs["eps"])[0]
    y = b.add("Reshape", [normed, b.ints([0] + list(x.shape[1:]), "shape")], 1)[0]
    per_channel = [x.shape[1]] + [1] * (x.rank - 2)
    if w is not None:
        y = b.add("Mul", [y, b.add("Reshape", [b.inp(1), b.ints(per_channel, "wshape")], 1)[0]], 1)[0]
    if bias is not None:
        y = b.add("Add", [y, b.add("Reshape", [b.inp(2), b.ints(per_channel, "bshape")], 1)[0]], 1)[0]
    b.add("Identity", [y], [b.out()])


@emitter("lrn")
def emit_lrn(b, node):
    """ONNX's LRN sums the squares over channels [c - (size - 1) // 2, c + size // 2], torch's over
    [c - size // 2, c + (size - 1) // 2], and onnxruntime runs odd sizes of 4-D inputs only: other
    sizes and ranks are written out as torch computes them, x / (k + alpha / size * window sum of x^2)^beta."""
    a, x = node.attrs, node.inputs[0]
    size = a["size"]
    if size % 2 and x.rank == 4:
        b.add("LRN", [b.inp(0)], [b.out()], size=size, alpha=a["alpha"], beta=a["beta"], bias=a["k"])
        return
    channels = x.shape[1]
    begin, end = [0] * x.rank, [0] * x.rank
    begin[1], end[1] = size // 2, (size - 1) // 2
    square = b.add("Mul", [b.inp(0), b.inp(0)], 1)[0]
    padded = b.add("Pad", [square, b.ints(begin + end, "pads")], 1, mode="constant")[0]
    total = None
    for j in range(size):
        part = b.add("Slice", [padded, b.ints([j], "start"), b.ints([j + channels], "end"), b.ints([1], "axis")],
                     1)[0]
        total = part if total is None else b.add("Add", [total, part], 1)[0]
    scaled = b.add("Mul", [total, b.scalar_like(a["alpha"] / size, x, "alpha")], 1)[0]
    base = b.add("Add", [scaled, b.scalar_like(a["k"], x, "k")], 1)[0]
    b.add("Div", [b.inp(0), b.add("Pow", [base, b.scalar_like(a["beta"], x, "beta")], 1)[0]], [b.out()])


def _pool(b: _Builder, node: Node, onnx_op: str, **attrs: Any) -> None:
    """A pooling node. With ceil_mode, torch drops a last window that starts in the right padding;
    onnxruntime's kernel does too, but ONNX's shape inference counts it: onnx.checker rejects the
    output shape, and onnxruntime's memory planner, which sizes buffers by the inferred shape, fails
    to reuse one (ir 6001318). Where floor mode has the same windows, the pool is written in floor
    mode; where torch drops a window, with the right padding cut to where its last window ends
    (smaller than the padding: every window and divisor stays). Only where that window ends before
    the padding starts (a stride past the kernel), an intermediate is cut to torch's windows by a Slice."""
    a, x, y = node.attrs, node.inputs[0], node.outputs[0]
    nd = len(a["kernel"])
    if ceil_adds_no_window(node):
        b.add(onnx_op, [b.inp(0)], [b.out()], **{**attrs, "ceil_mode": 0})
        return
    cut, pads = [], list(a["pads"])
    if a.get("ceil_mode") and not any((x.sym or ())[2:]):  # spatial sizes known
        dilation = a.get("dilation", [1] * nd)
        for i in range(nd):
            size, start, stride = x.shape[2 + i], a["pads"][i], a["stride"][i]
            span = dilation[i] * (a["kernel"][i] - 1) + 1
            counted = -(-(size + start + a["pads"][nd + i] - span) // stride) + 1
            if counted == y.shape[2 + i]:
                continue
            reach = (y.shape[2 + i] - 1) * stride + span - size - start  # of the last window past the input
            if reach >= 0:
                pads[nd + i] = reach
            else:
                cut.append((2 + i, y.shape[2 + i]))
    attrs = {**attrs, "pads": pads}
    if not cut:
        b.add(onnx_op, [b.inp(0)], [b.out()], **attrs)
        return
    pooled = b.add(onnx_op, [b.inp(0)], 1, **attrs)[0]
    axes, ends = [axis for axis, _ in cut], [end for _, end in cut]
    b.add("Slice", [pooled, b.ints([0] * len(cut), "starts"), b.ints(ends, "ends"), b.ints(axes, "axes")], [b.out()])


@emitter("max_pool")
def emit_max_pool(b, node):
    a = node.attrs
    nd = len(a["kernel"])
    _pool(b, node, "MaxPool", kernel_shape=a["kernel"], strides=a["stride"], pads=a["pads"],
          dilations=a.get("dilation", [1] * nd), ceil_mode=int(a.get("ceil_mode", False)))


@emitter("avg_pool")
def emit_avg_pool(b, node):
    a = node.attrs
    _pool(b, node, "AveragePool", kernel_shape=a["kernel"], strides=a["stride"], pads=a["pads"],
          ceil_mode=int(a.get("ceil_mode", False)), count_include_pad=int(a.get("count_include_pad", True)))


@emitter("adaptive_avg_pool", "adaptive_max_pool")
def emit_adaptive(b, node):
    x, size = node.inputs[0], node.attrs["output_size"]
    is_avg = node.op == "adaptive_avg_pool"
    if all(s == 1 for s in size):
        b.add("GlobalAveragePool" if is_avg else "GlobalMaxPool", [b.inp(0)], [b.out()])
        return
    spatial = x.shape[2:]
    size = [d if s is None else s for d, s in zip(spatial, size)]
    if not any(d % s for d, s in zip(spatial, size)):
        kernel = [d // s for d, s in zip(spatial, size)]
        b.add("AveragePool" if is_avg else "MaxPool", [b.inp(0)], [b.out()], kernel_shape=kernel, strides=kernel)
        return
    if any((x.sym or ())[2:]):
        raise UnsupportedError(f"node {node.name}: adaptive pooling of symbolic spatial sizes to {size} has no "
                               "ONNX form (its windows depend on the size)")
    # windows of unequal sizes, [floor(i * d / s), ceil((i + 1) * d / s)) along each axis: a window is
    # a box, so its mean (max) is the mean (max) along one axis of those along the others
    name = b.inp(0)
    for axis, (d, s) in enumerate(zip(spatial, size), start=2):
        if d == s:
            continue
        parts = []
        for i in range(s):
            window = b.add("Slice", [name, b.ints([i * d // s], "start"), b.ints([-(-(i + 1) * d // s)], "end"),
                                     b.ints([axis], "axis")], 1)[0]
            parts.append(_reduce_axes(b, "ReduceMean" if is_avg else "ReduceMax", window, [axis]))
        name = b.add("Concat", parts, 1, axis=axis)[0]
    b.add("Identity", [name], [b.out()])


@emitter("clip")
def emit_clip(b, node):
    x = node.inputs[0]
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    inputs = [b.inp(0), "" if lo is None else b.scalar_like(lo, x, "min"),
              "" if hi is None else b.scalar_like(hi, x, "max")]
    while inputs[-1] == "":
        inputs.pop()
    b.add("Clip", inputs, [b.out()])


@emitter("leaky_relu")
def emit_leaky_relu(b, node):
    b.add("LeakyRelu", [b.inp(0)], [b.out()], alpha=node.attrs["negative_slope"])


@emitter("elu")
def emit_elu(b, node):
    b.add("Elu", [b.inp(0)], [b.out()], alpha=node.attrs.get("alpha", 1.0))


@emitter("prelu")
def emit_prelu(b, node):
    x, slope = node.inputs
    out = node.outputs[0].dtype
    name, data = b.inp(1), b.inp(0)
    if slope.rank == 1 and x.rank > 2:  # per-channel: ONNX broadcasts from the right
        name = b.add("Reshape", [name, b.ints([slope.shape[0]] + [1] * (x.rank - 2), "slope_shape")], 1)[0]
    # torch promotes (a float64 x with a float32 slope); ONNX's PRelu takes one type
    name = name if slope.dtype == out else b.add("Cast", [name], 1, to=_ONNX_DTYPE[out])[0]
    data = data if x.dtype == out else b.add("Cast", [data], 1, to=_ONNX_DTYPE[out])[0]
    b.add("PRelu", [data, name], [b.out()])


@emitter("rsqrt")
def emit_rsqrt(b, node):
    b.add("Reciprocal", [b.add("Sqrt", [b.inp(0)], 1)[0]], [b.out()])


@emitter("silu")
def emit_silu(b, node):
    b.add("Mul", [b.inp(0), b.add("Sigmoid", [b.inp(0)], 1)[0]], [b.out()])


@emitter("gelu")
def emit_gelu(b, node):
    x = node.inputs[0]
    approximate = node.attrs.get("approximate", "none")
    if b.opset >= 20 and (approximate == "tanh" or x.dtype != DType.float64):  # float64 Gelu-20 runs on Erf
        b.add("Gelu", [b.inp(0)], [b.out()], approximate=approximate)
        return
    if approximate == "tanh":
        cube = b.add("Mul", [b.inp(0), b.add("Mul", [b.inp(0), b.inp(0)], 1)[0]], 1)[0]
        inner = b.add("Add", [b.inp(0), b.add("Mul", [cube, b.scalar_like(0.044715, x, "k")], 1)[0]], 1)[0]
        t = b.add("Tanh", [b.add("Mul", [inner, b.scalar_like(math.sqrt(2 / math.pi), x, "s")], 1)[0]], 1)[0]
    else:
        t = b.add("Erf", [b.add("Div", [b.inp(0), b.scalar_like(math.sqrt(2.0), x, "sqrt2")], 1)[0]], 1)[0]
    one_plus = b.add("Add", [t, b.scalar_like(1.0, x, "one")], 1)[0]
    half_x = b.add("Mul", [b.inp(0), b.scalar_like(0.5, x, "half")], 1)[0]
    b.add("Mul", [half_x, one_plus], [b.out()])


@emitter("softmax", "log_softmax")
def emit_softmax(b, node):
    b.add("Softmax" if node.op == "softmax" else "LogSoftmax", [b.inp(0)], [b.out()], axis=node.attrs["axis"])


@emitter("reshape")
def emit_reshape(b, node):
    target = [0 if d == "N" else d for d in node.attrs["shape"]]
    b.add("Reshape", [b.inp(0), b.sizes(target, "shape")], [b.out()])


@emitter("flatten")
def emit_flatten(b, node):
    x, start, end = node.inputs[0], node.attrs["start"], node.attrs["end"]
    if start == 1 and end == x.rank - 1:
        b.add("Flatten", [b.inp(0)], [b.out()], axis=1)
        return
    target = [0] * start + [-1] + list(x.shape[end + 1:])  # 0 copies a leading dim, so any batch works
    b.add("Reshape", [b.inp(0), b.ints(target, "shape")], [b.out()])


@emitter("permute")
def emit_permute(b, node):
    b.add("Transpose", [b.inp(0)], [b.out()], perm=node.attrs["perm"])


@emitter("squeeze", "unsqueeze")
def emit_squeeze(b, node):
    op = "Squeeze" if node.op == "squeeze" else "Unsqueeze"
    b.add(op, [b.inp(0), b.ints(node.attrs["axes"], "axes")], [b.out()])


@emitter("concat")
def emit_concat(b, node):
    b.add("Concat", [b.inp(i) for i in range(len(node.inputs))], [b.out()], axis=node.attrs["axis"])


@emitter("split")
def emit_split(b, node):
    b.add("Split", [b.inp(0), b.ints(node.attrs["sizes"], "split")], [b.out(i) for i in range(len(node.outputs))],
          axis=node.attrs["axis"])


@emitter("slice")
def emit_slice(b, node):
    a = node.attrs
    ends = [e if isinstance(e, SymDim) or e >= 0 or st > 0 else -(2**62) for e, st in zip(a["ends"], a["steps"])]
    b.add("Slice", [b.inp(0), b.sizes(a["starts"], "starts"), b.sizes(ends, "ends"), b.ints(a["axes"], "axes"),
                    b.ints(a["steps"], "steps")], [b.out()])


@emitter("select")
def emit_select(b, node):
    index = b.const(np.asarray(node.attrs["index"], dtype=np.int64), "index")
    b.add("Gather", [b.inp(0), index], [b.out()], axis=node.attrs["axis"])


@emitter("gather")
def emit_gather(b, node):
    b.add("Gather", [b.inp(0), b.ints(node.attrs["indices"], "indices")], [b.out()], axis=node.attrs["axis"])


@emitter("expand")
def emit_expand(b, node):
    # ONNX Expand broadcasts like numpy: a 1 keeps the input's dim where torch writes -1
    b.add("Expand", [b.inp(0), b.sizes([1 if d == -1 else d for d in node.attrs["shape"]], "shape")], [b.out()])


@emitter("expand_batch")
def emit_expand_batch(b, node):
    shape = node.attrs["shape"]
    batch = b.add("Shape", [b.inp(1)], 1, start=0, end=1)[0] if b.opset >= 15 else b.add(
        "Slice", [b.add("Shape", [b.inp(1)], 1)[0], b.ints([0], "s"), b.ints([1], "e")], 1)[0]
    rest = b.ints([1 if d == -1 else d for d in shape[1:]], "rest")
    target = b.add("Concat", [batch, rest], 1, axis=0)[0]
    b.add("Expand", [b.inp(0), target], [b.out()])


@emitter("pad")
def emit_pad(b, node):
    x, a = node.inputs[0], node.attrs
    torch_pads = a["pads"]
    begin, end = [0] * x.rank, [0] * x.rank
    for i in range(len(torch_pads) // 2):
        dim = x.rank - 1 - i
        begin[dim], end[dim] = torch_pads[2 * i], torch_pads[2 * i + 1]
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(a.get("mode", "constant"))
    if mode is None or any(p < 0 for p in torch_pads):
        raise UnsupportedError(f"node {node.name}: pad mode {a.get('mode')!r} or negative pads have no ONNX form")
    inputs = [b.inp(0), b.ints(begin + end, "pads")]
    if mode == "constant":
        inputs.append(b.scalar_like(a.get("value", 0.0), x, "value"))
    b.add("Pad", inputs, [b.out()], mode=mode)


@emitter("roll")
def emit_roll(b, node):
    """A cyclic shift is two slices swapped: y = concat(x[size - s % size:], x[:size - s % size]);
    along a symbolic dim, where the cut moves with the size, a gather: y = x[(arange(size) - s) % size]."""
    x = node.inputs[0]
    name = b.inp(0)
    for shift, dim in zip(node.attrs["shifts"], node.attrs["dims"]):
        size = x.shape[dim]
        if x.sym and x.sym[dim] is not None:
            n = b.add("Squeeze", [b.size(x.sym[dim])], 1)[0]
            at = b.add("Range", [b.const(0, "start", np.int64), n, b.const(1, "step", np.int64)], 1)[0]
            # Max: a size that is 0 at run time must not divide (there is nothing to gather)
            index = b.add("Mod", [b.add("Sub", [at, b.const(shift, "shift", np.int64)], 1)[0],
                                  b.add("Max", [n, b.const(1, "one", np.int64)], 1)[0]], 1)[0]
            name = b.add("Gather", [name, index], 1, axis=dim)[0]
            continue
        if size == 0 or shift % size == 0:  # the identity (torch rolls an empty dim to itself)
            continue
        cut = size - shift % size
        tail = b.add("Slice", [name, b.ints([cut], "s"), b.ints([size], "e"), b.ints([dim], "a")], 1)[0]
        head = b.add("Slice", [name, b.ints([0], "s"), b.ints([cut], "e"), b.ints([dim], "a")], 1)[0]
        name = b.add("Concat", [tail, head], 1, axis=dim)[0]
    b.add("Identity", [name], [b.out()])


@emitter("mean", "sum")
def emit_reduce(b, node):
    axes, keep = node.attrs["axes"], int(node.attrs.get("keepdim", False))
    if node.op == "mean":
        _reduce_mean(b, b.inp(0), axes, keep, [b.out()])
    else:
        b.add("ReduceSum", [b.inp(0), b.ints(axes, "axes")], [b.out()], keepdims=keep)


@emitter("cast")
def emit_cast(b, node):
    b.add("Cast", [b.inp(0)], [b.out()], to=_ONNX_DTYPE[node.outputs[0].dtype])


@emitter("attention")
def emit_attention(b, node):
    """Heads split from the last dim, then MatMul/Mul/(Add mask)/Softmax/MatMul; batch and sequence
    stay dynamic. A boolean keep-mask is added as Where(keep, 0, -inf), as torch adds it, and rows
    that attend to nothing are 0, as torch makes them."""
    heads, rank = node.attrs["num_heads"], node.inputs[0].rank
    lead = list(range(rank - 2))
    split = b.ints([0] * (rank - 1) + [heads, -1], "heads")  # [..., L, E] -> [..., L, heads, E / heads]
    q, k, v = (b.add("Reshape", [b.inp(i), split], 1)[0] for i in range(3))
    to_heads = lead + [rank - 1, rank - 2, rank]  # [..., L, heads, dim] <-> [..., heads, L, dim]
    qh, vh = (b.add("Transpose", [t], 1, perm=to_heads)[0] for t in (q, v))
    kt = b.add("Transpose", [k], 1, perm=lead + [rank - 1, rank, rank - 2])[0]  # [..., heads, dim, S]
    scale = b.scalar_like(node.attrs["scale"], node.inputs[0], "scale")
    scores = b.add("Mul", [b.add("MatMul", [qh, kt], 1)[0], scale], 1)[0]
    if len(node.inputs) > 3:
        mask = b.inp(3)
        if node.inputs[3].dtype == DType.bool:
            mask = b.add("Where", [mask, b.scalar_like(0.0, node.inputs[0], "attend"),
                                   b.scalar_like(float("-inf"), node.inputs[0], "masked")], 1)[0]
        scores = b.add("Add", [scores, mask], 1)[0]
    weights = b.add("Softmax", [scores], 1, axis=-1)[0]
    if len(node.inputs) > 3:  # a query that attends to nothing gets 0 (as torch), not Softmax's NaN
        peak = _reduce_axes(b, "ReduceMax", scores, [rank])
        dead = b.add("Equal", [peak, b.scalar_like(float("-inf"), node.inputs[0], "none")], 1)[0]
        weights = b.add("Where", [dead, b.scalar_like(0.0, node.inputs[0], "zero"), weights], 1)[0]
    context = b.add("MatMul", [weights, vh], 1)[0]
    merged = b.add("Transpose", [context], 1, perm=to_heads)[0]
    b.add("Reshape", [merged, b.ints([0] * (rank - 1) + [-1], "merge")], [b.out()])


@emitter("multi_head_attention")
def emit_multi_head_attention(b, node):
    inputs = [b.inp(0), b.inp(1), b.inp(2)] + (["", "", b.inp(3)] if len(node.inputs) > 3 else [])
    b.add("MultiHeadAttention", inputs, [b.out()], domain="com.microsoft", num_heads=node.attrs["num_heads"],
          scale=float(node.attrs["scale"]))
    b.extra_opsets["com.microsoft"] = 1


@emitter("skip_layer_norm")
def emit_skip_layer_norm(b, node):
    total = node.outputs[1]
    outputs = [b.out(0)] + (["", "", b.out(1)] if total.uses or total in b.graph.outputs else [])
    b.add("SkipLayerNormalization", [b.inp(i) for i in range(len(node.inputs))], outputs, domain="com.microsoft",
          epsilon=float(node.attrs["eps"]))
    b.extra_opsets["com.microsoft"] = 1


@emitter("dynamic_quant_matmul")
def emit_dynamic_quant_matmul(b, node):
    bias = [b.inp(3)] if len(node.inputs) > 3 else []
    b.add("DynamicQuantizeMatMul", [b.inp(0), b.inp(1), b.inp(2), ""] + bias, [b.out()], domain="com.microsoft")
    b.extra_opsets["com.microsoft"] = 1


@emitter(OPAQUE)
def emit_opaque(b, node):
    impl = node.attrs["impl"]
    proto = impl.extra.get("node")
    if impl.source != "onnx" or proto is None:
        raise AssertionError("unreachable: torch opaque nodes are rejected before emission")
    copy = onnx.NodeProto()
    copy.CopyFrom(proto)
    names = iter(b.name(v) for v in node.inputs)
    inputs = [next(names) if name else "" for name in proto.input]
    del copy.input[:]
    copy.input.extend(inputs)
    renamed = dict(zip(impl.extra.get("implicit", []), names))  # the rest: what its subgraphs read
    if any(old != new for old, new in renamed.items()):
        _rename_outer_reads(copy, renamed)
    outputs = iter(b.out(i) for i in range(len(node.outputs)))
    del copy.output[:]
    copy.output.extend(next(outputs) if name else "" for name in proto.output)  # optional outputs stay unnamed
    source_opsets = dict(impl.extra.get("opset", []))
    source = source_opsets.get("", source_opsets.get("ai.onnx", b.opset))
    if _same_definition(copy, source, b.opset):
        b.nodes.append(copy)
    else:
        b.nodes.extend(_converted_node(b, node, copy, source_opsets))
    for domain, version in impl.extra.get("opset", []):
        if domain not in ("", "ai.onnx"):
            b.extra_opsets[domain] = version


def _same_definition(proto: onnx.NodeProto, source: int, opset: int) -> bool:
    """Whether a standard op means the same at both opsets (other domains keep their own)."""
    if (proto.domain or "") not in ("", "ai.onnx"):
        return True
    try:
        then = onnx.defs.get_schema(proto.op_type, source, proto.domain or "").since_version
        now = onnx.defs.get_schema(proto.op_type, opset, proto.domain or "").since_version
    except Exception:
        return True  # not a standard op: nothing to compare
    return then == now


def _converted_node(b, node: Node, proto: onnx.NodeProto, source_opsets: dict[str, int]) -> list[onnx.NodeProto]:
    """An opaque node whose op changed meaning since its source opset, rewritten for ``b.opset``
    by onnx's version converter (Upsample-9 becomes Resize, Scatter ScatterElements, ...)."""
    from onnx import version_converter

    present = [name for name in proto.input if name] + [name for name in _outer_reads(proto)]
    inputs = [_value_info(name, value) for name, value in zip(dict.fromkeys(present), node.inputs)]
    outputs = [_value_info(name, value) for name, value in zip([n for n in proto.output if n], node.outputs)]
    opsets = [helper.make_opsetid(d, v) for d, v in source_opsets.items()]
    single = helper.make_model(helper.make_graph([proto], "node", inputs, outputs), opset_imports=opsets)
    source = source_opsets.get("", source_opsets.get("ai.onnx"))
    try:
        converted = version_converter.convert_version(single, b.opset)
    except Exception as exc:
        reason = _converter_reason(exc)
        raise UnsupportedError(
            f"node {node.name}: opaque {proto.op_type} was imported at opset {source} and means something else at "
            f"opset {b.opset}, and onnx's version converter cannot rewrite it ({reason}); emit at opset {source}"
        ) from None
    keep = {i.name for i in inputs} | {o.name for o in outputs} | {""}
    fresh = {}
    for tensor in converted.graph.initializer:
        fresh[tensor.name] = b.fresh(f"{node.name}_{tensor.name}")
        tensor.name = fresh[tensor.name]
        b.initializers.append(tensor)
    for inner in converted.graph.node:
        for name in list(inner.input) + list(inner.output):
            if name not in keep and name not in fresh:
                fresh[name] = b.fresh(f"{node.name}_{name}")
        inner.input[:] = [fresh.get(n, n) for n in inner.input]
        inner.output[:] = [fresh.get(n, n) for n in inner.output]
    return list(converted.graph.node)


def _converter_reason(exc: Exception) -> str:
    """The version converter's message without its C++ assertion prefix ("No Adapter From ...")."""
    return str(exc).strip().splitlines()[-1].split("failed:")[-1].strip().replace("$", "")


def _outer_reads(node: onnx.NodeProto) -> list[str]:
    return list(dict.fromkeys(outer_names(node)))


def _rename_outer_reads(node: onnx.NodeProto, renamed: dict[str, str]) -> None:
    """Point the reads of ``node``'s subgraphs from outside at the names they have now (names are
    unique across scopes in ONNX, so no inner definition shadows them)."""
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for inner in sub.node:
                for i, name in enumerate(inner.input):
                    inner.input[i] = renamed.get(name, name)
                _rename_outer_reads(inner, renamed)


# ============================================================================ quantization
def _axis_attr(node: Node) -> dict[str, int]:
    axis = node.attrs.get("axis")
    return {} if axis is None else {"axis": axis}  # ONNX's own default axis is 1: say it only per-axis


def _transposable_int8_weight(dq: Node | None) -> bool:
    """A linear weight [out, in] dequantized from constants, per tensor or per output channel."""
    return dq is not None and dq.op == "dequantize_linear" and dq.attrs.get("axis") in (None, 0) \
        and dq.inputs[0].rank == 2 and all(v is None or v.is_constant for v in dq.inputs)


def _dequantize_transposed(b: _Builder, dq: Node) -> str:
    """The weight of a linear on [B, L, E] (emitted as MatMul) as DQ(int8 [in, out]), its scales
    along axis 1: the DQ -> MatMul unit onnxruntime fuses into QLinearMatMul / MatMulIntegerToFloat."""
    q = b.initializer(dq.inputs[0].const_value.t().contiguous(), "weight_t_q")
    params = [b.name(v) for v in dq.inputs[1:] if v is not None]
    return b.add("DequantizeLinear", [q, *params], 1, **({} if dq.attrs.get("axis") is None else {"axis": 1}))[0]


def _only_transposed(graph: Graph, dq: Node) -> bool:
    """Every reader of this weight DQ is a linear that emits its own transposed DQ (so it has no ONNX node)."""
    v = dq.outputs[0]
    return _transposable_int8_weight(dq) and bool(v.uses) and all(o is not v for o in graph.outputs) \
        and all(u.node.op == "linear" and u.index == 1 and u.node.inputs[0].rank != 2 for u in v.uses)


def _quantizable(b: _Builder, value: Value) -> str:
    """The input of a QuantizeLinear in its scale's type, float32: x takes no float64, and no 16-bit
    floats before opset 19 (nor ones of another type than the scale's after)."""
    if value.dtype == DType.float32 or not value.dtype.is_float:
        return b.name(value)
    return b.add("Cast", [b.name(value)], 1, to=TensorProto.FLOAT)[0]


@emitter("quantize_linear", "dequantize_linear")
def emit_quantize_dequantize(b, node):
    if node.op == "dequantize_linear" and _only_transposed(b.graph, node):
        return
    if node.op == "dequantize_linear":
        _dequantize(b, node, b.inp(0), [b.out()])
        return
    params = [b.name(v) for v in _qparams(node) if v is not None]
    b.add("QuantizeLinear", [_quantizable(b, node.inputs[0]), *params], [b.out()], **_axis_attr(node))


@emitter("fake_quant")
def emit_fake_quant(b, node):
    """A QuantizeLinear -> DequantizeLinear pair sharing scale and zero point (what QDQ runtimes fuse);
    a range narrower than the integer type's (qmin/qmax: 7-bit weights) clips the integers between."""
    params = [b.inp(1), b.inp(2)]
    q = b.add("QuantizeLinear", [_quantizable(b, node.inputs[0]), *params], 1, **_axis_attr(node))[0]
    dtype = node.inputs[2].dtype.torch
    lo, hi = qrange(dtype, node.attrs)
    if (lo, hi) != QRANGE[dtype]:
        np_dtype = np.int8 if dtype == torch.int8 else np.uint8
        q = b.add("Clip", [q, b.const(lo, "qmin", np_dtype), b.const(hi, "qmax", np_dtype)], 1)[0]
    out = node.outputs[0]
    scale_type = node.inputs[1].dtype
    if out.dtype == scale_type:
        _dequantize(b, node, q, [b.out()])
    else:  # DequantizeLinear gives the scale's type
        b.add("Cast", [_dequantize(b, node, q, 1)], [b.out()], to=_ONNX_DTYPE[out.dtype])


def _dequantize(b: _Builder, node: Node, q: str, outputs: Sequence[str] | int) -> str:
    """The DequantizeLinear of a fake_quant or dequantize_linear node, or the same in arithmetic,
    (float(q) - zero point) * scale, where a quantizer with other parameters reads it: onnxruntime's
    DoubleQDQPairsRemover merges Q1 -> DQ1 -> Q2 -> DQ2 of scalar int8/uint8 parameters into one
    pair on a grid spanning the two ranges' intersection, which drops the first rounding (ir 100404:
    x rounded to steps of 1, then of 0.25, came out in steps of 0.25)."""
    params = [b.name(v) for v in _qparams(node) if v is not None]
    if not _requantized(node):
        return b.add("DequantizeLinear", [q, *params], outputs, **_axis_attr(node))[0]
    to = _ONNX_DTYPE[node.inputs[1].dtype]
    x = b.add("Sub", [b.add("Cast", [q], 1, to=to)[0], b.add("Cast", [params[1]], 1, to=to)[0]], 1)[0]
    return b.add("Mul", [x, params[0]], outputs)[0]


def _requantized(node: Node) -> bool:
    """Whether onnxruntime would merge this node's dequantization with a requantization that reads it
    (scalar parameters, an 8-bit zero point) though the two differ in scale or zero point. The merge
    needs the requantization to be its only reader, and not a graph output: a dequantization that a
    conv reads too stays one, for the conv's QDQ fusion."""
    scale, zero = _qparams(node)
    if scale.numel != 1 or zero is None or zero.numel != 1 or zero.dtype not in (DType.int8, DType.uint8):
        return False
    out, uses = node.outputs[0], node.outputs[0].uses
    if len(uses) != 1 or node.graph is None or any(o is out for o in node.graph.outputs):
        return False
    use = uses[0]
    return use.index == 0 and use.node.op in ("fake_quant", "quantize_linear") \
        and not all(map(_same_value, (scale, zero), _qparams(use.node)))


def _qparams(node: Node) -> tuple[Value, Value | None]:
    return node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None


def _same_value(a: Value | None, c: Value | None) -> bool:
    return a is c or (a is not None and c is not None and a.is_constant and c.is_constant
                      and a.dtype == c.dtype and torch.equal(a.const_value, c.const_value))


def onnxruntime_kernels(model: onnx.ModelProto | str | os.PathLike, level: str = "extended") -> dict[str, int]:
    """How many nodes of each op type onnxruntime's CPU provider runs after graph optimization
    (``level`` basic, extended or all), read from the optimized model it saves: in a well-placed
    QDQ model the convs show up as QLinearConv, the adds as QLinearAdd, the linear layers as QGemm."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    counts: dict[str, int] = {}
    for node in optimized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ============================================================================ model
def _value_info(name: str, value: Value, symbolic_batch: str | None = None) -> onnx.ValueInfoProto:
    shape: list[Any] = list(value.shape)
    if symbolic_batch and shape:
        shape[0] = symbolic_batch
    for axis, expr in enumerate(value.sym or ()):
        if expr is not None:  # dim_param: the symbol's name, or the expression
            shape[axis] = python_expr(expr).replace(" ", "")
    return helper.make_tensor_value_info(name, _ONNX_DTYPE[value.dtype], shape)


def _batch_symbols(graph: Graph, dynamic_batch: bool) -> tuple[list[str | None], list[str | None]]:
    """The symbolic leading dim of each graph input and output. Inputs keep the symbol an ONNX source
    gave them; ``dynamic_batch`` names the rest "N" (every op emits batch-agnostic shapes). Outputs
    whose leading dim is the inputs' batch take its symbol."""
    inputs = [v.meta.get("batch_symbol") or ("N" if dynamic_batch and v.rank else None) for v in graph.inputs]
    batches = {v.shape[0]: symbol for v, symbol in zip(graph.inputs, inputs) if symbol}
    outputs = [batches.get(v.shape[0]) if v.rank and len(batches) == 1 else None for v in graph.outputs]
    return inputs, outputs


# Ops onnxruntime's CPU provider has no float64 kernel for (checked against onnxruntime 1.32: a
# session on a one-node float64 model fails with "Could not find an implementation", the same
# node in float32 runs; tests/backends/test_onnx_float64.py keeps the list honest). In a float64
# graph each runs in float32 between Casts (float32's ~1e-7 relative error) and the file stays
# valid ONNX, only slower. HardSwish runs as its function body, on HardSigmoid; Gelu-20 too, on
# Erf where approximate is none (emit_gelu writes that one out for float64, so Erf is wrapped).
NO_DOUBLE_KERNEL = frozenset({
    "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cosh", "Sinh", "Tan", "Erf",
    "Elu", "HardSigmoid", "HardSwish", "Selu", "Softplus", "Softsign",
    "Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "InstanceNormalization", "LRN", "Resize", "GridSample",
})


def _float64_in_float32(model: onnx.ModelProto) -> None:
    """Wrap the float64 nodes of NO_DOUBLE_KERNEL ops in Casts: float64 inputs to float32, float64
    outputs back. Element types come from onnx's type inference on the graph without its tensors'
    data (types do not depend on it; a large model is not copied)."""
    if not any(n.op_type in NO_DOUBLE_KERNEL and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return
    skeleton = onnx.ModelProto()
    skeleton.ir_version, skeleton.graph.name = model.ir_version, model.graph.name
    skeleton.opset_import.extend(model.opset_import)
    skeleton.graph.node.extend(model.graph.node)
    skeleton.graph.input.extend(model.graph.input)
    skeleton.graph.output.extend(model.graph.output)
    skeleton.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                for t in model.graph.initializer)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    except Exception:
        return  # check_model reports what is wrong with the file
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    nodes, used = [], {n for node in model.graph.node for n in [*node.input, *node.output]}

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        return name

    double = TensorProto.DOUBLE
    for node in model.graph.node:
        if node.op_type not in NO_DOUBLE_KERNEL or node.domain not in ("", "ai.onnx") or not any(
                types.get(name) == double for name in node.input if name):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if name and types.get(name) == double:
                single = fresh(f"{name}_float32")
                nodes.append(helper.make_node("Cast", [name], [single], name=fresh(f"{node.name}/CastIn{i}"),
                                              to=TensorProto.FLOAT))
                node.input[i] = single
        after = []
        for i, name in enumerate(node.output):
            if name and types.get(name) == double:
                single = fresh(f"{name}_float32")
                after.append(helper.make_node("Cast", [single], [name], name=fresh(f"{node.name}/CastOut{i}"),
                                              to=double))
                node.output[i] = single
        nodes += [node, *after]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def io_names(graph: Graph) -> list[tuple[Value, str]]:
    """Graph inputs and outputs with the names a file gives them where those are not identifiers
    (``graph.meta["io_names"]``: {"inputs": [...], "outputs": [...]}, by position, which passes keep)."""
    names = graph.meta.get("io_names") or {}
    pairs = []
    for values, given in ((graph.inputs, names.get("inputs")), (graph.outputs, names.get("outputs"))):
        if given and len(given) == len(values):
            pairs += list(zip(values, given))
    return pairs


def build_model(graph: Graph, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                external: ExternalData | None = None) -> onnx.ModelProto:
    """The graph as a ModelProto (large tensors into ``external``'s file where given). Raises
    UnsupportedError listing nodes without an ONNX form."""
    from slimgraph.backends import onnx_extended  # noqa: F401  (registers the wider op surface)

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise SlimgraphError(f"opset {opset} is outside the supported range {MIN_OPSET}..{newest}")
    torch_only = [n for n in graph.nodes if n.op == OPAQUE and n.attrs["impl"].source != "onnx"]
    missing = [n for n in graph.nodes if n.op != OPAQUE and n.op not in EMITTERS]
    if torch_only or missing:
        listed = ", ".join(f"{n.name} ({n.attrs['impl'].target})" for n in torch_only)
        listed = ", ".join(filter(None, [listed, ", ".join(f"{n.name} ({n.op})" for n in missing)]))
        raise UnsupportedError(f"{len(torch_only) + len(missing)} node(s) have no ONNX form: {listed}")
    model = onnx.ModelProto(ir_version=min(onnx.IR_VERSION, 10), producer_name="slimgraph")  # 10: current ORT
    b = _Builder(graph, opset, model, external)
    model.graph.name = graph.name or "slimgraph"
    in_symbols, out_symbols = _batch_symbols(graph, dynamic_batch)
    for value, name in io_names(graph):  # names a file's consumers expect ("past_key_values.0.key")
        if not value.is_constant and id(value) not in b.names:
            b.names[id(value)] = b.fresh(name)
    model.graph.input.extend(_value_info(b.name(v), v, s) for v, s in zip(graph.inputs, in_symbols))
    for node in graph.nodes:
        b.node = node
        EMITTERS[node.op](b, node)
    b.node = None
    model.graph.output.extend(_value_info(b.name(v), v, s) for v, s in zip(graph.outputs, out_symbols))
    if "kv_cache" in graph.meta:  # what generate() needs beside the graph: the end and pad tokens
        helper.set_model_props(model, {KV_CACHE_METADATA: json.dumps(graph.meta["kv_cache"])})
    model.opset_import.extend([helper.make_opsetid("", opset)] +
                              [helper.make_opsetid(d, v) for d, v in b.extra_opsets.items()])
    if any(v.dtype == DType.float64 for v in [*graph.inputs, *graph.constants.values()] + [
            o for n in graph.nodes for o in n.outputs]):
        _float64_in_float32(model)
    return model


def check_model(model: onnx.ModelProto) -> None:
    try:
        if model.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(model, full_check=True)
        else:
            onnx.checker.check_model(model)
    except Exception as exc:
        raise SlimgraphError(f"the emitted ONNX model fails onnx.checker: {exc}") from None


QUANT_FORMATS = ("qdq", "qoperator")


def _check_quant_format(graph: Graph, quant_format: str) -> None:
    if quant_format not in QUANT_FORMATS:
        raise SlimgraphError(f"quant_format {quant_format!r} is not one of {', '.join(QUANT_FORMATS)}")
    if quant_format == "qdq":
        return
    fake = next((n for n in graph.nodes if n.op == "fake_quant"), None)
    if fake is not None:
        raise SlimgraphError(f"quant_format 'qoperator': node {fake.name} is a fake_quant; run fold-int8 first "
                             "(QOperator kernels take int8 weights)")
    if not any(n.op == "dequantize_linear" for n in graph.nodes):
        raise SlimgraphError("quant_format 'qoperator': the graph is not quantized (no dequantize_linear node); "
                             "run quantize and fold-int8 first, or emit it with quant_format='qdq'")


def default_opset_for(graph: Graph) -> int:
    """The opset a graph imported from ONNX came in with, else DEFAULT_OPSET."""
    return max(LEGACY_OPSET, int(graph.meta.get("opset", DEFAULT_OPSET)))


def _converted_down(model: onnx.ModelProto, opset: int, strict: bool) -> onnx.ModelProto:
    """``model`` (at MIN_OPSET) at an older opset by onnx's version converter. Where it cannot
    (an op with no older form), an opset asked for is an error; the source's opset a warning,
    and the model stays at MIN_OPSET."""
    from onnx import version_converter

    try:
        older = version_converter.convert_version(model, opset)
        check_model(older)
        return older
    except Exception as exc:
        reason = f"cannot write the model at opset {opset} (onnx's version converter: {_converter_reason(exc)})"
        if strict:
            raise SlimgraphError(reason) from None
        warnings.warn(f"{reason}; writing it at opset {MIN_OPSET}", stacklevel=3)
        return model


def to_onnx(graph: Graph, path: str | os.PathLike | None = None, opset: int | None = None,
            overwrite: bool = False, quant_format: str = "qdq", dynamic_batch: bool = False,
            external_data: bool | None = None) -> onnx.ModelProto:
    """Build and check the ModelProto; with a path, write it (never over an existing file unless asked).
    ``dynamic_batch`` declares the inputs' (and outputs') leading dim symbolic, "N": the model then
    runs at any batch size (a graph imported from ONNX keeps the symbols its source had either way).

    ``quant_format`` says how a folded int8 graph is written: ``qdq`` (QuantizeLinear /
    DequantizeLinear around float ops, which onnxruntime fuses into integer kernels) or
    ``qoperator`` (those kernels written out: QLinearConv, QLinearMatMul and onnxruntime's
    com.microsoft QLinearAdd, QGemm, ...; see onnx_qoperator.py). ``qoperator`` on a graph
    without int8 tensors is an error.

    ``external_data`` writes the tensors into ``<path>.data`` beside the file (ONNX's external
    data; a protobuf holds at most 2 GiB), each straight from the graph: the returned ModelProto
    then refers to that file. None (the default): where the constants pass 1 GiB."""
    _check_quant_format(graph, quant_format)
    asked = opset
    opset = default_opset_for(graph) if opset is None else opset
    legacy = opset < MIN_OPSET and opset >= LEGACY_OPSET  # written at MIN_OPSET, then converted down
    if external_data is None:
        external_data = constant_bytes(graph) > AUTO_EXTERNAL_BYTES
    if external_data:
        if path is None:
            raise SlimgraphError(f"the graph's constants hold {constant_bytes(graph) / 2**30:.1f} GiB: write it with "
                                 "external data, to a path (to_onnx(path)); a protobuf holds at most 2 GiB")
        if legacy or quant_format == "qoperator":
            raise SlimgraphError("external data is written at opset >= 13 in QDQ form (the converters that make "
                                 "older opsets and QOperator kernels read every tensor into the protobuf)")
        return _write_external(graph, Path(path), opset, overwrite, dynamic_batch)
    model = build_model(graph, MIN_OPSET if legacy else opset, dynamic_batch)
    if quant_format == "qoperator":
        from slimgraph.backends.onnx_qoperator import to_qoperator

        model = to_qoperator(model)[0]
    if legacy:
        model = _converted_down(model, opset, strict=asked is not None)
    check_model(model)
    if path is not None:
        path = Path(path)
        if path.exists() and not overwrite:
            raise SlimgraphError(f"{path} already exists (pass overwrite=True)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
        os.close(fd)
        try:
            onnx.save(model, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return model


def _write_external(graph: Graph, path: Path, opset: int, overwrite: bool, dynamic_batch: bool) -> onnx.ModelProto:
    """``path`` and ``path.data``, written in a private folder beside them, checked there, then moved
    into place: nothing is left behind when a step fails."""
    data = path.with_name(path.name + ".data")
    existing = [str(p) for p in (path, data) if p.exists()]
    if existing and not overwrite:
        raise SlimgraphError(f"{', '.join(existing)} already exist(s) (pass overwrite=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=".slimgraph-"))
    try:
        with open(folder / data.name, "wb") as file:
            model = build_model(graph, opset, dynamic_batch, ExternalData(file, data.name))
        with open(folder / path.name, "wb") as file:
            file.write(model.SerializeToString())
        try:
            onnx.checker.check_model(str(folder / path.name), full_check=True)
        except Exception as exc:
            raise SlimgraphError(f"the emitted ONNX model fails onnx.checker: {exc}") from None
        os.replace(folder / data.name, data)
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return model


def run_onnxruntime(model: onnx.ModelProto | str | os.PathLike, inputs: Sequence[torch.Tensor],
                    threads: int = 1) -> list[torch.Tensor]:
    """Run a model in onnxruntime's CPU provider (one thread by default, for stable timings)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(r)) for r in session.run(None, feeds)]
