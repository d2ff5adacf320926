"""Canonicalization: fold BatchNorm away, fold constant subexpressions, clean up to a fixed point.

``fold-bn`` rewrites every inference batch_norm with constant parameters, preferring (1) the
preceding conv/linear, (2) the following conv/linear where that is exact, (3) an exact
per-channel ``mul`` + ``add``. All three are the same map y = x * s + t with
s = gamma / sqrt(var + eps) and t = beta - mean * s, computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgraph.errors import PassError
from slimgraph.ir import Graph, Node, Value, get_op, is_canonical
from slimgraph.ir.opdefs.nn import ceil_adds_no_window
from slimgraph.ir.ops import run_reference
from slimgraph.ir.symbolic import has_symbols
from slimgraph.passes.attention import AttentionForm
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.cleanup import DeadCodeElimination, RemoveIdentity
from slimgraph.passes.forms import GeluForm, SiluForm, SqueezeForm

_WEIGHTED = ("conv", "linear")


# ---------------------------------------------------------------------------- helpers
def _constant(value: Value | None) -> torch.Tensor | None:
    """The tensor of a floating-point constant, else None."""
    if value is None or not value.is_constant or not value.const_value.is_floating_point():
        return None
    return value.const_value


def _remove_orphans(graph: Graph, values: list[Value | None]) -> int:
    """Drop the given constants that nothing uses any more; returns how many went."""
    removed, seen = 0, set()
    for v in values:
        if v is None or id(v) in seen or graph.constants.get(v.name) is not v:
            continue
        seen.add(id(v))
        if not v.uses and all(o is not v for o in graph.outputs):
            graph.remove_constant(v)
            removed += 1
    return removed


def _only_user(value: Value, graph: Graph) -> Node | None:
    """The node that consumes ``value`` as its input 0 and is its only use, if there is one."""
    if len(value.uses) != 1 or any(o is value for o in graph.outputs):
        return None
    use = value.uses[0]
    return use.node if use.index == 0 else None


def _replace_params(graph: Graph, node: Node, weight: torch.Tensor, bias: torch.Tensor) -> Node:
    """Give a conv/linear new float64-computed weight and bias (cast to the old dtypes) as new constants.

    Returns the node, recreated if it was built without a bias slot. Old constants that are
    now unused are removed; ones still shared with other nodes stay.
    """
    w_val = node.inputs[1]
    b_val = node.inputs[2] if len(node.inputs) > 2 else None
    w_dtype = w_val.const_value.dtype
    b_dtype = b_val.const_value.dtype if b_val is not None else w_dtype
    new_w = graph.add_constant(f"{w_val.name}_bn", weight.to(w_dtype), trainable=True)
    new_b = graph.add_constant(f"{b_val.name}_bn" if b_val is not None else f"{node.name}_bias_bn",
                               bias.to(b_dtype), trainable=True)
    if len(node.inputs) >= 3:
        node.set_input(1, new_w)
        node.set_input(2, new_b)
    else:
        new = graph.create_node(node.op, [node.inputs[0], new_w, new_b], dict(node.attrs), name=node.name,
                                before=node, meta=dict(node.meta))
        graph.replace_all_uses_with(node.output, new.output)
        graph.remove_node(node)
        node = new
    _remove_orphans(graph, [w_val, b_val])
    return node


def _weight_and_bias(node: Node) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A conv/linear's constant weight and bias (None when it has none), or None if not constant."""
    b_val = node.inputs[2] if len(node.inputs) > 2 else None
    w, b = _constant(node.inputs[1]), _constant(b_val)
    if w is None or (b_val is not None and b is None):
        return None
    return w, b


