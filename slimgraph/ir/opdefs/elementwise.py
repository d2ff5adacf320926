"""Element-wise ops: every axis of the output is the same axis of each (broadcast) input."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimgraph.ir.coupling import Coupling, frozen, inp, out, same
from slimgraph.ir.dtypes import DType
from slimgraph.ir.ops import register_op


def elementwise_coupling(node) -> list[Coupling]:
    """Axis a of the output is axis a of every input that is not broadcast along it."""
    rank = node.outputs[0].rank
    couplings = []
    for axis in range(rank):
        dims = [out(0, axis)]
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            k = axis - (rank - v.rank)
            if k >= 0 and v.shape[k] != 1:
                dims.append(inp(i, k))
            elif k >= 0 and node.outputs[0].shape[axis] == 1:
                dims.append(inp(i, k))
        couplings.append(same(*dims))
    return couplings


def reduce_coupling(axis_attr: str):
    """Ops that mix values along some axes (softmax): those axes are frozen, others pass."""

    def coupling(node) -> list[Coupling]:
        rank = node.outputs[0].rank
        mixed = node.attrs[axis_attr]
        mixed = {a % rank for a in (mixed if isinstance(mixed, list) else [mixed])}
        return [
            frozen(inp(0, a), out(0, a)) if a in mixed else same(inp(0, a), out(0, a))
            for a in range(rank)
        ]

    return coupling


def same_type(node) -> list:
    x = node.inputs[0]
    return [(tuple(x.shape), x.dtype)]


def broadcast_shapes(a: tuple, b: tuple) -> tuple:
    """torch.broadcast_shapes for two static shapes (without its per-call dispatch cost)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"shapes {list(a)} and {list(b)} do not broadcast (dim {i}: {x} vs {y})")
        out.append(y if x == 1 else x)
    return tuple(out)


def broadcast_type(node) -> list:
    a, b = node.inputs[0], node.inputs[1]
    shape = broadcast_shapes(a.shape, b.shape)
    # torch's rule: a 0-d operand of the same kind (float/int) does not promote the other
    if a.rank == 0 and b.rank > 0 and a.dtype.is_float == b.dtype.is_float:
        dtype = b.dtype
    elif b.rank == 0 and a.rank > 0 and a.dtype.is_float == b.dtype.is_float:
        dtype = a.dtype
    else:
        dtype = DType.from_torch(torch.promote_types(a.dtype.torch, b.dtype.torch))
    return [(shape, dtype)]


UNARY = {
    "identity": (lambda x, a: x, "returns its input"),
    "relu": (lambda x, a: torch.relu(x), "max(x, 0)"),
    "sigmoid": (lambda x, a: torch.sigmoid(x), "logistic sigmoid"),
    "tanh": (lambda x, a: torch.tanh(x), "hyperbolic tangent"),
    "gelu": (lambda x, a: F.gelu(x, approximate=a.get("approximate", "none")), "GELU"),
    "silu": (lambda x, a: F.silu(x), "x * sigmoid(x)"),
    "hardswish": (lambda x, a: F.hardswish(x), "x * relu6(x + 3) / 6"),
    "hardsigmoid": (lambda x, a: F.hardsigmoid(x), "relu6(x + 3) / 6"),
    "clip": (lambda x, a: torch.clamp(x, a.get("min"), a.get("max")), "clamp to [min, max] (relu6, hardtanh)"),
    "leaky_relu": (lambda x, a: F.leaky_relu(x, a["negative_slope"]), "leaky ReLU"),
    "elu": (lambda x, a: F.elu(x, a.get("alpha", 1.0)), "ELU"),
    "erf": (lambda x, a: torch.erf(x), "error function"),
    "exp": (lambda x, a: torch.exp(x), "exponential"),
    "log": (lambda x, a: torch.log(x), "natural logarithm"),
    "sqrt": (lambda x, a: torch.sqrt(x), "square root"),
    "rsqrt": (lambda x, a: torch.rsqrt(x), "1 / sqrt(x)"),
    "neg": (lambda x, a: torch.neg(x), "-x"),
    "abs": (lambda x, a: torch.abs(x), "|x|"),
}
# math functions torch and ONNX share by name: op name = torch function name
for _name in ("sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "ceil",
              "floor", "round", "trunc", "sign", "reciprocal", "expm1", "log1p", "log2", "log10", "bitwise_not",
              "softsign", "mish", "logsigmoid"):
    _fn = getattr(torch, _name, None) or getattr(F, _name)
    UNARY[_name] = ((lambda fn: lambda x, a: fn(x))(_fn), f"torch.{_name}" if hasattr(torch, _name) else f"F.{_name}")

