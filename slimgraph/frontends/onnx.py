"""ONNX model (file or ModelProto) -> IR Graph, through onnx-graphsurgeon.

Steps: load (external data confined to the model's folder), check the opset and the graph
(dangling inputs, cycles), run onnx shape inference, import with onnx-graphsurgeon, then map
each node in topological order. Static subgraphs (Constant, ConstantOfShape, Shape of a static
tensor and whatever computes on them) are evaluated at import with onnx's reference evaluator;
their results feed attributes (Reshape's shape, Slice's starts) or become IR constants. Nodes
with no canonical mapping become opaque nodes that keep their NodeProto, so the ONNX backend
emits them back unchanged and the interpreter runs them with the reference evaluator.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import sympy
import torch
from onnx import helper

from slimgraph.errors import ModelImportError, SlimgraphError, UnsupportedError
from slimgraph.ir import OPAQUE, DType, Graph, OpaqueImpl, Value, clean_name
from slimgraph.ir.opaque import Slot
from slimgraph.onnx_proto import KV_CACHE_METADATA, outer_names

MIN_OPSET = 1


MAX_CONSTANT_BYTES = 32 * 2**30  # the default cap on a model's stored tensors: a 1.1B-parameter fp32 model is 4.4 GB


def load_model(model: str | os.PathLike | onnx.ModelProto, max_constant_bytes: int = MAX_CONSTANT_BYTES
               ) -> tuple[onnx.ModelProto, Path | None]:
    """Parse a file (or take a ModelProto), check every stored tensor's declared size against what
    it holds and against ``max_constant_bytes`` (before anything is allocated for it), and load
    external data from inside its folder only."""
    if isinstance(model, onnx.ModelProto):
        proto, folder = model, None
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelImportError(f"{path}: no such file")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError and friends: truncated or not ONNX
            raise ModelImportError(f"{path}: not a valid ONNX file ({type(exc).__name__}: {exc})") from None
        folder = path.parent
    check_sizes(proto, folder, max_constant_bytes)
    _load_external_data(proto, folder)
    return proto, folder


_PACKED_4BIT = {getattr(onnx.TensorProto, t) for t in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, t)}


def check_sizes(proto: onnx.ModelProto, folder: Path | None, max_constant_bytes: int) -> None:
    """Every initializer and constant (subgraphs included): dims non-negative, a known element type,
    the bytes it declares equal to the bytes it holds, and all of them within the cap."""
    from onnx.external_data_helper import _get_all_tensors

    for value in proto.graph.input:  # sample inputs are made at the declared static sizes
        static = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if static and math.prod(max(d, 0) for d in static) > max_constant_bytes:  # at least a byte each
            raise ModelImportError(f"graph input {value.name!r} declares dims {static}: a sample of it is over "
                                   f"the cap of {max_constant_bytes:,} bytes (max_constant_bytes)")
    total = 0
    for tensor in _get_all_tensors(proto):
        where = f"tensor {tensor.name!r}"
        if any(d < 0 for d in tensor.dims):
            raise ModelImportError(f"{where}: negative dims {list(tensor.dims)}")
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except Exception:
            raise ModelImportError(f"{where}: unknown element type {tensor.data_type}") from None
        count = math.prod(tensor.dims)
        declared = count * itemsize
        total += declared
        if declared > max_constant_bytes or total > max_constant_bytes:
            what = f"declares {list(tensor.dims)} ({declared:,} bytes)" if declared > max_constant_bytes \
                else f"brings the model's stored tensors to {total:,} bytes"
            raise ModelImportError(f"{where} {what}, over the cap of {max_constant_bytes:,} bytes "
                                   "(max_constant_bytes)")
        if tensor.data_type == onnx.TensorProto.STRING:
            held, want = len(tensor.string_data), count
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            if "length" not in info:
                continue  # the loader checks the file; its size bounds what it can hold
            for key in ("offset", "length"):
                if key in info and not (info[key].isascii() and info[key].isdigit()):
                    raise ModelImportError(f"{where}: external data {key} {info[key]!r} is not a non-negative integer")
            held, want = int(info["length"]), declared
        elif tensor.HasField("raw_data"):  # set, even empty, it is what onnx reads
            held, want = len(tensor.raw_data), -(-count // 2) if tensor.data_type in _PACKED_4BIT else declared
        else:  # one value per element in the type's field (two for complex, a pair per int32 for 4 bits)
            try:
                held = len(getattr(tensor, onnx.helper.tensor_dtype_to_field(tensor.data_type)))
            except Exception:
                raise ModelImportError(f"{where}: element type {tensor.data_type} has no field to hold it") from None
            want = count * 2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) \
                else -(-count // 2) if tensor.data_type in _PACKED_4BIT else count
        if held != want:
            unit = "bytes" if tensor.HasField("raw_data") or tensor.data_location else "values"
            raise ModelImportError(f"{where} declares {list(tensor.dims)} but holds {held} of the {want} "
                                   f"{unit} that needs")


def _external_tensors(proto: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]


def _load_external_data(proto: onnx.ModelProto, folder: Path | None) -> None:
    tensors = _external_tensors(proto)
    if not tensors:
        return
    if folder is None:
        raise ModelImportError("the ModelProto refers to external data; import it from its file path instead")
    root = folder.resolve()
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if os.path.isabs(location) or (target != root and root not in target.parents):
            raise ModelImportError(
                f"tensor {tensor.name!r}: external data path {location!r} leaves the model's folder {root}")
        if not target.is_file():
            raise ModelImportError(f"tensor {tensor.name!r}: external data file {location!r} not found")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(root))
    except Exception as exc:
        raise ModelImportError(f"cannot load external data: {exc}") from None


def default_opset(proto: onnx.ModelProto) -> int | None:
    """The model's ai.onnx opset; None for a model of other domains only (ai.onnx.ml)."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    if not proto.opset_import:
        raise ModelImportError("the model imports no opset")
    return None


