"""IR Graph -> readable PyTorch source (a real nn.Module) plus its weights.

The source reads like hand-written code, in the spirit of torch.fx's codegen: layers with
weights become named submodules built in ``__init__`` (nn.Conv2d, nn.BatchNorm2d, ...), and
``forward`` has one statement per node (but one ``qconv`` call for each int8 conv unit that
onnxruntime fuses, DQ -> conv -> Q). Weights travel separately as a state dict, so the source
holds no data and needs only torch. Opaque nodes call the original code: a function by its
import path, or a module kept beside the weights.
"""

from __future__ import annotations

import builtins
import copy
import importlib
import keyword
import linecache
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimgraph.backends import ort_fusion
from slimgraph.errors import SlimgraphError, UnsupportedError
from slimgraph.ir import OPAQUE, DType, Graph, Node, OpaqueImpl, Value, clean_name
from slimgraph.ir.opaque import Slot
from slimgraph.ir.symbolic import SymDim

RESERVED = {"self", "torch", "nn", "F", "os", "math", "importlib", "load", "Model"}


_MODULE = torch.nn.Module()  # the attributes every nn.Module has (training too, set per instance)


@dataclass
class _Ctx:
    graph: Graph
    names: dict[int, str] = field(default_factory=dict)  # id(Value) -> python expression
    init: list[str] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, Value] = field(default_factory=dict)  # state key -> the constant it holds
    externals: dict[str, Any] = field(default_factory=dict)
    imports: dict[str, str] = field(default_factory=dict)  # alias -> import path
    attrs: set[str] = field(default_factory=set)
    uses_helpers: set[str] = field(default_factory=set)

    def attr(self, base: str) -> str:
        """A fresh module attribute name; nn.Module's own (to, eval, forward, ...) stay its own."""
        name = _ident(base)
        while name in self.attrs or hasattr(_MODULE, name):
            name += "_"
        self.attrs.add(name)
        return name

    def ref(self, v: Value | None) -> str:
        if v is None:
            return "None"
        if id(v) in self.names:
            return self.names[id(v)]
        if v.is_constant:  # first reference: inline a scalar, else register a parameter/buffer
            tensor = v.const_value
            if tensor.dim() == 0 and tensor.dtype.is_floating_point and math.isfinite(float(tensor)) \
                    and tensor.dtype == torch.float32:
                self.names[id(v)] = repr(float(tensor))
                return self.names[id(v)]
            return self.register(v, bool(v.meta.get("trainable")) and tensor.dtype.is_floating_point)
        raise SlimgraphError(f"value %{v.name} is used before it is defined")


    def tensor(self, v: Value | None) -> str:
        """``v`` as a tensor expression: torch functions (torch.maximum, torch.where) take no Python
        numbers where operators would, so a scalar constant is a buffer here, not a literal."""
        if v is not None and v.is_constant and id(v) not in self.names:
            return self.register(v, bool(v.meta.get("trainable")) and v.const_value.dtype.is_floating_point)
        if v is not None and v.is_constant and not self.names[id(v)].startswith("self."):
            return f"torch.tensor({self.names[id(v)]})"
        return self.ref(v)

    def register(self, v: Value, trainable: bool) -> str:
        """Constant ``v`` as a module attribute: an nn.Parameter if ``trainable``, else a buffer.
        Either way it is in the state dict, where load_weights finds it."""
        if id(v) not in self.names:
            name = self.attr(v.name)
            empty = f"torch.empty({_lit(tuple(v.shape))}, dtype={v.const_value.dtype})"
            self.init.append(f"self.{name} = nn.Parameter({empty})" if trainable
                             else f"self.register_buffer({name!r}, {empty})")
            self.state[name] = v.const_value
            self.sources[name] = v
            self.names[id(v)] = f"self.{name}"
        return self.names[id(v)]


def _ident(name: str) -> str:
    name = clean_name(name)
    # a local named like a helper the module defines (attention, fake_quant, ...) would shadow it
    if name in RESERVED or name in _HELPERS or hasattr(builtins, name) or keyword.iskeyword(name):
        name += "_"
    return name


def _lit(x: Any) -> str:
    """A Python literal for attribute data; anything else is refused (names are data, not code).
    A symbolic size is its expression over the symbol variables forward binds first."""
    if isinstance(x, SymDim):
        return f"({x})"
    if x is None or isinstance(x, (bool, int)):
        return repr(x)
    if isinstance(x, float):
        return repr(x) if math.isfinite(x) else f"float({str(x)!r})"
    if isinstance(x, str):
        return repr(x)
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_lit(v) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner}{',' if len(x) == 1 else ''})"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{_lit(k)}: {_lit(v)}" for k, v in x.items()) + "}"
    if isinstance(x, torch.dtype):
        return str(x)
    if isinstance(x, torch.device):
        return f"torch.device({str(x)!r})"
    raise UnsupportedError(f"cannot write {type(x).__name__} {x!r} as source")


class _Args:
    """A node's input expressions, made on first access: weights a submodule owns are never
    registered a second time as loose parameters."""

    def __init__(self, ctx: _Ctx, node: Node) -> None:
        self.ctx, self.node = ctx, node

    def __getitem__(self, i: int) -> str:
        return self.ctx.ref(self.node.inputs[i])

    def __len__(self) -> int:
        return len(self.node.inputs)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# ============================================================================ emitters
Emitter = Callable[[_Ctx, Node, list[str]], str]
EMITTERS: dict[str, Emitter] = {}


def emitter(*ops: str):
    def deco(fn: Emitter) -> Emitter:
        for op in ops:
            EMITTERS[op] = fn
        return fn

    return deco


def _owned_params(ctx: _Ctx, node: Node, indices: range, trainable: range | None = None) -> bool:
    """Weights become a submodule's own parameters only if no other node reads them, and only
    if they are trainable (fixed tensors such as Winograd transforms stay buffers).
    ``trainable`` names the inputs that must be trainable (default: all of ``indices``)."""
    for i in indices:
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and (not v.is_constant or len(v.uses) != 1 or v in ctx.graph.outputs):
            return False
        if v is not None and i in (trainable if trainable is not None else indices) \
                and not v.meta.get("trainable", True):
            return False
    return True


