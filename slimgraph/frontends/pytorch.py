"""torch.nn.Module -> IR Graph, through torch.fx (torch.export when fx cannot trace).

The frontend walks the traced graph once, evaluating every node on the example inputs as it
goes: tensors become IR Values (shapes recorded), Python ints stay Python ints (except a
tensor's batch size, kept symbolic as ``BatchDim`` so reshapes work at any batch), and every
call is mapped to a canonical op by the handler tables in ``torch_ops``. Anything without a
handler becomes an opaque node that calls the original code.

The user's model is never touched: we trace a deep copy in eval mode (import captures
inference semantics; the PyTorch backend restores trainable modules). The copy's parameters
are private, so the graph adopts them as constants without cloning them a second time.
"""

from __future__ import annotations

import copy
import copyreg
import types
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from slimgraph.errors import ModelImportError, SlimgraphError, UnsupportedError
from slimgraph.ir import OPAQUE, DType, Graph, OpaqueImpl, Value
from slimgraph.ir.opaque import Slot


@dataclass(frozen=True)
class BatchDim:
    """An int that is ``factor`` times the batch size of ``source`` (its dim 0).

    A reshape target keeps it symbolic: "N" in front when the factor is 1, else -1 (e.g. the
    batch times the number of windows in shifted-window attention).
    """

    value: int
    source: Value
    factor: int = 1

    def __index__(self) -> int:
        return self.value

    def scaled(self, multiplier: int) -> BatchDim:
        return BatchDim(self.value * multiplier, self.source, self.factor * multiplier)

    def divided(self, divisor: int) -> BatchDim | int:
        if self.factor % divisor:
            return self.value // divisor  # no longer a whole multiple of the batch: concrete
        return BatchDim(self.value // divisor, self.source, self.factor // divisor)


def concrete(x: Any) -> Any:
    """Python value of an IR-side argument (BatchDim -> int), recursively."""
    if isinstance(x, BatchDim):
        return x.value
    if isinstance(x, (list, tuple)):
        return type(x)(concrete(v) for v in x)
    return x


class Unhandled(Exception):
    """A handler declines a call it cannot map exactly; the caller falls back to opaque."""


def import_torch(model: torch.nn.Module, example_inputs: Any) -> Graph:
    if not isinstance(model, torch.nn.Module):
        raise ModelImportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = _check_example_inputs(example_inputs)
    graph = _import(model, inputs, adopt_parameters=True)
    if graph is None:  # the model's forward wrote to a parameter the graph adopted: import again, cloning
        graph = _import(model, inputs, adopt_parameters=False)
    return graph


def _import(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], adopt_parameters: bool) -> Graph | None:
    model, private = _private_copy(model)  # ours to trace and run; the user's stays bit-identical
    model.eval()
    try:
        # torch.fx.symbolic_trace without wrapping the result in a GraphModule: its generated
        # code is never run here, and the submodules it would hold are the copy's own
        fx_graph = torch.fx.Tracer().trace(model)
        root, source = model, "torch.fx"
    except Exception as fx_error:  # data-dependent Python control flow, unsupported builtins...
        root = _export(model, inputs, fx_error)
        fx_graph, source = root.graph, "torch.export"
    converter = _Converter(root, source, fx_graph=fx_graph)
    if adopt_parameters:
        converter.private = private
    graph = converter.convert(inputs)
    if not converter.finish():
        return None
    graph.meta["source"] = source
    return graph


# Values copy.deepcopy returns as they are (besides tuples of them).
_ATOMIC = frozenset({type(None), int, float, bool, complex, str, bytes, type, range, types.FunctionType,
                     types.BuiltinFunctionType, torch.dtype, torch.device, torch.layout, torch.memory_format})


def _plain_module_class(cls: type) -> bool:
    """Whether copy.deepcopy copies instances of ``cls`` through nn.Module's default state (the
    instance dict, less ``_compiled_call_impl``), which ``_private_copy`` reproduces directly."""
    return (getattr(cls, "__deepcopy__", None) is None and cls not in copyreg.dispatch_table
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is torch.nn.Module.__getstate__
            and not hasattr(cls, "__getnewargs_ex__") and not hasattr(cls, "__getnewargs__")
            and all("__slots__" not in vars(k) for k in cls.__mro__))