def check_structure(proto: onnx.ModelProto) -> None:
    """Opset in range; every node input defined somewhere; no cycles."""
    opset = default_opset(proto)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset > newest:
        raise ModelImportError(f"opset {opset} is newer than the newest this onnx supports ({newest})")
    if opset is not None and opset < MIN_OPSET:
        raise ModelImportError(f"opset {opset} is older than the oldest supported ({MIN_OPSET})")
    g = proto.graph
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    producer: dict[str, int] = {}
    for index, node in enumerate(g.node):
        for out in node.output:
            producer[out] = index
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(g.node)))
    for index, node in enumerate(g.node):
        for name in node.input:
            if name in producer:
                deps.add_edge(producer[name], index)
            elif name not in defined:
                raise ModelImportError(
                    f"node {_node_label(node, index)}: input {name!r} is not produced by any node, "
                    "graph input or initializer (dangling)")
    for out in g.output:
        if out.name not in producer and out.name not in defined:
            raise ModelImportError(f"graph output {out.name!r} is not produced by anything")
    if nx.is_directed_acyclic_graph(deps):  # linear time; find_cycle only to name the culprit
        return
    cycle = nx.find_cycle(deps)
    names = " -> ".join(_node_label(g.node[a], a) for a, _ in cycle)
    raise ModelImportError(f"the graph has a cycle: {names}")


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.name or node.output[0] if node.output else index} ({node.op_type})"


def import_onnx(model: str | os.PathLike | onnx.ModelProto, example_inputs: Sequence[torch.Tensor] | None = None,
                max_constant_bytes: int = MAX_CONSTANT_BYTES) -> Graph:
    proto, _ = load_model(model, max_constant_bytes)
    check_structure(proto)
    source_opset = default_opset(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:
        raise ModelImportError(f"onnx shape inference failed: {exc}") from None
    graph = _Converter(proto, example_inputs, max_constant_bytes).convert()
    graph.meta["source"] = "onnx"
    if source_opset is not None:
        graph.meta["opset"] = source_opset  # written back at this opset unless asked otherwise
    names = {"inputs": [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}],
             "outputs": [o.name for o in proto.graph.output]}
    if names != {"inputs": [v.name for v in graph.inputs], "outputs": [v.name for v in graph.outputs]}:
        graph.meta["io_names"] = names  # the file's interface ("past_key_values.0.key") is written back as it was
    metadata = {p.key: p.value for p in proto.metadata_props}
    if KV_CACHE_METADATA in metadata:  # a decoder step slimgraph wrote: generate() reads its end tokens
        try:
            graph.meta["kv_cache"] = json.loads(metadata[KV_CACHE_METADATA])
        except ValueError:
            pass
    return graph