def _module(ctx: _Ctx, node: Node, ctor: str, params: dict[str, Value | None]) -> str:
    attr = ctx.attr(node.name)
    ctx.init.append(f"self.{attr} = {ctor}")
    for pname, v in params.items():
        if v is not None:
            ctx.state[f"{attr}.{pname}"] = v.const_value
            ctx.sources[f"{attr}.{pname}"] = v
    return attr


def _pair(values: list[int]) -> str:
    return _lit(tuple(values))


def _conv_padding(x: str, pads: list[int], nd: int, fill: str | None = None) -> tuple[str, list[int]]:
    """torch convs pad symmetrically: asymmetric ONNX pads become an explicit F.pad (with ``fill``)."""
    if pads[:nd] == pads[nd:]:
        return x, pads[:nd]
    value = "" if fill is None else f", value={fill}"
    return f"F.pad({x}, {_lit(_torch_pads(pads))}{value})", [0] * nd


@emitter("conv")
def emit_conv(ctx, node, a):
    w = node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    at = node.attrs
    nd = w.rank - 2
    xin, padding = _conv_padding(a[0], at["pads"], nd)
    if _owned_params(ctx, node, range(1, 3)):
        cin = w.shape[1] * at["groups"]
        options = [f"kernel_size={_pair(w.shape[2:])}"]
        for key, value, default in [("stride", at["stride"], 1), ("padding", padding, 0),
                                    ("dilation", at["dilation"], 1)]:
            if any(v != default for v in value):
                options.append(f"{key}={_pair(value)}")
        if at["groups"] != 1:
            options.append(f"groups={at['groups']}")
        if b is None:
            options.append("bias=False")
        ctor = f"nn.Conv{nd}d({cin}, {w.shape[0]}, {', '.join(options)})"
        return f"self.{_module(ctx, node, ctor, {'weight': w, 'bias': b})}({xin})"
    return (f"F.conv{nd}d({xin}, {a[1]}, {a[2] if b is not None else 'None'}, {_pair(at['stride'])}, "
            f"{_pair(padding)}, {_pair(at['dilation'])}, {at['groups']})")


def _torch_pads(pads: list[int]) -> list[int]:
    n = len(pads) // 2
    out: list[int] = []
    for d in reversed(range(n)):
        out += [pads[d], pads[n + d]]
    return out


@emitter("linear")
def emit_linear(ctx, node, a):
    w = node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if _owned_params(ctx, node, range(1, 3)):
        ctor = f"nn.Linear({w.shape[1]}, {w.shape[0]}{'' if b is not None else ', bias=False'})"
        return f"self.{_module(ctx, node, ctor, {'weight': w, 'bias': b})}({a[0]})"
    return f"F.linear({a[0]}, {a[1]}, {a[2] if b is not None else 'None'})"


@emitter("batch_norm")
def emit_batch_norm(ctx, node, a):
    x, w, b, m, v = node.inputs
    if _owned_params(ctx, node, range(1, 5), trainable=range(1, 3)):
        kind = {2: 1, 3: 1, 4: 2, 5: 3}[x.rank]
        eps, momentum = node.attrs["eps"], node.attrs.get("momentum", 0.1)
        options = ("" if eps == 1e-5 else f", eps={eps!r}") + ("" if momentum == 0.1 else f", momentum={momentum!r}")
        ctor = f"nn.BatchNorm{kind}d({w.shape[0]}{options})"
        attr = _module(ctx, node, ctor, {"weight": w, "bias": b, "running_mean": m, "running_var": v})
        ctx.state[f"{attr}.num_batches_tracked"] = torch.tensor(0)
        return f"self.{attr}({a[0]})"
    return f"F.batch_norm({a[0]}, {a[3]}, {a[4]}, {a[1]}, {a[2]}, False, 0.0, {node.attrs['eps']!r})"


@emitter("layer_norm")
def emit_layer_norm(ctx, node, a):
    w = node.inputs[1] if len(node.inputs) > 1 else None
    b = node.inputs[2] if len(node.inputs) > 2 else None
    shape, eps = node.attrs["normalized_shape"], node.attrs["eps"]
    if w is not None and _owned_params(ctx, node, range(1, 3)):
        ctor = f"nn.LayerNorm({_lit(tuple(shape))}, eps={eps!r}, bias={b is not None})"
        return f"self.{_module(ctx, node, ctor, {'weight': w, 'bias': b})}({a[0]})"
    wa = a[1] if w is not None else "None"
    ba = a[2] if b is not None else "None"
    return f"F.layer_norm({a[0]}, {_lit(tuple(shape))}, {wa}, {ba}, {eps!r})"


@emitter("group_norm")
def emit_group_norm(ctx, node, a):
    w = node.inputs[1] if len(node.inputs) > 1 else None
    b = node.inputs[2] if len(node.inputs) > 2 else None
    return (f"F.group_norm({a[0]}, {node.attrs['num_groups']}, {a[1] if w is not None else 'None'}, "
            f"{a[2] if b is not None else 'None'}, {node.attrs['eps']!r})")


@emitter("gather")
def emit_gather(ctx, node, a):
    indices = torch.tensor(node.attrs["indices"], dtype=torch.long)
    name = ctx.attr(f"{node.name}_indices")  # a buffer: long index lists stay out of the source
    ctx.init.append(f"self.register_buffer({name!r}, torch.empty({len(indices)}, dtype=torch.long))")
    ctx.state[name] = indices
    return f"{a[0]}.index_select({node.attrs['axis']}, self.{name})"


@emitter("attention", "multi_head_attention")
def emit_attention(ctx, node, a):
    """attention and onnxruntime's multi_head_attention (whose attention_bias is a float mask) share a helper."""
    ctx.uses_helpers.add("attention")
    at = node.attrs
    dropout = f", {at['dropout']!r}, self.training" if at.get("dropout") else ""
    mask = f", mask={a[3]}" if len(node.inputs) > 3 else ""
    return f"attention({a[0]}, {a[1]}, {a[2]}, {at['num_heads']}, {at['scale']!r}{dropout}{mask})"