def _private_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[int, torch.nn.Parameter]]:
    """``copy.deepcopy(model)``, and the copy's own parameters (id -> parameter).

    The same copy, made faster: a module of a plain class (see ``_plain_module_class``) is rebuilt
    from its state with immutable attributes kept and empty containers (hook dicts) made anew,
    which is what deepcopy makes of them; everything else (parameters, buffers, other
    attributes, modules of other classes) goes through copy.deepcopy with one shared memo, so
    shared and tied objects stay shared in the copy.
    """
    memo: dict[int, Any] = {}
    plain: dict[type, bool] = {}

    def copy_module(module: torch.nn.Module) -> torch.nn.Module:
        done = memo.get(id(module))
        if done is not None:
            return done
        cls = type(module)
        if cls not in plain:
            plain[cls] = _plain_module_class(cls)
        if not plain[cls]:
            return copy.deepcopy(module, memo)
        new = cls.__new__(cls)
        memo[id(module)] = new
        state = {}
        for key, value in module.__dict__.items():
            kind = type(value)
            if key == "_compiled_call_impl":
                continue  # not part of nn.Module's state
            if kind in _ATOMIC or (kind is tuple and all(type(v) in _ATOMIC for v in value)):
                state[key] = value
            elif id(value) in memo:  # an object met before (deepcopy keeps it shared)
                state[key] = memo[id(value)]
            elif key in ("_modules", "_buffers") and kind is dict:
                state[key] = memo[id(value)] = {}
                for k, v in value.items():
                    state[key][k] = None if v is None else copy_module(v) if key == "_modules" else \
                        _copy_buffer(v, memo)
            elif kind in (dict, OrderedDict, set, list) and not value:
                state[key] = memo[id(value)] = kind()
            else:
                state[key] = copy.deepcopy(value, memo)
        new.__setstate__(state)
        return new

    private = copy_module(model)
    owned = {id(v): v for k, v in memo.items()
             if isinstance(v, torch.Tensor) and isinstance(v, torch.nn.Parameter) and k != id(v)}
    return private, owned


def _copy_buffer(t: Any, memo: dict[int, Any]) -> Any:
    """copy.deepcopy(t, memo). A plain dense CPU tensor that spans its whole storage (nearly every
    buffer) is cloned directly: the same result as Tensor.__deepcopy__'s storage copy, without its
    Python overhead, and the storage is entered in the memo as deepcopy does, so a later view of it
    still shares the copied storage."""
    done = memo.get(id(t))
    if done is not None:
        return done
    if type(t) is not torch.Tensor or not t.is_leaf or t.requires_grad or t.layout is not torch.strided \
            or t.device.type != "cpu" or t.is_quantized or t.is_conj() or t.is_neg() or t.storage_offset() \
            or not t.is_contiguous():
        return copy.deepcopy(t, memo)
    storage, storages = t.untyped_storage(), memo.setdefault("torch", {})
    if storage.nbytes() != t.numel() * t.element_size() or storage._cdata in storages:
        return copy.deepcopy(t, memo)  # a view, or a storage already copied: shared as deepcopy shares it
    new = t.detach().clone()
    memo[id(t)] = new
    storages[storage._cdata] = new.untyped_storage()
    memo.setdefault(id(memo), []).append(t)  # deepcopy's keep-alive: ids in the memo stay unique
    return new


def _check_example_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if example_inputs is None:
        raise ModelImportError("a torch.nn.Module needs example_inputs (a tensor or a tuple of tensors)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        raise ModelImportError("example_inputs must be a tensor or a tuple of tensors")
    return tuple(t.detach() for t in example_inputs)


def _export(model: torch.nn.Module, inputs: tuple, fx_error: Exception) -> torch.fx.GraphModule:
    try:
        exported = torch.export.export(model, inputs, strict=False)
        return exported.module()
    except Exception as export_error:
        raise ModelImportError(
            f"cannot trace the model: torch.fx said: {_first_line(fx_error)}; "
            f"torch.export said: {_first_line(export_error)}"
        ) from export_error


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# Calls whose result depends only on their arguments' shapes and dtypes, never on values.
VALUE_FREE = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "arange", "zeros",
              "ones", "full", "scalar_tensor", "tensor"}
RANDOM = ("rand", "bernoulli", "normal", "uniform", "multinomial", "dropout", "empty")