_ONNX_TO_DTYPE = {
    onnx.TensorProto.FLOAT: DType.float32, onnx.TensorProto.FLOAT16: DType.float16,
    onnx.TensorProto.BFLOAT16: DType.bfloat16, onnx.TensorProto.DOUBLE: DType.float64,
    onnx.TensorProto.INT64: DType.int64, onnx.TensorProto.INT32: DType.int32,
    onnx.TensorProto.INT8: DType.int8, onnx.TensorProto.UINT8: DType.uint8, onnx.TensorProto.BOOL: DType.bool,
    onnx.TensorProto.INT16: DType.int16, onnx.TensorProto.UINT16: DType.uint16,
    onnx.TensorProto.UINT32: DType.uint32, onnx.TensorProto.UINT64: DType.uint64,
}


_STORAGE_ONLY = {DType.uint16, DType.uint32, DType.uint64}  # torch stores these but barely computes on them


def _known_dtype(tensor: gs.Tensor) -> DType | None:
    """The tensor's IR dtype, None where it is unknown or has none (strings, sequences)."""
    try:
        return _dtype_of(tensor) if tensor.dtype is not None else None
    except UnsupportedError:
        return None


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True, order="C"))  # keeps 0-d arrays 0-d


def _in_order(graph: gs.Graph) -> bool:
    """Whether every node comes after the nodes producing its inputs."""
    producers = {t.name: i for i, n in enumerate(graph.nodes) for t in n.outputs if t.name}
    return all(producers.get(t.name, -1) < i for i, n in enumerate(graph.nodes) for t in n.inputs if t.name)