@emitter("skip_layer_norm")
def emit_skip_layer_norm(ctx, node, a):
    ctx.uses_helpers.add("skip_layer_norm")
    bias = f", {a[4]}" if len(node.inputs) > 4 else ""
    return f"skip_layer_norm({a[0]}, {a[1]}, {a[2]}, {a[3]}, {node.attrs['eps']!r}{bias})"


@emitter("dynamic_quant_matmul")
def emit_dynamic_quant_matmul(ctx, node, a):
    ctx.uses_helpers.add("dynamic_quant_matmul")
    bias = f", {a[3]}" if len(node.inputs) > 3 else ""
    return f"dynamic_quant_matmul({a[0]}, {a[1]}, {a[2]}{bias})"


_UNARY = {
    "relu": "F.relu({})", "sigmoid": "torch.sigmoid({})", "tanh": "torch.tanh({})", "silu": "F.silu({})",
    "hardswish": "F.hardswish({})", "hardsigmoid": "F.hardsigmoid({})", "erf": "torch.erf({})",
    "exp": "torch.exp({})", "log": "torch.log({})", "sqrt": "torch.sqrt({})", "rsqrt": "torch.rsqrt({})",
    "neg": "-{}", "abs": "torch.abs({})", "identity": "{}",
}
for _op, _fmt in _UNARY.items():
    EMITTERS[_op] = (lambda fmt: lambda ctx, node, a: fmt.format(a[0]))(_fmt)

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "matmul": "@"}
for _op, _sym in _BINARY.items():
    EMITTERS[_op] = (lambda sym: lambda ctx, node, a: f"{a[0]} {sym} {a[1]}")(_sym)
EMITTERS["maximum"] = lambda ctx, node, a: f"torch.maximum({ctx.tensor(node.inputs[0])}, {ctx.tensor(node.inputs[1])})"
EMITTERS["minimum"] = lambda ctx, node, a: f"torch.minimum({ctx.tensor(node.inputs[0])}, {ctx.tensor(node.inputs[1])})"


@emitter("clip")
def emit_clip(ctx, node, a):
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    if (lo, hi) == (0.0, 6.0):
        return f"F.relu6({a[0]})"
    return f"torch.clamp({a[0]}, {_lit(lo)}, {_lit(hi)})"


EMITTERS["gelu"] = lambda ctx, node, a: (
    f"F.gelu({a[0]})" if node.attrs.get("approximate", "none") == "none"
    else f"F.gelu({a[0]}, approximate={node.attrs['approximate']!r})")
EMITTERS["leaky_relu"] = lambda ctx, node, a: f"F.leaky_relu({a[0]}, {node.attrs['negative_slope']!r})"
EMITTERS["elu"] = lambda ctx, node, a: f"F.elu({a[0]}, {node.attrs.get('alpha', 1.0)!r})"
EMITTERS["softmax"] = lambda ctx, node, a: f"torch.softmax({a[0]}, {node.attrs['axis']})"
EMITTERS["log_softmax"] = lambda ctx, node, a: f"torch.log_softmax({a[0]}, {node.attrs['axis']})"
EMITTERS["lrn"] = lambda ctx, node, a: (
    f"F.local_response_norm({a[0]}, {node.attrs['size']}, {node.attrs['alpha']!r}, "
    f"{node.attrs['beta']!r}, {node.attrs['k']!r})")


@emitter("dropout")
def emit_dropout(ctx, node, a):
    kind = "nn.Dropout"
    if node.attrs.get("channelwise"):
        kind = {3: "nn.Dropout1d", 4: "nn.Dropout2d", 5: "nn.Dropout3d"}.get(node.inputs[0].rank, "nn.Dropout")
    ctor = f"{kind}(p={node.attrs['p']!r})"
    return f"self.{_module(ctx, node, ctor, {})}({a[0]})"


@emitter("stochastic_depth")
def emit_stochastic_depth(ctx, node, a):
    ctx.uses_helpers.add("stochastic_depth")
    return f"stochastic_depth({a[0]}, {node.attrs['p']!r}, {node.attrs['mode']!r}, self.training)"


def _pool_input(a0: str, pads: list[int], nd: int, kernel: list[int], fill: str) -> tuple[str, list[int]]:
    sym = pads[:nd] == pads[nd:] and all(2 * p <= k for p, k in zip(pads[:nd], kernel))
    if sym:
        return a0, pads[:nd]
    return f"F.pad({a0}, {_lit(_torch_pads(pads))}, value={fill})", [0] * nd


def _inside(pooled: str, node, padded_ahead: bool) -> str:
    """A ceil-mode pool of an input padded ahead cut to the node's windows: torch keeps a last window
    that starts in the right padding there (it is inside the padded input); the IR does not."""
    y = node.outputs[0]
    if not padded_ahead or not node.attrs.get("ceil_mode") or any((y.sym or ())[2:]):
        return pooled
    return f"{pooled}[:, :, {', '.join(f':{d}' for d in y.shape[2:])}]"


@emitter("max_pool")
def emit_max_pool(ctx, node, a):
    at = node.attrs
    nd = len(at["kernel"])
    x, padding = _pool_input(a[0], at["pads"], nd, at["kernel"], "float('-inf')")
    return _inside(f"F.max_pool{nd}d({x}, {_pair(at['kernel'])}, {_pair(at['stride'])}, {_pair(padding)}, "
                   f"{_pair(at.get('dilation', [1] * nd))}, ceil_mode={at.get('ceil_mode', False)})", node, x != a[0])


@emitter("avg_pool")
def emit_avg_pool(ctx, node, a):
    at = node.attrs
    nd = len(at["kernel"])
    x, padding = _pool_input(a[0], at["pads"], nd, at["kernel"], "0.0")
    window = f"{_pair(at['kernel'])}, {_pair(at['stride'])}, {_pair(padding)}, ceil_mode={at.get('ceil_mode', False)}"
    if x == a[0] or at.get("count_include_pad", True):
        return _inside(f"F.avg_pool{nd}d({x}, {window}, count_include_pad={at.get('count_include_pad', True)})",
                       node, x != a[0])
    # padded ahead of the pool, which would count it: the mean over the window's elements of x alone
    ones, _ = _pool_input(f"torch.ones_like({a[0]}[:1, :1])", at["pads"], nd, at["kernel"], "0.0")
    return _inside(f"(F.avg_pool{nd}d({x}, {window}, count_include_pad=True) / "
                   f"F.avg_pool{nd}d({ones}, {window}, count_include_pad=True))", node, True)


