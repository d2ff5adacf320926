"""Handlers for ONNX's element-wise math: trigonometric and hyperbolic functions, rounding, Sign,
Reciprocal, Softsign, Mod and integer Div. Registered into ``onnx_ops.HANDLERS`` on import.

Each maps to the IR op that computes the same (torch's function of the same name); where an
attribute or type combination has none, the handler raises Unhandled and the node stays opaque.
"""

from __future__ import annotations

from slimgraph.frontends.onnx_ops import HANDLERS, Unhandled, _x, handles

# ONNX op -> IR op; the same function, element by element (Round: half to even in both)
_UNARY = {"Sin": "sin", "Cos": "cos", "Tan": "tan", "Asin": "asin", "Acos": "acos", "Atan": "atan",
          "Sinh": "sinh", "Cosh": "cosh", "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh",
          "Floor": "floor", "Ceil": "ceil", "Round": "round", "Sign": "sign", "Reciprocal": "reciprocal",
          "Softsign": "softsign"}
for _onnx, _op in _UNARY.items():
    HANDLERS[_onnx] = (lambda op: lambda cv: cv.emit(op, [_x(cv)]))(_op)


@handles("Mod")
def mod(cv):
    """fmod=1 is C's remainder (sign of the dividend): fmod. fmod=0 is Python's (sign of the divisor):
    remainder; ONNX allows it for integers only."""
    a, b = _x(cv), cv.tensor_input(1)
    if b is None or a.dtype != b.dtype:
        raise Unhandled
    if int(cv.attr("fmod", 0)):
        return cv.emit("fmod", [a, b])
    if a.dtype.is_float:
        raise Unhandled  # invalid ONNX (a float Mod must say fmod=1)
    return cv.emit("remainder", [a, b])


_BITWISE = {"BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or", "BitwiseXor": "bitwise_xor"}


@handles(*_BITWISE, "BitwiseNot")
def bitwise(cv):
    """Integer bitwise ops (opset 18); ONNX's operands share one type, as torch's results do."""
    values = [cv.tensor_input(i) for i in range(len(cv.node.inputs))]
    if any(v is None or v.dtype.is_float or v.dtype != values[0].dtype for v in values):
        raise Unhandled
    return cv.emit(_BITWISE.get(cv.node.op, "bitwise_not"), values)