for _name, (_fn, _doc) in UNARY.items():
    register_op(
        _name,
        (lambda fn: lambda xs, a: fn(xs[0], a))(_fn),
        description=_doc,
        coupling=elementwise_coupling,
        infer=same_type,
    )

BINARY = {
    "add": (torch.add, "a + b (broadcasting)"),
    "sub": (torch.sub, "a - b (broadcasting)"),
    "mul": (torch.mul, "a * b (broadcasting)"),
    "div": (lambda a, b, mode=None: torch.div(a, b, rounding_mode=mode),
            "a / b (broadcasting); attr rounding_mode None, 'trunc' or 'floor'"),
    "pow": (torch.pow, "a ** b (broadcasting)"),
    "maximum": (torch.maximum, "element-wise max"),
    "minimum": (torch.minimum, "element-wise min"),
}

# results of another element type than the operands' (bool): shapes and dtypes from the reference
PREDICATES = {
    "isnan": (torch.isnan, "x != x"), "isinf": (torch.isinf, "|x| == inf"),
    "logical_not": (torch.logical_not, "not x (bool)"),
}
for _name, (_fn, _doc) in PREDICATES.items():
    register_op(_name, (lambda fn: lambda xs, a: fn(xs[0]))(_fn), description=_doc, coupling=elementwise_coupling)

BINARY.update({
    "fmod": (torch.fmod, "C-style remainder (sign of a)"),
    "remainder": (torch.remainder, "Python-style remainder (sign of b)"),
    "atan2": (torch.atan2, "atan(a / b) in the right quadrant"),
    "bitwise_and": (torch.bitwise_and, "a & b"), "bitwise_or": (torch.bitwise_or, "a | b"),
    "bitwise_xor": (torch.bitwise_xor, "a ^ b"),
})
COMPARISONS = {
    "eq": (torch.eq, "a == b"), "ne": (torch.ne, "a != b"), "lt": (torch.lt, "a < b"), "le": (torch.le, "a <= b"),
    "gt": (torch.gt, "a > b"), "ge": (torch.ge, "a >= b"), "logical_and": (torch.logical_and, "a and b (bool)"),
    "logical_or": (torch.logical_or, "a or b (bool)"), "logical_xor": (torch.logical_xor, "a xor b (bool)"),
}
for _name, (_fn, _doc) in COMPARISONS.items():
    register_op(_name, (lambda fn: lambda xs, a: fn(xs[0], xs[1]))(_fn), description=_doc, num_inputs=(2, 2),
                coupling=elementwise_coupling)

for _name, (_fn, _doc) in BINARY.items():
    register_op(
        _name,
        (lambda fn: lambda xs, a: fn(xs[0], xs[1], a["rounding_mode"]) if a.get("rounding_mode")
         else fn(xs[0], xs[1]))(_fn),
        description=_doc,
        num_inputs=(2, 2),
        coupling=elementwise_coupling,
        infer=broadcast_type if _name in ("add", "sub", "mul", "maximum", "minimum") else None,
    )

register_op(
    "softmax",
    lambda xs, a: torch.softmax(xs[0], a["axis"]),
    description="softmax along axis",
    coupling=reduce_coupling("axis"),
)
register_op(
    "log_softmax",
    lambda xs, a: torch.log_softmax(xs[0], a["axis"]),
    description="log-softmax along axis",
    coupling=reduce_coupling("axis"),
)


def prelu_ref(xs, a):
    x, slope = xs
    if slope.dim() == 1 and x.dim() > 1:  # per-channel slope on axis 1 (torch.nn.PReLU)
        slope = slope.reshape([-1] + [1] * (x.dim() - 2))
    return torch.where(x >= 0, x, x * slope)


def prelu_coupling(node) -> list[Coupling]:
    x, slope = node.inputs
    if slope.rank == 1 and x.rank > 1:  # per-channel slope follows axis 1
        dims = [inp(1, 0)] if slope.shape[0] > 1 else []
        return [same(inp(0, a), out(0, a), *(dims if a == 1 else [])) for a in range(x.rank)]
    return elementwise_coupling(node)


register_op("prelu", prelu_ref, description="x if x >= 0 else slope * x (slope broadcast)",
            num_inputs=(2, 2), coupling=prelu_coupling)
register_op("softplus", lambda xs, a: F.softplus(xs[0]), description="log(1 + exp(x))",
            coupling=elementwise_coupling)
register_op("selu", lambda xs, a: F.selu(xs[0]), description="scaled ELU", coupling=elementwise_coupling)

register_op("where", lambda xs, a: torch.where(xs[0], xs[1], xs[2]),
            description="cond ? a : b (broadcasting)", num_inputs=(3, 3), coupling=elementwise_coupling)