EMITTERS["adaptive_avg_pool"] = lambda ctx, node, a: (
    f"F.adaptive_avg_pool{len(node.attrs['output_size'])}d({a[0]}, {_pair(node.attrs['output_size'])})")
EMITTERS["adaptive_max_pool"] = lambda ctx, node, a: (
    f"F.adaptive_max_pool{len(node.attrs['output_size'])}d({a[0]}, {_pair(node.attrs['output_size'])})")


def _shape_expr(shape: list, source: str) -> str:
    return ", ".join(f"{source}.shape[0]" if d == "N" else _lit(d) for d in shape)


EMITTERS["reshape"] = lambda ctx, node, a: f"{a[0]}.reshape({_shape_expr(node.attrs['shape'], a[0])})"
EMITTERS["flatten"] = lambda ctx, node, a: (
    f"torch.flatten({a[0]}, {node.attrs['start']})" if node.attrs["end"] == node.inputs[0].rank - 1
    else f"torch.flatten({a[0]}, {node.attrs['start']}, {node.attrs['end']})")
EMITTERS["permute"] = lambda ctx, node, a: f"{a[0]}.permute({', '.join(map(str, node.attrs['perm']))})"
EMITTERS["expand"] = lambda ctx, node, a: f"{a[0]}.expand({', '.join(map(_lit, node.attrs['shape']))})"
EMITTERS["expand_batch"] = lambda ctx, node, a: f"{a[0]}.expand({_shape_expr(node.attrs['shape'], a[1])})"
EMITTERS["concat"] = lambda ctx, node, a: f"torch.cat([{', '.join(a)}], {node.attrs['axis']})"
EMITTERS["split"] = lambda ctx, node, a: f"torch.split({a[0]}, {_lit(node.attrs['sizes'])}, {node.attrs['axis']})"
EMITTERS["select"] = lambda ctx, node, a: f"{a[0]}.select({node.attrs['axis']}, {node.attrs['index']})"
EMITTERS["mean"] = lambda ctx, node, a: (
    f"{a[0]}.mean({_lit(node.attrs['axes'])}, keepdim={node.attrs.get('keepdim', False)})")
EMITTERS["sum"] = lambda ctx, node, a: (
    f"{a[0]}.sum({_lit(node.attrs['axes'])}, keepdim={node.attrs.get('keepdim', False)})")
EMITTERS["roll"] = lambda ctx, node, a: f"torch.roll({a[0]}, {_lit(node.attrs['shifts'])}, {_lit(node.attrs['dims'])})"
EMITTERS["cast"] = lambda ctx, node, a: f"{a[0]}.to(torch.{node.attrs['dtype']})"
EMITTERS["pad"] = lambda ctx, node, a: (
    f"F.pad({a[0]}, {_lit(node.attrs['pads'])}, {node.attrs.get('mode', 'constant')!r}, "
    f"{node.attrs.get('value', 0.0)!r})")


def _unsqueeze_expr(a0: str, axes: list[int], rank: int) -> str:
    for axis in sorted(ax % (rank + len(axes)) for ax in axes):
        a0 = f"{a0}.unsqueeze({axis})"
    return a0


def _squeeze_expr(a0: str, axes: list[int], rank: int) -> str:
    for axis in sorted((ax % rank for ax in axes), reverse=True):
        a0 = f"{a0}.squeeze({axis})"
    return a0


EMITTERS["unsqueeze"] = lambda ctx, node, a: _unsqueeze_expr(a[0], node.attrs["axes"], node.inputs[0].rank)
EMITTERS["squeeze"] = lambda ctx, node, a: _squeeze_expr(a[0], node.attrs["axes"], node.inputs[0].rank)


@emitter("slice")
def emit_slice(ctx, node, a):
    at = node.attrs
    parts = [":"] * node.inputs[0].rank
    for axis, s, e, st in zip(at["axes"], at["starts"], at["ends"], at["steps"]):
        parts[axis] = f"{_lit(s)}:{_lit(e)}" + (f":{st}" if st != 1 else "")
    while parts and parts[-1] == ":":
        parts.pop()
    return f"{a[0]}[{', '.join(parts)}]"


@emitter(OPAQUE)
def emit_opaque(ctx, node, a):
    impl: OpaqueImpl = node.attrs["impl"]
    if impl.source != "torch":
        raise UnsupportedError(f"node {node.name}: opaque {impl.source} op {impl.target} has no PyTorch form")

    def fill(t: Any) -> str:
        if isinstance(t, Slot):
            return a[t.index]
        if isinstance(t, list):
            return "[" + ", ".join(fill(v) for v in t) + "]"
        if isinstance(t, tuple):
            return "(" + ", ".join(fill(v) for v in t) + ("," if len(t) == 1 else "") + ")"
        if isinstance(t, dict):
            return "{" + ", ".join(f"{_lit(k)}: {fill(v)}" for k, v in t.items()) + "}"
        return _lit(t)

    args = [fill(t) for t in impl.args] + [f"{k}={fill(v)}" for k, v in impl.kwargs.items() if k.isidentifier()]
    if impl.kind == "module":
        attr = ctx.attr(node.name)
        ctx.externals[attr] = impl.module
        ctx.init.append(f"self.{attr} = externals[{attr!r}]")
        for key, tensor in impl.module.state_dict().items():  # its weights load (and save) like the rest
            ctx.state[f"{attr}.{key}"] = tensor
        return f"self.{attr}({', '.join(args)})"
    if impl.kind == "method":
        if not impl.target.isidentifier():
            raise UnsupportedError(f"node {node.name}: method name {impl.target!r} is not an identifier")
        return f"{args[0]}.{impl.target}({', '.join(args[1:])})"
    alias = _import_alias(ctx, impl)
    return f"{alias}({', '.join(args)})"


