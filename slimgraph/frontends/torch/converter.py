"""The torch converter: walks a traced fx graph and builds the IR Graph.

It evaluates every fx node on the example inputs as it goes: tensors become IR Values (shapes
recorded), Python ints stay Python ints (except a tensor's batch size, kept symbolic as
``BatchDim`` so reshapes work at any batch), and every call goes to its handler in ``ops``
(modules, functions and Tensor methods for torch.fx; Core ATen for torch.export). A call with no
handler is exported on its own and its Core ATen decomposition converted in its place; what
cannot be converted either way becomes an opaque node that calls the original code.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from slimgraph.errors import ModelImportError, SlimgraphError, UnsupportedError
from slimgraph.frontends.torch import ops, tracing
from slimgraph.frontends.torch.dims import BatchDim
from slimgraph.frontends.torch.ops.registry import Unhandled
from slimgraph.ir import OPAQUE, DType, Graph, OpaqueImpl, Value
from slimgraph.ir.opaque import Slot
from slimgraph.ir.symbolic import SymDim

DEFAULT = object()  # a placeholder fed nothing: its default value is used


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# Calls whose result depends only on their arguments' shapes and dtypes, never on values.
VALUE_FREE = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "arange", "zeros",
              "ones", "full", "scalar_tensor", "tensor"}
RANDOM = ("rand", "bernoulli", "normal", "uniform", "multinomial", "dropout", "empty")


class Converter:
    def __init__(self, gm: torch.nn.Module, source: str, graph: Graph | None = None,
                 prefix: str = "", fx_graph: torch.fx.Graph | None = None) -> None:
        self.gm = gm  # the module the fx graph's targets name (a GraphModule, or the traced root)
        self.fx_graph = fx_graph if fx_graph is not None else gm.graph
        self.graph = graph if graph is not None else Graph(type(gm).__name__ if source == "torch.fx" else "exported")
        self.prefix = prefix  # inlined calls name their nodes after the call they replace
        self.modules = dict(gm.named_modules())
        self.params = {id(p) for m in self.modules.values() for p in m._parameters.values() if p is not None}
        self.ir: dict[torch.fx.Node, Any] = {}  # fx node -> Value / python value / BatchDim / tuple
        self.real: dict[torch.fx.Node, Any] = {}  # fx node -> concrete result
        self.const_cache: dict[int, Value] = {}
        self.current: torch.fx.Node | None = None
        # parameters of our private copy, adopted as constants without a clone (id -> parameter);
        # the adopted ones with their version counter, and the modules opaque nodes call
        self.private: dict[int, torch.nn.Parameter] = {}
        self.adopted: dict[int, tuple[torch.Tensor, int, Value]] = {}
        self.opaque_modules: list[torch.nn.Module] = []
        self.decomposed: list[str] = []  # calls converted through their Core ATen decomposition

    # ------------------------------------------------------------------ driver
    def convert(self, feeds: list[Any], output_names: list[str | None] | None = None,
                input_names: list[str | None] | None = None, input_syms: list[Any] | None = None) -> Graph:
        """Walk the fx graph: ``feeds`` holds one entry per placeholder, in order: a tensor (a graph
        input named after the placeholder, or ``input_names``), another Python value (baked in),
        or ``DEFAULT``. ``input_syms``: per placeholder, the symbol name of each dim (or None)."""
        names = dict(zip(range(len(feeds)), input_names or []))
        syms = dict(zip(range(len(feeds)), input_syms or []))
        placeholders = [n for n in self.fx_graph.nodes if n.op == "placeholder"]
        if len(feeds) != len(placeholders):
            raise ModelImportError(f"the traced model takes {len(placeholders)} inputs, got {len(feeds)}")
        feed = dict(zip(placeholders, feeds))
        index = {n: i for i, n in enumerate(placeholders)}
        for fx_node in self.fx_graph.nodes:
            self.current = fx_node
            if fx_node.op == "placeholder":
                given = feed[fx_node]
                if given is DEFAULT:
                    if not fx_node.args:
                        raise ModelImportError(f"the model's input {fx_node.target!r} has no example and no default")
                    given = fx_node.args[0]
                if isinstance(given, torch.Tensor):
                    name = names.get(index[fx_node]) or str(fx_node.target).lstrip("*")
                    value = self.graph.add_input(name, tuple(given.shape), DType.from_torch(given.dtype),
                                                 syms.get(index[fx_node]))
                    self.ir[fx_node], self.real[fx_node] = value, given
                else:  # a flag or a default: baked in as a constant
                    self.ir[fx_node] = self.real[fx_node] = given
            elif fx_node.op == "get_attr":
                obj = _fetch_attr(self.gm, fx_node.target)
                self.real[fx_node] = obj
                self.ir[fx_node] = self.constant(obj, fx_node.target) if isinstance(obj, torch.Tensor) else obj
            elif fx_node.op == "output":
                self._set_outputs(fx_node.args[0], output_names)
            else:
                self._call(fx_node)
        return self.graph

    def _set_outputs(self, result: Any, names: list[str | None] | None) -> None:
        """Tensors of the output structure (tuples, lists, dicts, ModelOutputs) in pytree order; a
        mapping's keys name its outputs."""
        flat = pytree.tree_flatten_with_path(torch.fx.node.map_arg(result, lambda n: self.ir[n]))[0]
        flat = [(path, item) for path, item in flat if item is not None]
        if names is None:
            names = tracing.output_names([path for path, _ in flat])
        outs = []
        for (path, value), name in zip(flat, names):
            if not isinstance(value, Value):
                where = pytree.keystr(path) or ""
                raise UnsupportedError(f"model output {where} is {type(value).__name__}, not a tensor")
            if name and value.producer is not None and value not in outs and value.name != name:
                value.name = self.graph.unique_name(name)
            outs.append(value)
        if not outs:
            raise UnsupportedError("the model returns no tensor")
        self.graph.set_outputs(outs)

    def _call(self, fx_node: torch.fx.Node) -> None:
        args = torch.fx.node.map_arg(fx_node.args, lambda n: self.real[n])
        kwargs = torch.fx.node.map_arg(fx_node.kwargs, lambda n: self.real[n])
        ir_args = torch.fx.node.map_arg(fx_node.args, lambda n: self.ir[n])
        ir_kwargs = torch.fx.node.map_arg(fx_node.kwargs, lambda n: self.ir[n])
        if fx_node.op == "call_module":
            target = self.modules[fx_node.target]
            call = target
        elif fx_node.op == "call_method":
            target = fx_node.target
            call = lambda *a, **k: getattr(a[0], fx_node.target)(*a[1:], **k)  # noqa: E731
        else:
            target = fx_node.target
            call = target
        try:
            with torch.no_grad():
                real = call(*args, **kwargs)
        except Exception as exc:
            raise ModelImportError(
                f"node {fx_node.name} ({_describe(fx_node)}) failed on the example inputs "
                f"(wrong shape or dtype?): {first_line(exc)}"
            ) from exc
        self.real[fx_node] = real
        result = self._fold(fx_node, target, ir_args, ir_kwargs, real)
        handler = ops.find_handler(fx_node.op, target) if result is None else None
        if handler is not None:
            try:
                result = handler(self, ir_args, ir_kwargs, real)
            except Unhandled:
                result = None
            else:
                if result is None and real is None:  # handled, and nothing to return (an assertion)
                    self.ir[fx_node] = None
                    return
        if result is None and self.prefix:  # inside an inlined function: better folded than opaque
            result = self._fold(fx_node, target, ir_args, ir_kwargs, real, trainable=True)
        if result is None and fx_node.op != "call_module":  # torch.cumsum(x, 1) is aten.cumsum(x, 1)
            same = ops.registry.aten_equivalent(fx_node.op, target, args, kwargs, real)
            if same is not None:
                try:
                    result = ops.find_handler("call_function", same)(self, ir_args, ir_kwargs, real)
                except Unhandled:
                    result = None
        if result is None and _has_sym_dims((ir_args, ir_kwargs)):
            raise UnsupportedError(f"node {fx_node.name} ({_describe(fx_node)}) takes a symbolic size and has no "
                                   "handler that keeps it symbolic: it would run at the traced size only")
        if result is None and not isinstance(target, torch._ops.OpOverload):
            # a call with no handler (a functional, a Tensor method, a module whose forward fx did
            # not enter, a wrapped Python function): its Core ATen decomposition, converted
            result = self._inline(fx_node, call, ir_args, ir_kwargs, args, kwargs, real)
        if result is None:
            result = self.opaque(fx_node, target, ir_args, ir_kwargs, real)
        self._check(fx_node, result, real)
        self.ir[fx_node] = result

    def _fold(self, fx_node: torch.fx.Node, target: Any, ir_args: Any, ir_kwargs: Any, real: Any,
              trainable: bool = False) -> Any:
        """A tensor computed from constants alone (index tables, attention masks) becomes a constant.

        What reads a parameter folds only with ``trainable`` (inside an inlined function, when no
        handler maps the call: the alternative is an opaque call), so parameters stay trainable in
        the emitted module. Never folds what depends on the batch size or on randomness.
        """
        if not isinstance(real, torch.Tensor) or fx_node.op == "call_module":
            return None
        name = getattr(target, "__name__", str(target)).split(".")[0]
        if any(word in name for word in RANDOM):
            return None
        flat: list[Any] = []
        _leaves((ir_args, ir_kwargs), flat)
        if any(isinstance(v, (BatchDim, SymDim)) for v in flat):
            return None
        values = [v for v in flat if isinstance(v, Value)]
        if any(v.sym for v in values):
            return None  # its shape follows the graph's symbols
        dynamic = [v for v in values if not v.is_constant]
        if dynamic and name not in VALUE_FREE:
            return None
        if not values and name not in VALUE_FREE:
            return None
        if not trainable and any(v.meta.get("trainable") for v in values):
            return None
        return self.graph.add_constant(f"{self.name}", real.detach().clone())

    def _inline(self, fx_node: torch.fx.Node, fn: Any, ir_args: Any, ir_kwargs: Any, args: Any, kwargs: Any,
                real: Any) -> Any:
        """Export one call fx left whole, decompose it to Core ATen and convert its body in place.

        Returns None when it cannot be exported; the call then stays opaque.
        """
        values: list[Value] = []
        tensors: list[torch.Tensor] = []

        def template(ir: Any, concrete_value: Any) -> Any:
            if isinstance(ir, Value):
                values.append(ir)
                tensors.append(concrete_value)
                return Slot(len(values) - 1)
            if isinstance(ir, (list, tuple)) and isinstance(concrete_value, (list, tuple)):
                return type(ir)(template(i, c) for i, c in zip(ir, concrete_value))
            return concrete_value

        args_t = template(tuple(ir_args), tuple(args))
        kwargs_t = {k: template(v, kwargs[k]) for k, v in ir_kwargs.items()}
        batched = [v.rank > 0 and _reads_graph_inputs(v) for v in values]  # not tables made from weights
        # with the batch dynamic (dim 0 of what reads the graph inputs), else static: dim 0 is not
        # always the batch (a sequence-first RNN), and a wrong guess fails when converted
        for dynamic in ([True, False] if any(batched) else [False]):
            flags = batched if dynamic else [False] * len(values)
            program = tracing.export_call(fn, args_t, kwargs_t, tensors, flags)
            if program is None:
                continue
            # as it is where every op has a handler; decomposed where one refused its arguments (an
            # opaque node, a symbolic size it cannot keep); as it is, opaque nodes and all, where that fails
            for decompose, opaque_ok in ((None, False), (True, True), (False, True)):
                try:
                    exported, decomposed = tracing.lower(program, decompose)
                except Exception:  # a decomposition that fails on this call
                    continue
                outputs = self._convert_export(fx_node, exported, values, tensors, opaque_ok or decomposed)
                if outputs is not None:
                    self.decomposed.append(_describe(fx_node))
                    return pytree.tree_unflatten(outputs, pytree.tree_structure(real))
                if decompose is None and decomposed:  # decomposed from the start: nothing else to try
                    break
        return None

    def _convert_export(self, fx_node: torch.fx.Node, exported: torch.fx.GraphModule, values: list[Value],
                        tensors: list[torch.Tensor], opaque_ok: bool) -> list[Any] | None:
        """The outputs of an exported call's body converted in place, or None (nothing added) where
        it fails, or leaves an opaque node and not ``opaque_ok``."""
        nodes, constants = len(self.graph), set(self.graph.constants)
        sub = Converter(exported, "torch.export", graph=self.graph, prefix=fx_node.name)
        sub.params, sub.const_cache = self.params, self.const_cache
        sub.private, sub.adopted, sub.opaque_modules = self.private, self.adopted, self.opaque_modules
        sub.decomposed = self.decomposed
        try:
            outputs = sub.convert_inline(values, tensors)
        except SlimgraphError:
            self._roll_back(nodes, constants)
            return None
        if not opaque_ok and any(n.op == OPAQUE for n in self.graph.nodes[nodes:]):
            self._roll_back(nodes, constants)
            return None
        return outputs

    def _roll_back(self, nodes: int, constants: set[str]) -> None:
        """Remove what a failed conversion added after the graph had ``nodes`` nodes and ``constants``."""
        for node in reversed(self.graph.nodes[nodes:]):
            for v in node.outputs:
                for use in list(v.uses):
                    use.node.set_input(use.index, None)
            self.graph.remove_node(node)
        for name in set(self.graph.constants) - constants:
            self.graph.constants.pop(name)
        for key in [k for k, v in self.const_cache.items() if v.name not in self.graph.constants]:
            del self.const_cache[key]

    def convert_inline(self, values: list[Value], tensors: list[torch.Tensor]) -> list[Any]:
        placeholders = iter(zip(values, tensors))
        outputs: list[Any] = []
        for fx_node in self.fx_graph.nodes:
            self.current = fx_node
            if fx_node.op == "placeholder":
                self.ir[fx_node], self.real[fx_node] = next(placeholders)
            elif fx_node.op == "get_attr":
                obj = _fetch_attr(self.gm, fx_node.target)
                self.real[fx_node] = obj
                self.ir[fx_node] = self.constant(obj, f"{self.prefix}_{fx_node.target}") \
                    if isinstance(obj, torch.Tensor) else obj
            elif fx_node.op == "output":
                result = fx_node.args[0]
                flat = list(result) if isinstance(result, (tuple, list)) else [result]
                outputs = [self.ir[n] if isinstance(n, torch.fx.Node) else n for n in flat]
            else:
                self._call(fx_node)
        return outputs

    def _check(self, fx_node: torch.fx.Node, result: Any, real: Any) -> None:
        """The IR's inferred type must be what torch computed; a mismatch is a frontend bug."""
        if isinstance(result, Value) and isinstance(real, torch.Tensor):
            if result.shape != tuple(real.shape) or result.dtype != DType.from_torch(real.dtype):
                raise SlimgraphError(
                    f"node {fx_node.name}: IR type {result.type_str()} differs from torch's "
                    f"{tuple(real.shape)} {real.dtype} (frontend bug)"
                )

    # ------------------------------------------------------------------ helpers for handlers
    @property
    def name(self) -> str:
        return f"{self.prefix}_{self.current.name}" if self.prefix else self.current.name

    def module_path(self) -> str | None:
        return self.current.target if self.current.op == "call_module" else None

    def emit(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None, **kw: Any) -> Value | tuple:
        meta = {"origin": f"torch:{self.current.name}"}
        if self.current.op == "call_module":
            meta["module"] = self.current.target
        node = self.graph.create_node(op, list(inputs), attrs, name=kw.pop("name", self.name), meta=meta, **kw)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

    def constant(self, tensor: torch.Tensor, name: str) -> Value:
        """A graph constant for a parameter/buffer (deduplicated, so tied weights stay tied).

        A parameter of our private copy is adopted as it is; anything else (buffers, which a
        forward may update in place, tensors the copy does not own) is cloned.
        """
        key = id(tensor)
        if key not in self.const_cache:
            trainable = key in self.params
            adopt = self.private.get(key) is tensor and not tensor.is_inference()  # inference: no version
            value = self.graph.add_constant(name, tensor.detach() if adopt else tensor.detach().clone(),
                                            trainable=trainable)
            if adopt:
                self.adopted[key] = (tensor, tensor._version, value)
            self.const_cache[key] = value
        return self.const_cache[key]

    def finish(self) -> bool:
        """After conversion: False if the forward wrote in place to an adopted parameter (import
        again, cloning); a parameter an opaque node's module also holds is cloned after all, so
        the graph's constants never share memory with a module it calls."""
        if any(tensor._version != version for tensor, version, _ in self.adopted.values()):
            return False
        if self.opaque_modules and self.adopted:
            held = {id(t) for m in self.opaque_modules for sub in m.modules()
                    for t in (*sub._parameters.values(), *sub._buffers.values(), *vars(sub).values())
                    if isinstance(t, torch.Tensor)}
            for key in held & self.adopted.keys():
                value = self.adopted[key][2]
                value.const_value = value.const_value.clone()
        return True

    def scalar(self, number: float | int | bool, like: Value) -> Value:
        """A Python number operand as a 0-d constant of a compatible dtype."""
        if isinstance(number, bool) or (isinstance(number, int) and not like.dtype.is_float):
            dtype = like.dtype.torch if not isinstance(number, bool) else torch.bool
        else:
            dtype = like.dtype.torch if like.dtype.is_float else torch.float32
        return self.graph.add_constant(f"{self.name}_scalar", torch.tensor(number, dtype=dtype))

    def as_value(self, x: Any, like: Value | None = None) -> Value:
        if isinstance(x, Value):
            return x
        if isinstance(x, torch.Tensor):
            return self.graph.add_constant(f"{self.name}_const", x.detach().clone())
        if isinstance(x, (int, float, bool)) and like is not None:
            return self.scalar(x, like)
        if isinstance(x, SymDim) and like is not None:  # a symbolic size used as a number: arange(seq) + past
            size = self.emit("sizes", [], {"values": [x], "shape": []})
            dtype = str(like.dtype.torch).removeprefix("torch.")
            return size if like.dtype == DType.int64 else self.emit("cast", [size], {"dtype": dtype})
        raise Unhandled

    def opaque(self, fx_node: torch.fx.Node, target: Any, args: Any, kwargs: Any, real: Any) -> Any:
        inputs: list[Value] = []

        def template(x: Any) -> Any:
            if isinstance(x, Value):
                inputs.append(x)
                return Slot(len(inputs) - 1)
            if isinstance(x, BatchDim):
                return x.value
            if isinstance(x, (list, tuple)):
                return type(x)(template(v) for v in x)
            if isinstance(x, dict):
                return {k: template(v) for k, v in x.items()}
            return x

        args_t, kwargs_t = template(args), template(kwargs)
        if fx_node.op == "call_module":
            impl = OpaqueImpl(fx_node.target, "module", args_t, kwargs_t, module=target)
            self.opaque_modules.append(target)
        elif fx_node.op == "call_method":
            impl = OpaqueImpl(target, "method", args_t, kwargs_t)
        else:
            impl = OpaqueImpl(_qualname(target), "function", args_t, kwargs_t, fn=target)
        tensors = [real] if isinstance(real, torch.Tensor) else list(real) if _is_tensor_seq(real) else None
        if tensors is None:
            if isinstance(real, (int, float, bool, str, type(None), torch.dtype, torch.device)):
                return real  # a host value (shape arithmetic, flags): evaluated now
            if isinstance(real, (tuple, list)) and all(isinstance(r, (int, float, bool)) for r in real):
                return real
            raise UnsupportedError(f"node {fx_node.name} ({_describe(fx_node)}) returns {type(real).__name__}")
        types = [(tuple(t.shape), DType.from_torch(t.dtype)) for t in tensors]
        outs = self.emit(OPAQUE, inputs, {"impl": impl}, output_types=types)
        if any(v.sym for v in inputs):
            _symbolic_outputs(outs if isinstance(outs, tuple) else (outs,), impl)
        if isinstance(real, torch.Tensor):
            return outs
        return tuple(outs) if isinstance(outs, tuple) else (outs,)