class _Converter:
    def __init__(self, proto: onnx.ModelProto, example_inputs: Sequence[torch.Tensor] | None,
                 max_constant_bytes: int = MAX_CONSTANT_BYTES) -> None:
        self.proto = proto
        self.max_constant_bytes = max_constant_bytes
        self.opset = default_opset(proto) or 0  # 0: no ai.onnx ops, so nothing maps to canonical ones
        self.example_inputs = list(example_inputs) if example_inputs is not None else None
        try:
            self.gs_graph = gs.import_onnx(proto)
        except Exception as exc:  # what onnx-graphsurgeon cannot read (an attribute of type UNDEFINED)
            raise ModelImportError(f"cannot read the graph: {type(exc).__name__}: {exc}") from None
        self.graph = Graph(proto.graph.name or "onnx")
        self.env: dict[str, Value | np.ndarray] = {}  # tensor name -> IR value or static array
        self.const_values: dict[str, Value] = {}
        self.node: gs.Node | None = None
        self.symbols: dict[str, int] = {}  # the graph's symbols (dim_params) and their sizes here
        self._observed_values: dict[str, np.ndarray] | None = None
        self.absorbed: set[str] = set()  # nodes (by first output) a handler of an earlier node computed already

    # ------------------------------------------------------------------ driver
    def convert(self) -> Graph:
        from slimgraph.frontends import onnx_ops

        self._inputs()
        for tensor in self.gs_graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                self.env[tensor.name] = np.asarray(tensor.values)
        try:
            if not _in_order(self.gs_graph):  # a sorted file keeps its order: round trips print the same
                self.gs_graph.toposort()
        except Exception as exc:
            raise ModelImportError(f"cannot order the graph: {exc}") from None
        for node in self.gs_graph.nodes:
            self.node = node
            try:
                self._convert_node(node, onnx_ops)
            except SlimgraphError:
                raise
            except Exception as exc:  # a malformed node that onnx's own tools choke on
                raise ModelImportError(f"node {self.name} ({node.op}): cannot import it: "
                                       f"{type(exc).__name__}: {exc}") from None
        outputs = []
        for tensor in self.gs_graph.outputs:
            outputs.append(self.value(tensor.name, f"{tensor.name}"))
        self.graph.set_outputs(outputs)
        return self.graph

    def _inputs(self) -> None:
        inputs = self.gs_graph.inputs
        if self.example_inputs is not None and len(self.example_inputs) != len(inputs):
            raise ModelImportError(f"the model has {len(inputs)} inputs, example_inputs has {len(self.example_inputs)}")
        for tensor, example in zip(inputs, self.example_inputs or ()):
            if not isinstance(example, torch.Tensor):
                raise ModelImportError(f"example input for {tensor.name!r}: expected a tensor or numpy array, "
                                       f"got {type(example).__name__}")
        # A symbolic leading dim alone is the batch, kept symbolic by the "N" convention. Symbolic
        # dims elsewhere (a sequence), or a graph that computes on sizes (Shape), make all of them
        # the IR's symbols, sized 2 (or as the example inputs say) for the passes that need numbers.
        symbolic = any(not isinstance(d, int) or d < 0 for t in inputs for d in (t.shape or ())[1:]) or (
            any(n.op_type in ("Shape", "Size") for n in self.proto.graph.node)  # sizes computed on need symbols
            and any(t.shape and not (isinstance(t.shape[0], int) and t.shape[0] >= 0) for t in inputs))
        bare = {d for t in inputs for d in (t.shape or ()) if isinstance(d, str) and d and _symbol(d) == d}
        for i, tensor in enumerate(inputs):
            dtype = _dtype_of(tensor)
            declared = tuple(tensor.shape or ())
            names = [None if isinstance(d, int) and d >= 0 else _dim_expression(d, bare) or _symbol(d, tensor.name, a)
                     for a, d in enumerate(declared)]
            if self.example_inputs is not None:
                shape = tuple(self.example_inputs[i].shape)
            elif symbolic:  # symbols at 2, sums of them ("past_seq+seq") at their sum
                shape = tuple(d if n is None else 2 if isinstance(n, str) else int(n.subs(
                    {sym: 2 for sym in n.free_symbols})) for n, d in zip(names, declared))
            else:
                shape = declared
                if shape and not (isinstance(shape[0], int) and shape[0] >= 0):
                    shape = (1, *shape[1:])  # a symbolic batch is imported at batch 1 and kept symbolic
            value = self.graph.add_input(tensor.name, shape, dtype, names if symbolic else None)
            if symbolic:
                self.symbols.update((n, size) for n, size in zip(names, shape) if isinstance(n, str))
            value.meta["onnx_name"] = tensor.name
            if tensor.shape and not isinstance(tensor.shape[0], int) and not symbolic:
                value.meta["batch_symbol"] = str(tensor.shape[0])
            self.env[tensor.name] = value

    def _convert_node(self, node: gs.Node, onnx_ops: Any) -> None:
        from slimgraph.frontends import onnx_shapes as shape_arith

        outer = _implicit_inputs(node)  # what its subgraphs read from outside
        if (node.domain or "") not in ("", "ai.onnx"):
            self._opaque(node, outer)
            return
        inputs = [self.env.get(t.name) if t.name else None for t in node.inputs]
        if shape_arith.applies(node.op, inputs, node.attrs):
            try:
                arrays = shape_arith.evaluate(node, inputs)
            except (ValueError, IndexError, TypeError) as exc:
                raise ModelImportError(f"node {self.name} ({node.op}): cannot compute sizes over the symbolic "
                                       f"dims: {exc}") from None
            for tensor, array in zip(node.outputs, arrays):
                self.env[tensor.name] = shape_arith.normalized(array)  # sizes over the symbols, computed now
            return
        implicit = [self.env.get(n) for n in outer]
        if all(x is None or isinstance(x, np.ndarray) for x in inputs + implicit) \
                and node.op not in onnx_ops.NEVER_FOLD \
                and not any(isinstance(x, np.ndarray) and x.dtype == object for x in inputs + implicit):
            self._check_evaluation_size(node, inputs)
            for tensor, array in zip(node.outputs, self._evaluate(node, inputs, dict(zip(outer, implicit)))):
                self.env[tensor.name] = array
            return
        handler = onnx_ops.HANDLERS.get(node.op) if self._canonical(node, inputs) and not implicit else None
        mark = len(self.graph.nodes)
        results = None
        if handler is not None:
            try:
                results = handler(self)
            except onnx_ops.Unhandled:
                results = None
        results = [] if results is None else results if isinstance(results, (list, tuple)) else [results]
        needed = [i for i, t in enumerate(node.outputs) if t.name and (t.outputs or t in self.gs_graph.outputs)]
        if handler is None or any(i >= len(results) or results[i] is None for i in needed):
            for created in reversed(self.graph.nodes[mark:]):  # a handler that covers only part of the
                self.graph.remove_node(created)  # node (Dropout's mask, LayerNorm's mean) gives way
            self._opaque(node, outer)
            return
        for tensor, result in zip(node.outputs, results):
            if result is not None:
                self.env[tensor.name] = result

    def _canonical(self, node: gs.Node, inputs: list) -> bool:
        """Whether the node may map to canonical IR ops: the IR computes in torch, which lacks
        arithmetic on wide unsigned integers, and handlers know the ops' forms from opset 6 on."""
        if self.opset < 6:
            return False
        types = [x.dtype for x in inputs if isinstance(x, Value)] + [_known_dtype(t) for t in node.outputs if t.name]
        return not any(t in _STORAGE_ONLY for t in types)

    # ------------------------------------------------------------------ helpers for handlers
    @property
    def name(self) -> str:
        return self.node.outputs[0].name if self.node.outputs else (self.node.name or self.node.op)

    def attr(self, key: str, default: Any = None) -> Any:
        value = self.node.attrs.get(key, default)
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        return value

    def input(self, index: int) -> Value | np.ndarray | None:
        if index >= len(self.node.inputs) or not self.node.inputs[index].name:
            return None
        return self.env[self.node.inputs[index].name]

    def static(self, index: int) -> np.ndarray | None:
        """An input that must be static (a shape, axes, pads); Unhandled if it is computed."""
        x = self.input(index)
        if x is None or isinstance(x, np.ndarray):
            return x
        from slimgraph.frontends.onnx_ops import Unhandled

        raise Unhandled

    def value(self, name: str, label: str | None = None) -> Value:
        """The IR value of a tensor, materializing static arrays as graph constants once."""
        x = self.env[name]
        if isinstance(x, Value):
            return x
        if isinstance(x, np.ndarray) and x.dtype == object:  # sizes over symbols, read as a tensor
            if name not in self.const_values:
                self.const_values[name] = self.graph.create_node(
                    "sizes", [], {"values": list(x.reshape(-1)), "shape": list(x.shape)}, name=label or name).output
            return self.const_values[name]
        if name not in self.const_values:
            tensor = to_tensor(np.asarray(x))
            trainable = tensor.is_floating_point()
            self.const_values[name] = self.graph.add_constant(label or name, tensor, trainable=trainable)
        return self.const_values[name]

    def tensor_input(self, index: int) -> Value | None:
        if index >= len(self.node.inputs) or not self.node.inputs[index].name:
            return None
        return self.value(self.node.inputs[index].name)

    def emit(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None, suffix: str = "",
             name: str | None = None) -> Any:
        """One IR node, named after the ONNX node's output (or ``name``) and ``suffix``."""
        names = None  # a node of several outputs keeps the file's names for them (Split's halves)
        if not suffix and len(self.node.outputs) > 1:
            names = [t.name or f"{self.name}_{i}" for i, t in enumerate(self.node.outputs)]
        node = self.graph.create_node(op, list(inputs), attrs, name=(name or self.name) + suffix, output_names=names,
                                      meta={"origin": f"onnx:{self.node.name or self.node.op}"})
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def _check_evaluation_size(self, node: gs.Node, inputs: list) -> None:
        """Refuse to evaluate a node whose outputs would not fit the cap, before allocating them:
        the ops whose output size is data (ConstantOfShape, Expand, Tile, Range) by their inputs,
        the others by onnx's inferred output shapes."""
        elements = output_elements(node.op, inputs)
        if elements is None:
            known = [t.shape for t in node.outputs if t.shape is not None
                     and all(isinstance(d, int) and d >= 0 for d in t.shape)]
            elements = max((math.prod(s) for s in known), default=0)
        if elements * 8 > self.max_constant_bytes:  # at most 8 bytes an element
            raise ModelImportError(f"node {self.name} ({node.op}): its output would hold {elements:,} elements, "
                                   f"over the cap of {self.max_constant_bytes:,} bytes (max_constant_bytes)")

    def _evaluate(self, node: gs.Node, inputs: list, implicit: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one node with onnx's reference evaluator, under the model's opset."""
        from onnx.reference import ReferenceEvaluator

        proto = _single_node_model(node, self.proto)
        feeds = {t.name: np.asarray(x) for t, x in zip(node.inputs, inputs) if t.name}
        feeds.update((name, np.asarray(x)) for name, x in implicit.items())
        try:
            return [np.asarray(r) for r in ReferenceEvaluator(proto).run(None, feeds)]
        except Exception as exc:
            raise ModelImportError(f"node {self.name} ({node.op}): cannot evaluate its static inputs: {exc}") from None

    def _opaque(self, node: gs.Node, implicit: list[str]) -> None:
        """``implicit``: what its subgraphs read from outside, inputs after the node's own."""
        proto = _single_node_model(node, self.proto)
        inputs = [self.tensor_input(i) for i in range(len(node.inputs))]
        present = [v for v in inputs if v is not None] + [self.value(name) for name in implicit]
        runner = _OnnxNodeRunner(proto, [t.name for t in node.inputs if t.name] + implicit)
        types = self._opaque_types(node)
        impl = OpaqueImpl(node.op, "onnx", tuple(Slot(i) for i in range(len(present))), fn=runner, source="onnx",
                          extra={"node": proto.graph.node[0], "implicit": implicit,
                                 "opset": [(o.domain, o.version) for o in self.proto.opset_import]})
        names = [t.name or f"{self.name}_{i}" for i, t in enumerate(node.outputs)] if len(node.outputs) > 1 else None
        out = self.graph.create_node(OPAQUE, present, {"impl": impl}, name=self.name, output_types=types,
                                     output_names=names, meta={"origin": f"onnx:{node.name or node.op}"})
        for tensor, value in zip([t for t in node.outputs if t.name], out.outputs):  # optional ones unnamed
            self.env[tensor.name] = value
            dims = [_symbol(d) if isinstance(d, str) and _symbol(d) in self.symbols else None
                    for d in tensor.shape or ()]
            if any(dims):  # dims named like the graph's symbols stay symbolic
                value.sym = tuple(None if d is None else sympy.Symbol(d) for d in dims)
            if any(v.sym for v in present) and (tensor.shape is None or any(
                    not self._known_dim(d) for d in tensor.shape)):
                warnings.warn(f"opaque node {self.name} ({node.op}) takes symbolic dims but the shape of its output "
                              f"{tensor.name!r} is known at the example sizes only: the graph runs at those sizes",
                              stacklevel=2)

    def _opaque_types(self, node: gs.Node) -> list:
        """Output types from onnx shape inference where it knows them, else as observed when the
        whole model runs on the example inputs (or drawn ones): a data-dependent shape (Expand to
        a computed shape, NonZero) is only known by running what computes it."""
        types = []
        for index, tensor in enumerate(t for t in node.outputs if t.name):
            shape = tensor.shape
            if shape is None or tensor.dtype is None or any(not self._known_dim(d) for d in shape):
                observed = self._observed().get(tensor.name)
                if observed is None:
                    raise UnsupportedError(f"node {self.name} ({node.op}): output {index} of an op with no mapping "
                                           "has a shape that neither shape inference nor a run of the model gives")
                types.append((tuple(observed.shape), _dtype_of_array(observed, tensor.name)))
            else:
                types.append((tuple(self._static_dim(d, tensor) for d in shape), _dtype_of(tensor)))
        return types

    def _known_dim(self, dim: Any) -> bool:
        return (isinstance(dim, int) and dim >= 0) or (isinstance(dim, str) and _symbol(dim) in self.symbols)

    def _static_dim(self, dim: Any, tensor: gs.Tensor) -> int:
        if isinstance(dim, int):
            return dim
        return self.symbols[_symbol(dim)]  # a dim named after a graph symbol: its size here

    def _observed(self) -> dict[str, np.ndarray]:
        """Every tensor's value when the original model runs on the example inputs (drawn ones
        without: normal floats, zero integers, so indices stay in range). Computed once, lazily,
        with onnxruntime, or onnx's reference evaluator where onnxruntime cannot run the model."""
        if self._observed_values is None:
            self._observed_values = _run_all(self.proto, self._feeds())
        return self._observed_values

    def _feeds(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        feeds = {}
        for value, tensor in zip(self.graph.inputs, self.gs_graph.inputs):
            if self.example_inputs is not None:
                feeds[tensor.name] = self.example_inputs[len(feeds)].detach().cpu().numpy()
            else:
                array = torch.zeros(value.shape, dtype=value.dtype.torch).numpy()
                feeds[tensor.name] = rng.standard_normal(array.shape).astype(array.dtype) \
                    if value.dtype.is_float else array
        return feeds


def _run_all(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The value of every node output of ``proto`` on ``feeds`` ({} if neither runtime can run it)."""
    known = {o.name for o in proto.graph.output}
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for node in proto.graph.node:
        model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in node.output
                                  if n and n not in known)
        known.update(node.output)
    names = [o.name for o in model.graph.output]
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return dict(zip(names, (np.asarray(r) for r in session.run(None, feeds))))
    except Exception:
        pass
    try:
        from onnx.reference import ReferenceEvaluator

        results = ReferenceEvaluator(proto).run(None, feeds, intermediate=True)
        return {k: np.asarray(v) for k, v in results.items() if isinstance(v, np.ndarray) or np.isscalar(v)}
    except Exception:
        return {}


def output_elements(op: str, inputs: list) -> int | None:
    """How many elements an op whose output size is data makes from these static inputs (None:
    not such an op, or inputs it cannot read). Python integers: no overflow on absurd sizes."""
    try:
        if op == "ConstantOfShape":
            return math.prod(max(int(d), 0) for d in np.asarray(inputs[0]).reshape(-1))
        if op == "Expand":
            data, shape = np.shape(inputs[0]), [int(d) for d in np.asarray(inputs[1]).reshape(-1)]
            rank = max(len(data), len(shape))
            a, b = [1] * (rank - len(data)) + list(data), [1] * (rank - len(shape)) + shape
            return math.prod(max(x, y, 0) for x, y in zip(a, b))
        if op == "Tile":
            return math.prod(np.shape(inputs[0])) * math.prod(max(int(r), 0) for r in np.asarray(inputs[1]).reshape(-1))
        if op == "Range":
            start, limit, delta = (float(np.asarray(x)) for x in inputs[:3])
            return max(math.ceil((limit - start) / delta), 0) if delta else 0
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return None


def _dtype_of_array(array: np.ndarray, name: str) -> DType:
    try:
        return DType.from_torch(torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype)
    except Exception:
        raise UnsupportedError(f"tensor {name!r}: dtype {array.dtype} is not supported") from None


def _dim_expression(dim: Any, symbols: set[str]) -> sympy.Expr | None:
    """A dim_param that is integer arithmetic over other inputs' symbols ("past_seq+seq", as
    slimgraph writes a cached decoder's attention mask) as that expression; None for anything
    else. Parsed with ``ast`` and built from its nodes: a file's strings are never evaluated."""
    import ast

    if not isinstance(dim, str) or not dim or len(dim) > 200 or _symbol(dim) == dim:
        return None
    try:
        tree = ast.parse(dim, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}

    def build(node: ast.AST) -> sympy.Expr | None:
        if isinstance(node, ast.Name) and node.id in symbols:
            return sympy.Symbol(node.id)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return sympy.Integer(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            left, right = build(node.left), build(node.right)
            return None if left is None or right is None else ops[type(node.op)](left, right)
        return None

    expr = build(tree)
    return expr if expr is not None and expr.free_symbols else None


def _symbol(dim: Any, tensor: str = "", axis: int = 0) -> str:
    """A dim_param as a symbol name (an identifier); an unnamed dim gets one from its place."""
    name = clean_name(str(dim)) if isinstance(dim, str) and dim else f"{clean_name(tensor)}_dim{axis}"
    return name if name.isidentifier() else f"d_{name}"


def _dtype_of(tensor: gs.Tensor) -> DType:
    dtype = tensor.dtype
    if dtype is None:
        return DType.float32
    try:
        return DType.from_torch(torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype))).dtype)
    except Exception:
        kind = str(dtype).split("{")[0].strip() if not isinstance(dtype, (type, np.dtype)) else f"dtype {dtype}"
        raise UnsupportedError(f"tensor {tensor.name!r}: {kind} is not supported (the IR holds tensors of "
                               "numeric and bool types)") from None


def _implicit_inputs(node: gs.Node) -> list[str]:
    """Names a node's subgraphs (If branches, Loop and Scan bodies) read from the enclosing graph."""
    if not any(isinstance(a, gs.Graph) or isinstance(a, list) and any(isinstance(g, gs.Graph) for g in a)
               for a in node.attrs.values()):
        return []
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    return list(dict.fromkeys(outer_names(OnnxExporter.export_node(node))))


def _single_node_model(node: gs.Node, model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    proto = OnnxExporter.export_node(node)
    inputs = [helper.make_empty_tensor_value_info(t.name) for t in node.inputs if t.name]
    inputs += [helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(outer_names(proto))]
    outputs = [helper.make_empty_tensor_value_info(t.name) for t in node.outputs if t.name]
    graph = helper.make_graph([proto], "node", inputs, outputs)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version or 8)


class _OnnxNodeRunner:
    """Runs one ONNX node on torch tensors for the interpreter: with onnxruntime (fast, and it runs
    ops the reference evaluator lacks, such as the deprecated Scatter), else with onnx's reference
    evaluator (the spec, for ops or types onnxruntime does not run)."""

    def __init__(self, proto: onnx.ModelProto, input_names: list[str]) -> None:
        self.proto = proto
        self.input_names = input_names
        self._sessions: dict[tuple, Any] = {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) == 1 and isinstance(inputs[0], list):
            inputs = tuple(inputs[0])
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        key = tuple((a.dtype.str, a.ndim) for a in feeds.values())
        if key not in self._sessions:
            self._sessions[key] = _ort_session(self.proto, feeds)
        session = self._sessions[key]
        if session is not None:
            try:
                return tuple(to_tensor(np.asarray(r)) for r in session.run(None, feeds))
            except Exception:
                self._sessions[key] = None
        from onnx.reference import ReferenceEvaluator

        results = ReferenceEvaluator(self.proto).run(None, feeds)
        return tuple(to_tensor(np.asarray(r)) for r in results)


def _ort_session(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Any:
    """An onnxruntime session for a one-node model, its inputs typed as ``feeds``; None if it fails."""
    try:
        import onnxruntime as ort

        model = onnx.ModelProto()
        model.CopyFrom(proto)
        for value in model.graph.input:
            array = feeds[value.name]
            value.CopyFrom(helper.make_tensor_value_info(
                value.name, helper.np_dtype_to_tensor_dtype(array.dtype), [None] * array.ndim))
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:
        return None