def _import_alias(ctx: _Ctx, impl: OpaqueImpl) -> str:
    """An importable path for a function (checked now), so model.py can import it."""
    path = impl.target
    parts = path.split(".")
    if path.startswith("torch.ops.") and all(p.isidentifier() for p in parts):
        return path  # operator overloads resolve through torch.ops at run time
    if all(p.isidentifier() for p in parts) and _resolves(path, impl.fn):
        alias = "_" + _ident(parts[-1])
        while alias in ctx.imports and ctx.imports[alias] != path:
            alias += "_"
        ctx.imports[alias] = path
        return alias
    raise UnsupportedError(f"opaque function {path!r} is not importable by name; it cannot be emitted")


def _resolves(path: str, fn: Any) -> bool:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return False
        return fn is None or obj is fn
    return False


# ============================================================================ quantization
# Quantized tensors are written as the arithmetic ONNX defines: x / scale (a division, not a
# product with 1 / scale), round half to even, saturate. fake_quant is the helper below, the same
# arithmetic in float with straight-through gradients; a scale the graph marks trainable (as
# ``quantize`` does) becomes an nn.Parameter it learns (LSQ), which load_weights brings back.
def _qrange(zero_point: Value | None, attrs: dict | None = None) -> tuple[int, int]:
    """The saturation range: the zero point's integer type's, or fake_quant's narrower qmin/qmax."""
    from slimgraph.ir.opdefs.quant import qrange

    return qrange(zero_point.dtype.torch if zero_point is not None else torch.uint8, attrs or {})


def _scalar_literal(v: Value | None) -> str | None:
    """A constant 0-d scale or zero point as a Python number, else None."""
    if v is None or not v.is_constant or v.const_value.dim() != 0:
        return None
    import numpy as np

    t = v.const_value
    if t.dtype == torch.float32 and bool(torch.isfinite(t)):  # the shortest text that reads back the same
        return str(np.float32(float(t)))
    return repr(float(t)) if t.is_floating_point() else repr(int(t))


def _is_zero(v: Value | None) -> bool:
    return v is None or (v.is_constant and not bool(v.const_value.any()))


def _qparam(node: Node, a: _Args, index: int) -> str:
    """A scale or zero point operand, reshaped to broadcast along the node's axis."""
    literal = _scalar_literal(node.inputs[index])
    if literal is not None:
        return literal
    v = node.inputs[index]
    ref = a.ctx.register(v, trainable=False) if v.is_constant else a[index]  # integer ops learn nothing
    axis, rank = node.attrs.get("axis"), node.inputs[0].rank
    if axis is None or rank == 1:
        return ref
    shape = ["1"] * rank
    shape[axis] = "-1"
    return f"{ref}.reshape({', '.join(shape)})"


def _learned(v: Value) -> bool:
    return v.is_constant and bool(v.meta.get("trainable")) and v.const_value.is_floating_point()


@emitter("quantize_linear")
def emit_quantize_linear(ctx, node, a):
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    lo, hi = _qrange(zero_point)
    q = f"torch.round({a[0]} / {_qparam(node, a, 1)})"
    if not _is_zero(zero_point):
        q += f" + {_qparam(node, a, 2)}"
    dtype = zero_point.dtype.torch if zero_point is not None else torch.uint8
    return f"torch.clamp({q}, {lo}, {hi}).to({dtype})"


@emitter("dequantize_linear")
def emit_dequantize_linear(ctx, node, a):
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    x = f"{a[0]}.float()"
    if not _is_zero(zero_point):
        x = f"({x} - {_qparam(node, a, 2)})"
    return f"{x} * {_qparam(node, a, 1)}"


_SCALED_OPS = ("fake_quant", "quantize_linear", "dequantize_linear")  # input 1 is a scale


@emitter("fake_quant")
def emit_fake_quant(ctx, node, a):
    _, scale, zero_point = node.inputs
    lo, hi = _qrange(zero_point, node.attrs)  # 7-bit weights saturate at +-64
    ctx.uses_helpers.add("fake_quant")
    s = ctx.register(scale, trainable=True) if _learned(scale) else _scalar_literal(scale) or a[1]
    z = "0" if _is_zero(zero_point) else _scalar_literal(zero_point) or a[2]
    axis = node.attrs.get("axis")
    return f"fake_quant({a[0]}, {s}, {z}, {lo}, {hi}{'' if axis is None else f', axis={axis}'})"


_FAKE_QUANT = '''
def fake_quant(x, scale, zero_point, qmin, qmax, axis=None):
    """Quantize then dequantize, in float, as ONNX defines it: q = saturate(round_half_even(x / scale)
    + zero_point), then (q - zero_point) * scale. Gradients: straight through to x inside
    [qmin, qmax] and none outside; a learned scale gets LSQ's (Esser et al. 2020), multiplied by
    1 / sqrt(elements per scale * qmax)."""
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        factor = (x.numel() / scale.numel() * qmax) ** -0.5
        scale = scale.detach() + factor * (scale - scale.detach())  # the same value; its gradient x factor
        scale = scale.clamp_min(1e-20)  # never divide by a scale trained to zero or below
    if axis is not None:  # one scale (and zero point) per channel along axis
        shape = [-1 if d == axis else 1 for d in range(x.dim())]
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape) if isinstance(zero_point, torch.Tensor) else zero_point
    q = x.float() / scale
    q = q + (torch.round(q) - q).detach() + zero_point  # round half to even, gradient straight through
    saturated = q.clamp(qmin, qmax)
    q = torch.where(q == saturated, q, saturated.detach())  # no gradient beyond qmin and qmax (at them, yes)
    return ((q - zero_point) * scale).to(x.dtype)
'''