def bn_scale_shift(node: Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s, t) in float64 such that batch_norm(x) == x * s + t per channel, or None if not constant."""
    x = node.inputs[0]
    params = [_constant(v) for v in node.inputs[1:5]]
    if x is None or x.shape is None or len(x.shape) < 2 or any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.double().reshape(-1) for p in params)
    if not all(p.numel() == x.shape[1] for p in (gamma, beta, mean, var)):
        return None
    s = gamma / torch.sqrt(var + node.attrs["eps"])
    return s, beta - mean * s


# ---------------------------------------------------------------------------- the three rewrites
def _fold_into_previous(graph: Graph, bn: Node, s: torch.Tensor, t: torch.Tensor) -> bool:
    """conv/linear -> bn  ==>  conv/linear with W' = W * s (per output channel), b' = b * s + t."""
    x = bn.inputs[0]
    prev = x.producer
    if prev is None or prev.op not in _WEIGHTED or _only_user(x, graph) is not bn:
        return False
    params = _weight_and_bias(prev)
    if params is None:
        return False
    w, b = params
    if prev.op == "linear" and len(x.shape) != 2:  # BN's channel axis 1 must be the out-features axis
        return False
    new_w = w.double() * s.reshape(-1, *[1] * (w.dim() - 1))
    new_b = (b.double() if b is not None else torch.zeros_like(s)) * s + t
    prev = _replace_params(graph, prev, new_w, new_b)
    graph.replace_all_uses_with(bn.output, prev.output)
    graph.remove_node(bn)
    return True


def _fold_into_next(graph: Graph, bn: Node, s: torch.Tensor, t: torch.Tensor) -> bool:
    """bn -> conv/linear  ==>  W' = W * s (per input channel), b' = b + sum(W * t).

    Exact only when the conv has no padding or t == 0: the folded bias adds W * t as if every
    tap saw a shifted input, but taps that fall on the zero padding saw 0, not t, in the
    original, so outputs near the border would be off by those taps' share of W * t.
    """
    nxt = _only_user(bn.output, graph)
    if nxt is None or nxt.op not in _WEIGHTED:
        return False
    params = _weight_and_bias(nxt)
    if params is None:
        return False
    w, b = params
    if nxt.op == "linear" and len(bn.output.shape) != 2:  # channel axis 1 must be the in-features axis
        return False
    if nxt.op == "conv" and any(nxt.attrs["pads"]) and bool(t.any()):
        return False
    groups = nxt.attrs["groups"] if nxt.op == "conv" else 1
    w64 = w.double()
    shift = (w64 * _per_filter(t, w, groups)).reshape(w.shape[0], -1).sum(1)
    new_b = (b.double() if b is not None else torch.zeros_like(shift)) + shift
    _replace_params(graph, nxt, w64 * _per_filter(s, w, groups), new_b)
    graph.replace_all_uses_with(bn.output, bn.inputs[0])
    graph.remove_node(bn)
    return True


def _per_filter(v: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-input-channel ``v`` laid out like W's axes: filter o sees only its group's channels."""
    out_ch, in_per_group = w.shape[0], w.shape[1]
    v = v.reshape(groups, 1, in_per_group).expand(groups, out_ch // groups, in_per_group)
    return v.reshape(out_ch, in_per_group, *[1] * (w.dim() - 2))


def _to_affine(graph: Graph, bn: Node, s: torch.Tensor, t: torch.Tensor) -> None:
    """bn  ==>  x * s + t with s, t shaped [C, 1, ...] to broadcast over NC... tensors."""
    x = bn.inputs[0]
    shape = (-1, *[1] * (len(x.shape) - 2))
    dtype = x.dtype.torch
    scale = graph.add_constant(f"{bn.name}_scale", s.reshape(shape).to(dtype), trainable=True)
    shift = graph.add_constant(f"{bn.name}_shift", t.reshape(shape).to(dtype), trainable=True)
    origin = f"fold-bn:{bn.name}"
    mul = graph.create_node("mul", [x, scale], name=f"{bn.name}_mul", before=bn, meta={"origin": origin})
    add = graph.create_node("add", [mul.output, shift], name=f"{bn.name}_add", before=bn, meta={"origin": origin})
    graph.replace_all_uses_with(bn.output, add.output)
    graph.remove_node(bn)


@register_pass
@dataclass
class FoldBatchNorm(Pass):
    """Fold inference BatchNorm into a neighbouring conv/linear, else into an exact mul + add.

    Options: ``into_next`` (default True) also folds into a following conv/linear where exact.
    """

    name = "fold-bn"
    description = "fold inference BatchNorm into the adjacent conv/linear, else into an exact per-channel mul+add"
    into_next: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.into_next, bool):
            raise PassError(f"pass 'fold-bn' option 'into_next': {self.into_next!r} is not a boolean")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {"into_previous": 0, "into_next": 0, "affine": 0, "left": 0}
        for node in graph.nodes:
            if node.graph is None or node.op != "batch_norm":
                continue
            st = bn_scale_shift(node)
            if st is None:  # parameters computed at run time: not a fixed affine map
                stats["left"] += 1
                continue
            params = list(node.inputs[1:5])  # removing the node detaches them
            if _fold_into_previous(graph, node, *st):
                stats["into_previous"] += 1
            elif self.into_next and _fold_into_next(graph, node, *st):
                stats["into_next"] += 1
            else:
                _to_affine(graph, node, *st)
                stats["affine"] += 1
            _remove_orphans(graph, params)
        changed = stats["into_previous"] + stats["into_next"] + stats["affine"] > 0
        return PassResult(changed, stats)