class _Converter:
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

    # ------------------------------------------------------------------ driver
    def convert(self, inputs: tuple[torch.Tensor, ...]) -> Graph:
        from slimgraph.frontends import torch_ops

        placeholders = [n for n in self.fx_graph.nodes if n.op == "placeholder"]
        required = [n for n in placeholders if not n.args]
        if not (len(required) <= len(inputs) <= len(placeholders)):
            raise ModelImportError(
                f"the model takes {len(required)}..{len(placeholders)} inputs, "
                f"example_inputs has {len(inputs)}"
            )
        it = iter(inputs)
        for fx_node in self.fx_graph.nodes:
            self.current = fx_node
            if fx_node.op == "placeholder":
                tensor = next(it, None)
                if tensor is None:  # a defaulted argument: baked in as a constant
                    self.ir[fx_node] = self.real[fx_node] = fx_node.args[0]
                    continue
                value = self.graph.add_input(fx_node.name, tuple(tensor.shape), DType.from_torch(tensor.dtype))
                self.ir[fx_node], self.real[fx_node] = value, tensor
            elif fx_node.op == "get_attr":
                obj = _fetch_attr(self.gm, fx_node.target)
                self.real[fx_node] = obj
                self.ir[fx_node] = self.constant(obj, fx_node.target) if isinstance(obj, torch.Tensor) else obj
            elif fx_node.op == "output":
                self.graph.set_outputs(self._outputs(fx_node.args[0]))
            else:
                self._call(fx_node, torch_ops)
        return self.graph

    def _outputs(self, result: Any) -> list[Value]:
        if isinstance(result, torch.fx.Node):
            flat = [result]
        elif isinstance(result, (tuple, list)):
            flat = list(result)
        else:
            raise UnsupportedError(f"model output of type {type(result).__name__} is not supported")
        outs = []
        for item in flat:
            value = self.ir.get(item) if isinstance(item, torch.fx.Node) else None
            if isinstance(value, torch.fx.Node) or not isinstance(value, Value):
                raise UnsupportedError(f"model output {item} is not a tensor")
            outs.append(value)
        return outs

    def _call(self, fx_node: torch.fx.Node, torch_ops: Any) -> None:
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
                f"(wrong shape or dtype?): {_first_line(exc)}"
            ) from exc
        self.real[fx_node] = real
        result = self._fold(fx_node, target, ir_args, ir_kwargs, real)
        handler = torch_ops.find_handler(fx_node.op, target) if result is None else None
        if handler is not None:
            try:
                result = handler(self, ir_args, ir_kwargs, real)
            except Unhandled:
                result = None
        if result is None and self.prefix:  # inside an inlined function: better folded than opaque
            result = self._fold(fx_node, target, ir_args, ir_kwargs, real, trainable=True)
        if result is None and fx_node.op == "call_function" and _is_python_function(target):
            result = self._inline(fx_node, target, ir_args, ir_kwargs, args, kwargs, real)
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
        if any(isinstance(v, BatchDim) for v in flat):
            return None
        values = [v for v in flat if isinstance(v, Value)]
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
        """Trace a function fx left as one call (torch.fx.wrap) with torch.export and convert its body.

        Returns None when it cannot be traced; the call then stays opaque.
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
        exported = _export_call(fn, args_t, kwargs_t, values, tensors)
        if exported is None:
            return None
        sub = _Converter(exported, "torch.export", graph=self.graph, prefix=fx_node.name)
        sub.params, sub.const_cache = self.params, self.const_cache
        sub.private, sub.adopted, sub.opaque_modules = self.private, self.adopted, self.opaque_modules
        outputs = sub.convert_inline(values, tensors)
        return outputs[0] if isinstance(real, torch.Tensor) else tuple(outputs)

    def convert_inline(self, values: list[Value], tensors: list[torch.Tensor]) -> list[Any]:
        from slimgraph.frontends import torch_ops

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
                self._call(fx_node, torch_ops)
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
        if isinstance(real, torch.Tensor):
            return outs
        return tuple(outs) if isinstance(outs, tuple) else (outs,)


class _Call(torch.nn.Module):
    """A function call with its tensor arguments as the module's inputs (for torch.export)."""

    def __init__(self, fn: Any, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, *tensors: torch.Tensor) -> Any:
        from slimgraph.ir.opaque import fill

        return self.fn(*fill(self.args, list(tensors)), **fill(self.kwargs, list(tensors)))


def _export_call(fn: Any, args: tuple, kwargs: dict, values: list[Value], tensors: list[torch.Tensor]
                 ) -> torch.fx.GraphModule | None:
    """torch.export of one call with the batch dim of its activations dynamic, so the traced body
    keeps the batch symbolic (traced at batch + 1: export specializes sizes 0 and 1)."""
    from torch.export import Dim

    dynamic = [v.rank > 0 and _reads_graph_inputs(v) for v in values]  # not tables made from weights
    examples = tuple(torch.cat([t, t[:1]]) if d else t for t, d in zip(tensors, dynamic))
    specs = tuple({0: Dim.AUTO} if d else None for d in dynamic)
    module = _Call(fn, args, kwargs)
    for attempt in ((examples, (specs,)), (tuple(tensors), None)):  # fall back to static shapes
        try:
            return torch.export.export(module, attempt[0], dynamic_shapes=attempt[1], strict=False).module()
        except Exception:
            continue
    return None


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


def _is_python_function(fn: Any) -> bool:
    import types

    module = getattr(fn, "__module__", "") or ""
    return isinstance(fn, types.FunctionType) and module != "torch" and not module.startswith("torch.")


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