# ============================================================================ int8 conv units
# onnxruntime's CPU provider runs DQ(x) -> Conv(DQ(w int8), DQ(bias int32)) -> [ReLU/clip] -> Q as
# one QLinearConv: an exact integer accumulator, requantized in float32. A float conv of the
# dequantized values divided by y_scale comes as close to the exact value, but not the same: ~2e-6
# of the outputs round to the neighbouring integer. Each unit onnxruntime fuses is emitted as one
# call to qconv, the integer kernel's arithmetic; every other conv keeps the QDQ graph's float
# arithmetic (onnxruntime runs those in float too). The units it fuses (x86, onnxruntime 1.32):
# uint8 activations, or int8 ones its QDQS8ToU8Transformer shifts to uint8 (the integers move by
# 128: exact), and a ReLU or clip before Q only where it drops them. The rules are ort_fusion's,
# shared with the QOperator writer.
@dataclass
class _QConv:
    """DQ(x) -> conv(DQ(w), DQ(bias)) -> ReLU/clip* -> Q: one qconv statement, at the conv."""

    conv: Node
    x: Node  # the dequantize_linear nodes of the operands
    w: Node
    bias: Node | None
    quantize: Node
    tail: list[Node]  # the ReLU/clip nodes and the quantize_linear the statement stands for

    @property
    def reads(self) -> list[Value]:
        return [dq.inputs[0] for dq in (self.x, self.w, self.bias) if dq is not None]


def _dq_of_constants(v: Value | None, dtypes: tuple[DType, ...]) -> Node | None:
    """The dequantize_linear making v from a tensor of one of ``dtypes``, with constant parameters."""
    dq = v.producer if v is not None else None
    if dq is None or dq.op != "dequantize_linear" or dq.inputs[0].dtype not in dtypes \
            or not all(p.is_constant for p in dq.inputs[1:] if p is not None):
        return None
    return dq


def _zero_point(node: Node) -> Value | None:
    return node.inputs[2] if len(node.inputs) > 2 else None


def _per_tensor(node: Node) -> bool:
    """A quantize_linear or dequantize_linear with a constant float32 scalar scale and zero point."""
    zp = _zero_point(node)
    return node.inputs[1].dtype == DType.float32 and _scalar_literal(node.inputs[1]) is not None \
        and (zp is None or _scalar_literal(zp) is not None)


def _shifted_to_uint8(graph: Graph, q: Node | None, dq: Node | None) -> bool:
    """Whether onnxruntime's QDQS8ToU8Transformer makes the int8 activation between q and dq
    uint8: q's only reader is dq, and both have the same explicit zero point."""
    if q is None or dq is None or q.op != "quantize_linear" or dq.op != "dequantize_linear":
        return False
    out, zq, zdq = q.outputs[0], _zero_point(q), _zero_point(dq)
    return [u.node for u in out.uses] == [dq] and all(o is not out for o in graph.outputs) \
        and zq is not None and zdq is not None and _scalar_literal(zq) is not None \
        and _scalar_literal(zq) == _scalar_literal(zdq)


def _np_dtype(dtype: DType):
    return torch.empty(0, dtype=dtype.torch).numpy().dtype


def _clamps_fold_into(tail: list[Node], q: Node) -> bool:
    """Whether onnxruntime drops every ReLU/clip of ``tail`` before Q (see ort_fusion.clamp_redundant)."""
    zp = _zero_point(q)
    clamps = [("relu", 0.0, None) if act.op == "relu" else ("clip", act.attrs.get("min"), act.attrs.get("max"))
              for act in tail]
    return ort_fusion.clamps_redundant(clamps, float(q.inputs[1].const_value),
                                       int(zp.const_value) if zp is not None else 0,
                                       _np_dtype(zp.dtype if zp is not None else DType.uint8))


def _int8_conv_unit(graph: Graph, conv: Node) -> _QConv | None:
    """The unit onnxruntime runs as QLinearConv, if ``conv`` heads one (see _QConv)."""
    x = _dq_of_constants(conv.inputs[0], (DType.uint8, DType.int8))
    if x is None or not _per_tensor(x) \
            or not ort_fusion.activation_fuses(_np_dtype(x.inputs[0].dtype),
                                               _shifted_to_uint8(graph, x.inputs[0].producer, x)):
        return None
    w = _dq_of_constants(conv.inputs[1], (DType.int8,))
    w_zero = _zero_point(w) if w is not None else None
    if w is None or not w.inputs[0].is_constant or w.attrs.get("axis") not in (None, 0) \
            or not ort_fusion.weight_fuses(w.inputs[0].const_value.numpy().dtype,
                                           None if w_zero is None else w_zero.const_value.numpy()):
        return None  # int8 weights, symmetric, one scale per output channel or one for all
    b = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = _dq_of_constants(b, (DType.int32,))
    if b is not None:  # onnxruntime adds the int32 bias as it is: its scale must be x_scale * w_scale
        if bias is None or not bias.inputs[0].is_constant or not _is_zero(_zero_point(bias)) \
                or not ort_fusion.bias_on_grid(bias.inputs[1].const_value.numpy(), x.inputs[1].const_value.numpy(),
                                               w.inputs[1].const_value.numpy()):
            return None
    tail: list[Node] = []
    v = conv.outputs[0]
    while len(v.uses) == 1 and v.uses[0].index == 0 and all(o is not v for o in graph.outputs):
        user = v.uses[0].node
        tail.append(user)
        if user.op == "quantize_linear":
            out = user.outputs[0]
            reader = out.uses[0].node if len(out.uses) == 1 else None
            if not _per_tensor(user) \
                    or not ort_fusion.activation_fuses(_np_dtype(out.dtype), _shifted_to_uint8(graph, user, reader)) \
                    or not _clamps_fold_into(tail[:-1], user):
                return None
            return _QConv(conv, x, w, bias, user, tail)
        if user.op not in ("relu", "clip"):
            return None
        v = user.outputs[0]
    return None


def _int8_conv_units(graph: Graph) -> tuple[dict[int, _QConv], set[int]]:
    """The int8 conv units by id(conv), and the ids of the nodes their statements stand for: each
    unit's ReLU/clip and Q, and every DQ read only by units."""
    units = {id(n): u for n in graph.nodes if n.op == "conv" and (u := _int8_conv_unit(graph, n)) is not None}
    fused = {id(n) for u in units.values() for n in u.tail}
    for unit in units.values():
        for dq in (unit.x, unit.w, unit.bias):
            out = dq.outputs[0] if dq is not None else None
            if out is not None and all(id(use.node) in units for use in out.uses) \
                    and all(o is not out for o in graph.outputs):
                fused.add(id(dq))
    return units, fused