# ---------------------------------------------------------------------------- constant folding
SMALL_BYTES = 4096  # outputs this small are always folded: they cannot bloat a model


@register_pass
@dataclass
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants and replace them by constants.

    Size guard: a node is folded only if its outputs take at most ``max_growth`` times the
    bytes of its constant inputs, or at most SMALL_BYTES (4 KiB). With the default 1.0 a fold
    never grows the stored tensors: an ``expand`` of a scalar to a feature map, or a cast of
    int8 weights to float32 (a dequantize), stays a node computed at run time.
    """

    name = "fold-constants"
    description = "evaluate nodes whose inputs are all constants (size-guarded) and store the results"
    max_growth: float = 1.0

    def __post_init__(self) -> None:
        _check_growth(self.name, self.max_growth)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = too_big = 0
        for node in graph.nodes:
            if node.graph is None or not _foldable(node, graph):
                continue
            in_bytes = sum(v.nbytes for v in node.inputs if v is not None)
            out_bytes = sum(v.nbytes for v in node.outputs)
            if out_bytes > max(SMALL_BYTES, self.max_growth * in_bytes):
                too_big += 1
                continue
            fold_node(graph, node)
            folded += 1
        return PassResult(folded > 0, {"folded": folded, "too_big": too_big})


@register_pass
@dataclass
class LinearForm(Pass):
    """A matmul by a constant matrix, and a constant bias added to it, as one ``linear``.

    Exporters and tracers spell dense layers many ways (GPT-2's Conv1D is addmm(b, x, W), ONNX
    files hold MatMul(x, W) + Add(b)); ``linear`` is the form every pass looks for (quantize,
    smooth, prune, lowrank). The weight is stored transposed once; a bias joins when the add is
    the product's only reader and the bias broadcasts along the last dim only.
    """

    name = "linear-form"
    description = "matmul by a constant matrix (+ a constant bias add) as linear, the form passes look for"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        made = biased = 0
        for node in graph.nodes:
            if node.graph is None or node.op != "matmul":
                continue
            x, weight = node.inputs[0], node.inputs[1]
            w = _constant(weight)
            if x.is_constant or x.rank < 1 or w is None or w.dim() != 2 or x.dtype != weight.dtype:
                continue
            # the ONNX backend writes a linear's weight transposed as <name>_t: back, it is <name> again
            name = weight.name[:-2] if weight.name.endswith("_t") else f"{weight.name}_t"
            inputs = [x, graph.add_constant(name, w.t().contiguous(),
                                            trainable=bool(weight.meta.get("trainable")))]
            add = _only_reader(node.outputs[0], graph)
            bias = _bias_of(graph, add, node.outputs[0], w.shape[1]) if add is not None else None
            inputs.append(bias)  # None: no bias, as every frontend writes it
            linear = graph.create_node("linear", inputs, name=node.name, before=node, meta=dict(node.meta))
            replaced = add if bias is not None else node
            orphans = [weight, *(add.inputs if bias is not None else [])]
            graph.replace_all_uses_with(replaced.outputs[0], linear.outputs[0])
            for old in ([add, node] if bias is not None else [node]):
                graph.remove_node(old)
            graph.take_name(linear, replaced)
            _remove_orphans(graph, orphans)
            made, biased = made + 1, biased + (bias is not None)
        return PassResult(made > 0, {"linears": made, "with_bias": biased})


def _only_reader(value: Value, graph: Graph) -> Node | None:
    """The one node reading ``value`` (at any input), if it is the only use."""
    if len(value.uses) != 1 or any(o is value for o in graph.outputs):
        return None
    return value.uses[0].node


def _bias_of(graph: Graph, add: Node, product: Value, features: int) -> Value | None:
    """The constant bias ``add`` adds to ``product``: a float tensor of ``features`` along the last
    dim, broadcast over the others, and no larger than the product's rank."""
    if add.op != "add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is product else add.inputs[0]
    b = _constant(other)
    if b is None or b.dtype != product.dtype.torch or b.dim() > max(product.rank, 1) or b.shape[-1:] != (features,) \
            or any(d != 1 for d in b.shape[:-1]) or add.outputs[0].shape != product.shape:
        return None
    if b.dim() == 1:
        return other
    return graph.add_constant(f"{other.name}_flat", b.reshape(features))


