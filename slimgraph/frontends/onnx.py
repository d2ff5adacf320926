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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import helper

from slimgraph.errors import ModelImportError, UnsupportedError
from slimgraph.ir import OPAQUE, DType, Graph, OpaqueImpl, Value, clean_name
from slimgraph.ir.opaque import Slot

MIN_OPSET = 6


def load_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """Parse a file (or take a ModelProto) and load external data from inside its folder only."""
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
    _load_external_data(proto, folder)
    return proto, folder


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


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ModelImportError("the model imports no default-domain (ai.onnx) opset")


def check_structure(proto: onnx.ModelProto) -> None:
    """Opset in range; every node input defined somewhere; no cycles."""
    opset = default_opset(proto)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelImportError(f"opset {opset} is newer than the newest this onnx supports ({newest})")
    if opset < MIN_OPSET:
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


def import_onnx(model: str | os.PathLike | onnx.ModelProto, example_inputs: Sequence[torch.Tensor] | None = None
                ) -> Graph:
    proto, _ = load_model(model)
    check_structure(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:
        raise ModelImportError(f"onnx shape inference failed: {exc}") from None
    graph = _Converter(proto, example_inputs).convert()
    graph.meta["source"] = "onnx"
    graph.meta["opset"] = default_opset(proto)  # written back at this opset unless asked otherwise
    return graph


_ONNX_TO_DTYPE = {
    onnx.TensorProto.FLOAT: DType.float32, onnx.TensorProto.FLOAT16: DType.float16,
    onnx.TensorProto.BFLOAT16: DType.bfloat16, onnx.TensorProto.DOUBLE: DType.float64,
    onnx.TensorProto.INT64: DType.int64, onnx.TensorProto.INT32: DType.int32,
    onnx.TensorProto.INT8: DType.int8, onnx.TensorProto.UINT8: DType.uint8, onnx.TensorProto.BOOL: DType.bool,
}


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).copy())