def _emit_qconv(ctx: _Ctx, unit: _QConv) -> str:
    at, nd = unit.conv.attrs, unit.w.inputs[0].rank - 2
    x_zero = _scalar_literal(_zero_point(unit.x)) or "0"
    x = ctx.ref(unit.x.inputs[0])
    x, padding = _conv_padding(x, at["pads"], nd, fill=x_zero)  # padded with the zero point: a real 0
    w = ctx.ref(unit.w.inputs[0])
    w_scale = _scalar_literal(unit.w.inputs[1]) or ctx.register(unit.w.inputs[1], trainable=False)
    bias = ctx.ref(unit.bias.inputs[0]) if unit.bias is not None else "None"
    y_zero = _scalar_literal(_zero_point(unit.quantize)) or "0"
    ctx.uses_helpers.add("qconv")
    return (f"qconv({x}, {_scalar_literal(unit.x.inputs[1])}, {x_zero}, {w}, {w_scale}, {bias}, "
            f"{_scalar_literal(unit.quantize.inputs[1])}, {y_zero}, {_pair(at['stride'])}, {_pair(padding)}, "
            f"{_pair(at['dilation'])}, {at['groups']}, {unit.quantize.outputs[0].dtype.torch})")


_QCONV = '''
def qconv(x, x_scale, x_zero, w, w_scale, bias, y_scale, y_zero, stride, padding, dilation, groups, dtype):
    """DequantizeLinear -> Conv -> QuantizeLinear of integer x, int8 w (zero point 0, a scale per
    output channel or one), an int32 bias in steps of x_scale * w_scale (or None), computed as
    onnxruntime's QLinearConv does: the exact integer accumulator plus the bias, converted to
    float32, times the float32 multiplier float32(x_scale * w_scale) / y_scale, rounded half to
    even, plus y_zero, saturated to dtype (uint8 or int8)."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    # float64 adds integers exactly below 2**53: each product |x - x_zero| * |w| <= 255 * 128 < 2**15
    # and |bias| < 2**31, so a conv with fewer than 2**37 weights per output is exact (onnxruntime's
    # int32 accumulator itself holds about 2**16 of them)
    acc = conv(x.double() - x_zero, w.double(), None, stride, padding, dilation, groups)
    channels = [-1] + [1] * (x.dim() - 2)
    if bias is not None:
        acc = acc + bias.double().reshape(channels)
    multiplier = torch.as_tensor(w_scale, dtype=torch.float32, device=x.device) * x_scale / y_scale
    y = torch.round(acc.float() * multiplier.reshape(channels)) + y_zero
    return torch.clamp(y, torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)
'''


# ============================================================================ source
_HELPERS = {
    "fake_quant": _FAKE_QUANT,
    "qconv": _QCONV,
    "attention": '''
def attention(q, k, v, num_heads, scale, dropout=0.0, training=False, mask=None):
    """Scaled dot-product attention over num_heads heads of the last dim of [batch, seq, heads * dim],
    with an optional mask broadcast to [batch, heads, seq_q, seq_k]: added to the scaled scores, or a
    boolean keep-mask (True: attend)."""
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(-3, -2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0, scale=scale)
    return y.transpose(-3, -2).flatten(-2)
''',
    "skip_layer_norm": '''
def skip_layer_norm(x, skip, gamma, beta, eps, bias=None):
    """Layer norm of the residual sum x + skip (+ bias) over the last dim, and the sum itself."""
    total = x + skip if bias is None else x + skip + bias
    return F.layer_norm(total, gamma.shape, gamma, beta, eps), total
''',
    "dynamic_quant_matmul": '''
def dynamic_quant_matmul(x, w, w_scale, bias=None):
    """x quantized to uint8 per tensor at run time (its own range, 0 included) times int8 weights
    [K, N] with a scale per column; the integer products summed exactly, then scaled."""
    lo, hi = x.min().clamp(max=0.0).float(), x.max().clamp(min=0.0).float()
    scale = (hi - lo) / 255.0
    step = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero x: every level 0
    zero_point = torch.round(-lo / step).clamp(0, 255)
    q = (torch.round(x.float() / step) + zero_point).clamp(0, 255)
    y = (((q - zero_point).double() @ w.double()) * (scale.double() * w_scale.double())).to(x.dtype)
    return y if bias is None else y + bias
''',
    "stochastic_depth": '''
def stochastic_depth(x, p, mode, training):
    """Drop whole residual branches while training (torchvision.ops.stochastic_depth)."""
    if not training or p == 0.0:
        return x
    shape = [x.shape[0]] + [1] * (x.dim() - 1) if mode == "row" else [1] * x.dim()
    keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)
''',
}


def _symbol_sources(graph: Graph) -> dict[str, tuple[Value, int]]:
    """Each symbol of the graph and the input dim forward reads it from."""
    sources: dict[str, tuple[Value, int]] = {}
    for v in graph.inputs:
        for axis, expr in enumerate(v.sym or ()):
            if expr is not None and expr.is_Symbol:
                sources.setdefault(expr.name, (v, axis))
    return sources