def _check_growth(pass_name: str, value: object) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not value >= 0:  # `not >=` also rejects NaN
        raise PassError(f"pass {pass_name!r} option 'max_growth': {value!r} must be a number >= 0 "
                        "(output bytes / constant input bytes)")


# A dequantized int8 weight is the point of int8: folding it back to float would undo fold-int8.
KEEP_UNFOLDED = {"dequantize_linear"}


def _foldable(node: Node, graph: Graph) -> bool:
    """Canonical, free of mode/random effects, all inputs constant, sizes free of the graph's symbols.
    A graph output folds too, into a bare constant output: both backends write one, and both importers
    fold such a computation themselves, so canonical forms agree whichever way a graph came."""
    if not is_canonical(node.op) or get_op(node.op).stateful:
        return False
    if node.op in KEEP_UNFOLDED:
        return False
    present = [v for v in node.inputs if v is not None]
    if not present or not all(v.is_constant for v in present):
        return False
    # not what follows the graph's symbols (a slice of a position table up to seq)
    return not (any(v.sym for v in node.outputs) or has_symbols(node.attrs))


def fold_node(graph: Graph, node: Node) -> None:
    """Replace ``node`` (all inputs constant) by the constants it computes."""
    with torch.no_grad():
        results = run_reference(node, [None if v is None else v.const_value for v in node.inputs])
    trainable = any(v.meta.get("trainable", False) for v in node.inputs if v is not None)
    for value, tensor in zip(node.outputs, results):
        # contiguous copy: a view (permute, expand) must not share storage with its input
        tensor = tensor.detach().clone(memory_format=torch.contiguous_format)
        graph.replace_all_uses_with(value, graph.add_constant(f"{value.name}_folded", tensor, trainable))
    inputs = list(node.inputs)
    graph.remove_node(node)
    _remove_orphans(graph, inputs)


# ---------------------------------------------------------------------------- canonicalize
def _floor_mode_pools(graph: Graph) -> int:
    """ceil_mode off on pools where it adds no window (the same windows: ONNX writes such a pool in
    floor mode, whose shape every consumer agrees on): one form whichever way the graph came."""
    count = 0
    for node in graph.nodes:
        if node.op in ("max_pool", "avg_pool") and ceil_adds_no_window(node):
            node.attrs = {**node.attrs, "ceil_mode": False}
            count += 1
    if count:
        graph.touch()
    return count


@register_pass
@dataclass
class Canonicalize(Pass):
    """fold-constants, remove-identity, linear-form, gelu-form, silu-form, squeeze-form,
    attention-form and dce, repeated until a round changes nothing."""

    name = "canonicalize"
    description = ("fold-constants, remove-identity, linear-form, gelu-form, silu-form, squeeze-form, attention-form "
                   "and dce repeated until nothing changes")
    max_growth: float = 1.0
    max_iterations: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int) \
                or self.max_iterations < 1:
            raise PassError(f"pass 'canonicalize' option 'max_iterations': {self.max_iterations!r} "
                            "must be an integer >= 1")
        _check_growth(self.name, self.max_growth)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        passes: list[Pass] = [FoldConstants(self.max_growth), RemoveIdentity(), LinearForm(), GeluForm(), SiluForm(),
                              SqueezeForm(), AttentionForm(), DeadCodeElimination()]
        stats: dict[str, int] = {"iterations": 0}
        changed = False
        floored = _floor_mode_pools(graph)
        if floored:
            stats["floor_mode_pools"], changed = floored, True
        for _ in range(self.max_iterations):
            stats["iterations"] += 1
            round_changed = False
            for p in passes:
                result = p.run(graph, ctx)
                round_changed |= result.changed
                for key, n in result.stats.items():
                    stats[f"{p.name}.{key}"] = stats.get(f"{p.name}.{key}", 0) + n
            changed |= round_changed
            if not round_changed:
                break
        return PassResult(changed, stats)