def _symbolic_outputs(outputs: tuple[Value, ...], impl: OpaqueImpl) -> None:
    """An opaque call on symbolic dims: its output dims as expressions over the symbols where it
    runs on fake tensors; else a warning, since the graph then runs at the traced sizes only."""
    from slimgraph.ir.symbolic import infer_syms

    node = outputs[0].producer
    syms = infer_syms(node, lambda xs, attrs: impl(list(xs)))
    if syms is None:
        warnings.warn(f"opaque node {node.name} ({impl.target}) takes symbolic dims but its output shapes are "
                      "known at the traced sizes only: the graph runs at those sizes", stacklevel=2)
        return
    for value, sym in zip(outputs, syms):
        value.sym = sym


def _reads_graph_inputs(value: Value) -> bool:
    """Whether ``value`` is computed from a graph input (so its leading dim is the batch)."""
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if id(v) in seen or v.is_constant:
            continue
        seen.add(id(v))
        if v.producer is None:
            return True  # a graph input
        stack.extend(u for u in v.producer.inputs if u is not None)
    return False


def _has_sym_dims(x: Any) -> bool:
    flat: list[Any] = []
    _leaves(x, flat)
    return any(isinstance(v, SymDim) for v in flat)


def _leaves(x: Any, out: list[Any]) -> None:
    """The leaves of a call's IR-side arguments (tuples, lists and dicts, as torch.fx builds them;
    a slice is a leaf, as for torch.utils._pytree), appended to ``out``."""
    if isinstance(x, (tuple, list)):
        for item in x:
            _leaves(item, out)
    elif isinstance(x, dict):
        for item in x.values():
            _leaves(item, out)
    else:
        out.append(x)


def _is_tensor_seq(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _qualname(fn: Any) -> str:
    """An import path for a called function, e.g. "torch.cumsum" or "torchvision.ops.foo"."""
    if isinstance(fn, torch._ops.OpOverload):
        return f"torch.ops.{fn.namespace}.{fn._opname}.{fn._overloadname}"
    name = getattr(fn, "__name__", None)
    import torch.nn.functional as F

    for namespace, path in ((torch, "torch"), (F, "torch.nn.functional"), (torch.special, "torch.special"),
                            (torch.linalg, "torch.linalg"), (torch.fft, "torch.fft")):
        if name and getattr(namespace, name, None) is fn:
            return f"{path}.{name}"
    module = getattr(fn, "__module__", None) or ""
    qualname = getattr(fn, "__qualname__", None) or name or repr(fn)
    if module in ("_operator", "operator"):
        module = "operator"
    return f"{module}.{qualname}" if module else qualname


def _describe(fx_node: torch.fx.Node) -> str:
    if fx_node.op == "call_module":
        return f"module {fx_node.target}"
    if fx_node.op == "call_method":
        return f"method .{fx_node.target}()"
    return f"function {_qualname(fx_node.target)}"