def _emit_body(ctx: _Ctx, graph: Graph) -> tuple[list[str], list[str], str]:
    """forward's parameters, statements and return expression; fills ctx (modules, state)."""
    used_names: set[str] = set()

    def local(v: Value) -> str:
        name = _ident(v.name)
        while name in used_names:
            name += "_"
        used_names.add(name)
        ctx.names[id(v)] = name
        return name

    symbols = _symbol_sources(graph)
    used_names.update(symbols)  # symbol variables keep their names: size expressions use them
    params = [local(v) for v in graph.inputs]
    # one statement per node, but one for each int8 conv unit (at its conv): (node, reads, writes)
    units, fused = _int8_conv_units(graph)
    statements = [(n, units[id(n)].reads, [units[id(n)].quantize.outputs[0]]) if id(n) in units
                  else (n, n.inputs, n.outputs) for n in graph.nodes if id(n) not in fused]
    # like torch.fx's codegen, drop each intermediate after its last use ("x = None" on the same
    # line), so forward holds only live tensors: on densenet121 this is the difference between
    # 1.5x slower than the original module and as fast
    last_use: dict[int, Node] = {}
    for node, reads, _ in statements:
        for v in reads:
            if v is not None and not v.is_constant:
                last_use[id(v)] = node
    keep = {id(v) for v in graph.outputs}
    body: list[str] = [f"{name} = {ctx.names[id(v)]}.shape[{axis}]" for name, (v, axis) in symbols.items()]
    for node in graph.nodes:  # emitters call methods on their first input: a scalar there is a buffer
        first = node.inputs[0] if node.inputs else None  # (5.0.expand(2, 4) is no expression)
        if first is not None and first.is_constant and first.rank == 0:
            ctx.tensor(first)
    for node, reads, writes in statements:
        if id(node) in units:
            expr = _emit_qconv(ctx, units[id(node)])
        elif node.op in EMITTERS:
            expr = EMITTERS[node.op](ctx, node, _Args(ctx, node))
        else:
            raise UnsupportedError(f"node {node.name}: op {node.op!r} has no PyTorch emitter")
        outs = [local(v) for v in writes]
        target = outs[0] if len(outs) == 1 else ", ".join(outs) + ("," if len(outs) == 1 else "")
        dead = []
        for v in reads:
            if v is not None and last_use.get(id(v)) is node and id(v) not in keep and ctx.names[id(v)] not in dead:
                dead.append(ctx.names[id(v)])
        dead += [ctx.names[id(v)] for v in writes if not v.uses and id(v) not in keep]
        body.append(f"{target} = {expr}" + (f";  {' = '.join(dead)} = None" if dead else ""))
    results = [ctx.ref(v) for v in graph.outputs]
    ret = results[0] if len(results) == 1 else "(" + ", ".join(results) + ")"
    return params, body, ret


def generate(graph: Graph, class_name: str = "Model") -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Source of model.py, its state dict, and the external objects (opaque modules) it needs."""
    from slimgraph.backends import pytorch_extended  # noqa: F401  (registers the wider op surface)
    ctx = _Ctx(graph)
    params, body, ret = _emit_body(ctx, graph)

    lines = [
        f'"""{class_name}: generated by slimgraph. Needs only torch; load(folder) restores the weights."""',
        "",
        "import os",
        "",
        "import torch",
        "import torch.nn as nn",
        "import torch.nn.functional as F",
    ]
    if ctx.imports:
        lines.append("import importlib")
        lines.append("")
        for alias, path in sorted(ctx.imports.items()):
            module, _, attr = path.rpartition(".")
            lines.append(f"{alias} = getattr(importlib.import_module({module!r}), {attr!r})")
    for helper in sorted(ctx.uses_helpers):
        lines.append("")
        lines.append(_HELPERS[helper].rstrip())
    lines += ["", "", f"class {class_name}(nn.Module):", "    def __init__(self, externals=None):",
              "        super().__init__()"]
    lines += [f"        {s}" for s in ctx.init]
    lines += ["", f"    def forward(self, {', '.join(params)}):"]
    lines += [f"        {s}" for s in body]
    lines += [f"        return {ret}", "", ""]
    lines += [
        "def load(folder):",
        '    """Build the model and load its weights (and any opaque modules) from folder."""',
        "    externals = None",
        '    extra = os.path.join(folder, "modules.pt")',
        "    if os.path.exists(extra):",
        "        externals = torch.load(extra, weights_only=False)",
        f"    model = {class_name}(externals)",
        '    state = torch.load(os.path.join(folder, "weights.pt"), weights_only=True)',
        "    model.load_state_dict(state, assign=True)  # keep each weight's own dtype (fp16, int8, ...)",
        "    return model.eval()",
        "",
    ]
    return "\n".join(lines), ctx.state, ctx.externals


_counter = iter(range(1 << 30))


def to_torch(graph: Graph) -> torch.nn.Module:
    """An nn.Module computing the graph; its source is in ``module.code``."""
    source, state, externals = generate(graph)
    filename = f"<slimgraph:{graph.name}:{next(_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"__name__": f"slimgraph_generated_{clean_name(graph.name)}"}
    exec(compile(source, filename, "exec"), namespace)  # our own generated code, never user text
    # opaque modules are copied: the module must not share them with the graph or other exports
    model = namespace["Model"](copy.deepcopy(externals))
    # assign: modules are built in float32; weights keep their own dtype (fp16, bf16, int8)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    model.code = source
    return model.eval()


def load_weights(graph: Graph, module: torch.nn.Module) -> int:
    """Copy a module made by ``to_torch(graph)`` back into the graph's constants, after training
    (fine-tuning between pruning steps, quantization-aware training). Returns how many tensors
    were updated. The graph must be the one the module was made from (same structure).

    Learned quantization scales come back too, so ``fold-int8`` rounds to the trained grid; a
    scale that trained to zero, below, or NaN raises a SlimgraphError naming its node. Nothing
    is copied unless every tensor is good."""
    ctx = _Ctx(graph)
    _emit_body(ctx, graph)
    state = module.state_dict()
    updates: list[tuple[Value, torch.Tensor]] = []
    for key, value in ctx.sources.items():
        if key not in state:
            raise SlimgraphError(f"the module has no {key!r}: was it made from this graph?")
        tensor = state[key].detach()
        if tuple(tensor.shape) != value.shape:
            raise SlimgraphError(f"{key}: the module holds {tuple(tensor.shape)}, the graph {value.shape}")
        scaled = [u.node for u in value.uses if u.index == 1 and u.node.op in _SCALED_OPS]
        bad = tensor[~((tensor > 0) & torch.isfinite(tensor))] if scaled else []
        if len(bad):
            raise SlimgraphError(f"node {scaled[0].name} ({scaled[0].op}): its scale {key} trained to "
                                 f"{float(bad[0])!r}; scales must be positive and finite")
        updates.append((value, tensor.to("cpu", copy=True).contiguous()))
    for value, tensor in updates:
        value.const_value = tensor
    graph.touch()
    return len(updates)


def save_torch(graph: Graph, folder: str | os.PathLike) -> Path:
    """Write folder/model.py and folder/weights.pt (plus modules.pt for opaque modules)."""
    source, state, externals = generate(graph)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(source)
    torch.save({k: v.contiguous() for k, v in state.items()}, folder / "weights.pt")
    if externals:
        torch.save(externals, folder / "modules.pt")
    return folder
