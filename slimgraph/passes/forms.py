"""Canonical forms of activations and views that exporters spell as several ops.

An op with no node of its own in a target comes back from it as the arithmetic that computes it:
GELU below ONNX opset 20 is ``0.5 * x * (1 + erf(x / sqrt(2)))`` (or, approximated,
``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``), SiLU is ``x * sigmoid(x)``, a
multi-axis unsqueeze is a chain of one-axis ones in torch source. These passes form the one node
back, wherever the arithmetic comes from (torch.onnx.export, Hugging Face's written-out GELUs,
slimgraph's own backends), so that passes see the activation and round trips print what went in.

Matching is by value, not by spelling: the product around ``1 + erf(...)`` is read as a tree of
multiplications (and divisions by numbers) in any order and grouping, and the argument of erf or
tanh as a polynomial in x, so ``x * 0.5 * (...)``, ``(x * (...)) / 2`` and ``0.5 * x * (...)`` or
``x * x * x`` and ``pow(x, 3)`` all match. Numbers must equal the GELU constants to the precision
of x's dtype (a few ulps): a rounded-off 0.7071 is another function, and stays as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimgraph.ir import Graph, Node, Value
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass


# ---------------------------------------------------------------------------- helpers
def _number(value: Value | None) -> float | None:
    """The value of a one-element floating-point constant, else None."""
    if value is None or not value.is_constant or value.const_value.numel() != 1 \
            or not value.const_value.is_floating_point():
        return None
    return float(value.const_value)


def _close(got: float | None, want: float, dtype: torch.dtype) -> bool:
    """``got`` is ``want`` to a few ulps of ``dtype`` (the constants a file or a tracer stores)."""
    return got is not None and abs(got - want) <= 8 * torch.finfo(dtype).eps * abs(want)


def _single_use(value: Value, graph: Graph) -> bool:
    return len(value.uses) == 1 and all(o is not value for o in graph.outputs)


def remove_dead_region(graph: Graph, values: list[Value | None]) -> None:
    """Remove the producers of ``values`` that nothing reads any more, and theirs in turn, and the
    constants they leave unread: dead code local to a rewrite, without a whole-graph walk."""
    outputs = {id(v) for v in graph.outputs}
    stack = [v for v in values if v is not None]
    while stack:
        value = stack.pop()
        node = value.producer
        if node is None:
            if value.is_constant and not value.uses and id(value) not in outputs \
                    and graph.constants.get(value.name) is value:
                graph.remove_constant(value)
            continue
        if node.graph is None or any(v.uses or id(v) in outputs for v in node.outputs):
            continue
        inputs = list(node.inputs)
        graph.remove_node(node)
        stack.extend(v for v in inputs if v is not None)


def _replace(graph: Graph, root: Node, op: str, inputs: list[Value], attrs: dict, dead: list[Value]) -> Node:
    """``root``'s output computed by one ``op`` node, which takes ``root``'s names."""
    new = graph.create_node(op, inputs, attrs, name=f"{root.name}_{op}", before=root, meta=dict(root.meta))
    graph.replace_all_uses_with(root.outputs[0], new.outputs[0])
    remove_dead_region(graph, [root.outputs[0], *dead])
    if root.graph is None:
        graph.take_name(new, root)
    return new


# ---------------------------------------------------------------------------- products and polynomials
def product_factors(value: Value, terminals: set[int], graph: Graph) -> tuple[list[Value], float] | None:
    """``value`` as a product: its non-numeric factors and the product of its numeric ones, reading
    through multiplications and divisions by numbers whose results only the product reads (and
    stopping at ``terminals``, ids of values that are factors as they are). None if it divides by
    a tensor."""
    factors: list[Value] = []
    number = 1.0

    def walk(v: Value, top: bool) -> bool:
        nonlocal number
        node = v.producer
        inside = top or (id(v) not in terminals and _single_use(v, graph))
        if node is not None and inside and node.op == "mul" and len(node.inputs) == 2:
            return all(walk(x, False) for x in node.inputs)
        if node is not None and inside and node.op == "div" and _number(node.inputs[1]) is not None:
            number /= _number(node.inputs[1])
            return walk(node.inputs[0], False)
        if _number(v) is not None:
            number *= _number(v)
        else:
            factors.append(v)
        return True

    if not walk(value, True) or number == 0.0:
        return None
    return factors, number


Polynomial = dict[int, float]  # degree -> coefficient


def polynomial(value: Value, x: Value, depth: int = 12) -> Polynomial | None:
    """``value`` as a polynomial in ``x`` (degree at most 3) read through add, sub, mul, neg, pow
    by 2 or 3 and division by numbers, or None if it is something else."""
    if value is x:
        return {1: 1.0}
    number = _number(value)
    if number is not None:
        return {0: number}
    node = value.producer
    if node is None or depth == 0 or node.op not in ("neg", "add", "sub", "mul", "div", "pow"):
        return None
    parts = [polynomial(v, x, depth - 1) if v is not None else None for v in node.inputs[:2]]
    a = parts[0]
    b = parts[1] if len(parts) > 1 else None
    if node.op == "neg" and a is not None:
        return {d: -c for d, c in a.items()}
    if a is None or b is None:
        return None
    if node.op == "add":
        return _sum(a, b, 1.0)
    if node.op == "sub":
        return _sum(a, b, -1.0)
    if node.op == "mul":
        return _product(a, b)
    if node.op == "div" and set(b) == {0} and b[0] != 0.0:
        return {d: c / b[0] for d, c in a.items()}
    if node.op == "pow" and set(b) == {0} and b[0] in (2.0, 3.0):
        result: Polynomial | None = a
        for _ in range(int(b[0]) - 1):
            result = _product(result, a) if result is not None else None
        return result
    return None


def _sum(a: Polynomial, b: Polynomial, sign: float) -> Polynomial:
    out = dict(a)
    for d, c in b.items():
        out[d] = out.get(d, 0.0) + sign * c
    return out


def _product(a: Polynomial, b: Polynomial) -> Polynomial | None:
    out: Polynomial = {}
    for da, ca in a.items():
        for db, cb in b.items():
            out[da + db] = out.get(da + db, 0.0) + ca * cb
    return out if max(out) <= 3 else None


def _is_polynomial(p: Polynomial | None, want: Polynomial, dtype: torch.dtype) -> bool:
    if p is None:
        return False
    scale = max(abs(c) for c in want.values())
    for d in set(p) | set(want):
        got, expected = p.get(d, 0.0), want.get(d, 0.0)
        if expected == 0.0 and abs(got) > 8 * torch.finfo(dtype).eps * scale:
            return False
        if expected != 0.0 and not _close(got, expected, dtype):
            return False
    return True


# ---------------------------------------------------------------------------- GELU
_ERF_ARG = {1: 1 / math.sqrt(2.0)}
_TANH_ARG = {1: math.sqrt(2 / math.pi), 3: math.sqrt(2 / math.pi) * 0.044715}


def match_gelu(node: Node, graph: Graph) -> tuple[Node, Value, str] | str:
    """The GELU around an erf or tanh ``node``: (the node whose output is GELU(x), x, approximate),
    or why there is none."""
    approximate = "none" if node.op == "erf" else "tanh"
    out = node.outputs[0]
    if not out.dtype or not out.dtype.is_float or not _single_use(out, graph):
        return f"{node.op} is not a float read once"
    dtype = out.dtype.torch
    one_plus = out.uses[0].node
    if one_plus.op != "add" or not _close(_number(one_plus.inputs[1 - out.uses[0].index]), 1.0, dtype):
        return f"{node.op} is not added to 1"
    inner = one_plus.outputs[0]
    root = one_plus
    for _ in range(4):  # the product 0.5 * x * (1 + ...) may be grouped a few ways
        if not _single_use(root.outputs[0], graph):
            break
        root = root.outputs[0].uses[0].node
        if root.op not in ("mul", "div") or root.outputs[0].dtype != out.dtype:
            break
        found = product_factors(root.outputs[0], {id(inner)}, graph)
        if found is None:
            continue
        factors, number = found
        rest = [f for f in factors if f is not inner]
        if len(rest) != 1 or len(factors) != 2 or not _close(number, 0.5, dtype):
            continue
        x = rest[0]
        if x.shape != out.shape or x.dtype != out.dtype:
            continue
        want = _ERF_ARG if approximate == "none" else _TANH_ARG
        if _is_polynomial(polynomial(node.inputs[0], x), want, dtype):
            return root, x, approximate
        return f"the argument of {node.op} is not the GELU polynomial of {x.name}"
    return f"{node.op} + 1 is not multiplied by x / 2"


@register_pass
@dataclass
class GeluForm(Pass):
    """GELU written out (with erf, or tanh's approximation) as one ``gelu`` node with its
    ``approximate`` attr. Exact up to float rounding: torch's GELU kernels compute these formulas."""

    name = "gelu-form"
    description = "GELU written out (0.5 x (1 + erf(x / sqrt 2)), or the tanh approximation) as one gelu"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        made = {"none": 0, "tanh": 0}
        for node in graph.nodes:
            if node.graph is None or node.op not in ("erf", "tanh"):
                continue
            found = match_gelu(node, graph)
            if isinstance(found, str):
                continue
            root, x, approximate = found
            _replace(graph, root, "gelu", [x], {"approximate": approximate}, [])
            made[approximate] += 1
        return PassResult(sum(made.values()) > 0, {"erf": made["none"], "tanh": made["tanh"]})


# ---------------------------------------------------------------------------- SiLU
@register_pass
@dataclass
class SiluForm(Pass):
    """``x * sigmoid(x)`` (either order) as one ``silu`` node; ONNX has no SiLU before opset 24."""

    name = "silu-form"
    description = "x * sigmoid(x) as one silu"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        made = 0
        for node in graph.nodes:
            if node.graph is None or node.op != "mul" or len(node.inputs) != 2:
                continue
            for side in (0, 1):
                gate, x = node.inputs[side], node.inputs[1 - side]
                if gate.producer is not None and gate.producer.op == "sigmoid" and gate.producer.inputs[0] is x \
                        and gate.shape == node.outputs[0].shape == x.shape:
                    _replace(graph, node, "silu", [x], {}, [gate])
                    made += 1
                    break
        return PassResult(made > 0, {"silu": made})


# ---------------------------------------------------------------------------- views
def merged_unsqueeze(inner: list[int], outer: list[int], rank: int) -> list[int]:
    """Axes of one unsqueeze (of a rank-``rank`` input) equal to ``inner``'s then ``outer``'s
    (non-negative axes of each result): the outer axes as they are, the inner ones where they land
    between them."""
    outer_set = set(outer)
    kept = [a for a in range(rank + len(inner) + len(outer)) if a not in outer_set]  # where inner's dims land
    return sorted(outer_set | {kept[a] for a in inner})


def merged_squeeze(inner: list[int], outer: list[int], rank: int) -> list[int]:
    """Axes of one squeeze (of a rank-``rank`` input) equal to ``inner``'s then ``outer``'s."""
    inner_set = set(inner)
    kept = [a for a in range(rank) if a not in inner_set]
    return sorted(inner_set | {kept[a] for a in outer})


@register_pass
@dataclass
class SqueezeForm(Pass):
    """An unsqueeze of an unsqueeze (a squeeze of a squeeze) as one node: torch source writes a
    multi-axis unsqueeze as a chain of one-axis calls, ONNX and indexing as one node."""

    name = "squeeze-form"
    description = "chains of unsqueezes (of squeezes) as one node"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        merged = 0
        for node in graph.nodes:
            if node.graph is None or node.op not in ("unsqueeze", "squeeze"):
                continue
            first = node.inputs[0].producer
            if first is None or first.op != node.op or not _single_use(first.outputs[0], graph):
                continue
            x = first.inputs[0]
            if node.op == "unsqueeze":
                axes = merged_unsqueeze(list(first.attrs["axes"]), list(node.attrs["axes"]), x.rank)
            else:
                axes = merged_squeeze(list(first.attrs["axes"]), list(node.attrs["axes"]), x.rank)
            _replace(graph, node, node.op, [x], {**node.attrs, "axes": axes}, [])
            merged += 1
        return PassResult(merged > 0, {"merged": merged})