class _Converter:
    def __init__(self, proto: onnx.ModelProto, example_inputs: Sequence[torch.Tensor] | None) -> None:
        self.proto = proto
        self.opset = default_opset(proto)
        self.example_inputs = list(example_inputs) if example_inputs is not None else None
        self.gs_graph = gs.import_onnx(proto)
        self.graph = Graph(proto.graph.name or "onnx")
        self.env: dict[str, Value | np.ndarray] = {}  # tensor name -> IR value or static array
        self.const_values: dict[str, Value] = {}
        self.node: gs.Node | None = None

    # ------------------------------------------------------------------ driver
    def convert(self) -> Graph:
        from slimgraph.frontends import onnx_ops

        self._inputs()
        for tensor in self.gs_graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                self.env[tensor.name] = np.asarray(tensor.values)
        try:
            self.gs_graph.toposort()
        except Exception as exc:
            raise ModelImportError(f"cannot order the graph: {exc}") from None
        for node in self.gs_graph.nodes:
            self.node = node
            self._convert_node(node, onnx_ops)
        outputs = []
        for tensor in self.gs_graph.outputs:
            outputs.append(self.value(tensor.name, f"{tensor.name}"))
        self.graph.set_outputs(outputs)
        return self.graph

    def _inputs(self) -> None:
        inputs = self.gs_graph.inputs
        if self.example_inputs is not None and len(self.example_inputs) != len(inputs):
            raise ModelImportError(f"the model has {len(inputs)} inputs, example_inputs has {len(self.example_inputs)}")
        # A symbolic leading dim alone is the batch, kept symbolic by the "N" convention. Symbolic
        # dims elsewhere (a sequence) become the IR's symbols, all of them, sized 2 (or as the
        # example inputs say) for the passes that need numbers.
        symbolic = any(not isinstance(d, int) or d < 0 for t in inputs for d in (t.shape or ())[1:])
        for i, tensor in enumerate(inputs):
            dtype = _dtype_of(tensor)
            declared = tuple(tensor.shape or ())
            names = [None if isinstance(d, int) and d >= 0 else _symbol(d, tensor.name, a)
                     for a, d in enumerate(declared)]
            if self.example_inputs is not None:
                shape = tuple(self.example_inputs[i].shape)
            elif symbolic:
                shape = tuple(2 if n else d for n, d in zip(names, declared))
            else:
                shape = declared
                if shape and not (isinstance(shape[0], int) and shape[0] >= 0):
                    shape = (1, *shape[1:])  # a symbolic batch is imported at batch 1 and kept symbolic
            value = self.graph.add_input(tensor.name, shape, dtype, names if symbolic else None)
            value.meta["onnx_name"] = tensor.name
            if tensor.shape and not isinstance(tensor.shape[0], int) and not symbolic:
                value.meta["batch_symbol"] = str(tensor.shape[0])
            self.env[tensor.name] = value

    def _convert_node(self, node: gs.Node, onnx_ops: Any) -> None:
        from slimgraph.frontends import onnx_shapes as shape_arith

        if (node.domain or "") not in ("", "ai.onnx"):
            self._opaque(node)
            return
        inputs = [self.env.get(t.name) if t.name else None for t in node.inputs]
        if shape_arith.applies(node.op, inputs):
            try:
                arrays = shape_arith.evaluate(node, inputs)
            except (ValueError, IndexError, TypeError) as exc:
                raise ModelImportError(f"node {self.name} ({node.op}): cannot compute sizes over the symbolic "
                                       f"dims: {exc}") from None
            for tensor, array in zip(node.outputs, arrays):
                self.env[tensor.name] = array  # sizes over the graph's symbols (SymDims), computed now
            return
        if all(x is None or isinstance(x, np.ndarray) for x in inputs) and node.op not in onnx_ops.NEVER_FOLD \
                and not any(isinstance(x, np.ndarray) and x.dtype == object for x in inputs):
            for tensor, array in zip(node.outputs, self._evaluate(node, inputs)):
                self.env[tensor.name] = array
            return
        handler = onnx_ops.HANDLERS.get(node.op)
        results = None
        if handler is not None:
            try:
                results = handler(self)
            except onnx_ops.Unhandled:
                results = None
        if results is None:
            self._opaque(node)
            return
        results = results if isinstance(results, (list, tuple)) else [results]
        for tensor, result in zip(node.outputs, results):
            if result is not None:
                self.env[tensor.name] = result

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

    def emit(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None, suffix: str = "") -> Any:
        node = self.graph.create_node(op, list(inputs), attrs, name=self.name + suffix,
                                      meta={"origin": f"onnx:{self.node.name or self.node.op}"})
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def _evaluate(self, node: gs.Node, inputs: list) -> list[np.ndarray]:
        """Run one node with onnx's reference evaluator, under the model's opset."""
        from onnx.reference import ReferenceEvaluator

        proto = _single_node_model(node, self.proto)
        feeds = {t.name: np.asarray(x) for t, x in zip(node.inputs, inputs) if t.name}
        try:
            return [np.asarray(r) for r in ReferenceEvaluator(proto).run(None, feeds)]
        except Exception as exc:
            raise ModelImportError(f"node {self.name} ({node.op}): cannot evaluate its static inputs: {exc}") from None

    def _opaque(self, node: gs.Node) -> None:
        proto = _single_node_model(node, self.proto)
        inputs = [self.tensor_input(i) for i in range(len(node.inputs))]
        present = [v for v in inputs if v is not None]
        runner = _OnnxNodeRunner(proto, [t.name for t in node.inputs if t.name])
        types = self._opaque_types(node, runner, present)
        impl = OpaqueImpl(node.op, "onnx", tuple(Slot(i) for i in range(len(present))), fn=runner, source="onnx",
                          extra={"node": proto.graph.node[0],
                                 "opset": [(o.domain, o.version) for o in self.proto.opset_import]})
        out = self.graph.create_node(OPAQUE, present, {"impl": impl}, name=self.name, output_types=types,
                                     meta={"origin": f"onnx:{node.name or node.op}"})
        for tensor, value in zip(node.outputs, out.outputs):
            self.env[tensor.name] = value

    def _opaque_types(self, node: gs.Node, runner: _OnnxNodeRunner, inputs: list[Value]) -> list:
        known = []
        for tensor in node.outputs:
            shape = tensor.shape
            if shape is None or any(not isinstance(d, int) or d < 0 for d in shape) or tensor.dtype is None:
                break
            known.append((tuple(shape), _dtype_of(tensor)))
        if len(known) == len(node.outputs):
            return known
        zeros = [v.const_value if v.is_constant else torch.zeros(v.shape, dtype=v.dtype.torch) for v in inputs]
        try:
            results = runner(zeros)
        except Exception as exc:
            raise UnsupportedError(f"node {self.name} ({node.op}): unknown op whose output shape cannot be "
                                   f"determined: {exc}") from None
        return [(tuple(r.shape), DType.from_torch(r.dtype)) for r in results]


def _symbol(dim: Any, tensor: str, axis: int) -> str:
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
        raise UnsupportedError(f"tensor {tensor.name!r}: dtype {dtype} is not supported") from None


def _single_node_model(node: gs.Node, model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    proto = OnnxExporter.export_node(node)
    inputs = [helper.make_empty_tensor_value_info(t.name) for t in node.inputs if t.name]
    outputs = [helper.make_empty_tensor_value_info(t.name) for t in node.outputs]
    graph = helper.make_graph([proto], "node", inputs, outputs)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version or 8)


class _OnnxNodeRunner:
    """Runs one ONNX node on torch tensors with onnx's reference evaluator (for the interpreter)."""

    def __init__(self, proto: onnx.ModelProto, input_names: list[str]) -> None:
        self.proto = proto
        self.input_names = input_names
        self._session = None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from onnx.reference import ReferenceEvaluator

        if len(inputs) == 1 and isinstance(inputs[0], list):
            inputs = tuple(inputs[0])
        if self._session is None:
            self._session = ReferenceEvaluator(self.proto)
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        return tuple(to_tensor(np.asarray(r)) for r in self._session.run(None, feeds))

