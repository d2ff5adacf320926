"""When onnxruntime's CPU provider fuses DQ -> Conv -> [Relu/Clip] -> Q into QLinearConv: the rules,
on plain numbers, shared by the PyTorch backend (its exact-integer ``qconv`` units, on the IR) and
the QOperator writer (its QLinearConv nodes, on the ONNX graph), so that both pick the same units.

Each rule was checked against onnxruntime 1.32 on x86 with tiny QDQ models (an ORT_ENABLE_EXTENDED
session's optimized_model_filepath holding QLinearConv or not):

- activations: uint8, or int8 that QDQS8ToU8Transformer shifts to uint8 (a Q read only by a DQ with
  the same zero point); the graph walk that finds the shift stays with each caller.
- weights: onnxruntime also fuses uint8 weights and non-zero zero points, but the units both callers
  compute exactly are int8 weights with zero points 0 (per tensor, or per output channel), which is
  also all the quantizer makes; other weights stay float arithmetic on both sides.
- bias: onnxruntime adds the int32 bias unscaled, and fuses even where the bias scale is up to ~1%
  off x_scale * w_scale (1 ulp, 1e-6, 1e-3: fused; 10%: not). Accepted here: within a relative
  1e-6 of the float32 product, where re-scaling the bias would not move any |bias| < 2**19 by half
  a step, so either reading of the bias gives the same integers.
- Relu before Q: redundant iff Q's zero point is the lowest level (ReluQuantFusion and the QDQ
  selector agree).
- Clip before Q: redundant iff ClipQuantFusion removes it (min - scale * (qmin - zp) <= FLT_EPSILON
  and scale * (qmax - zp) - max <= FLT_EPSILON, in float32, absent bounds -+FLT_MAX), or, for the
  Clip right after the conv, the QDQ selector's IsClipMadeRedundantByQ: rint(min / scale) + zp <=
  qmin and rint(max / scale) + zp >= qmax, as int32 (an out-of-range level, e.g. an absent max,
  converts to INT32_MIN as x86's cvttss2si does, so that half never holds then).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

QRANGE: dict[np.dtype, tuple[int, int]] = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
_EPS = np.finfo(np.float32).eps
_FLT_MAX = np.finfo(np.float32).max
_INT32_MIN = -(2**31)


def activation_fuses(dtype: np.dtype | type, shifted_to_uint8: bool) -> bool:
    """Whether an activation (conv input or Q output) of this dtype fuses on x86: uint8, or int8
    that QDQS8ToU8Transformer makes uint8 (``shifted_to_uint8``: the caller found the Q -> DQ pair)."""
    dtype = np.dtype(dtype)
    return dtype == np.uint8 or (dtype == np.int8 and shifted_to_uint8)


def weight_fuses(dtype: np.dtype | type, zero_points: np.ndarray | int | None) -> bool:
    """Weights both callers compute as the fused kernel: int8 with every zero point 0 (or absent)."""
    return np.dtype(dtype) == np.int8 and (zero_points is None or not np.asarray(zero_points).any())


def bias_on_grid(bias_scale: np.ndarray | float, x_scale: np.ndarray | float, w_scale: np.ndarray | float) -> bool:
    """Whether an int32 bias with ``bias_scale`` is on the grid float32(x_scale * w_scale) (per
    channel where the scales are), to a relative 1e-6."""
    step = np.float32(x_scale) * np.asarray(w_scale, np.float32)
    bias_scale = np.asarray(bias_scale, np.float32)
    try:
        step, bias_scale = np.broadcast_arrays(step, bias_scale)
    except ValueError:
        return False
    return bool(np.allclose(bias_scale, step, rtol=1e-6, atol=0))


def _level(bound: np.float32, scale: np.float32, zero_point: int) -> int:
    """int32(rint(bound / scale)) + zero_point as onnxruntime computes it on x86 (int32 wraps)."""
    q = np.rint(np.float32(bound / scale))
    level = int(q) if np.isfinite(q) and -(2**31) <= q < 2**31 else _INT32_MIN
    return (level + zero_point + 2**31) % 2**32 - 2**31


def clamp_redundant(op: str, lo: float | None, hi: float | None, scale: float, zero_point: int,
                    dtype: np.dtype | type, next_to_op: bool) -> bool:
    """Whether onnxruntime drops a Relu (``op`` "relu") or Clip [lo, hi] (None: unbounded) before a
    per-tensor Q(scale, zero_point, dtype); ``next_to_op``: it reads the conv's output directly."""
    qmin, qmax = QRANGE[np.dtype(dtype)]
    zero_point = int(zero_point)
    if op.lower() == "relu":
        return zero_point == qmin
    s = np.float32(scale)
    lo32 = np.float32(-_FLT_MAX if lo is None else lo)
    hi32 = np.float32(_FLT_MAX if hi is None else hi)
    with np.errstate(over="ignore", invalid="ignore"):
        lower, upper = s * np.float32(qmin - zero_point), s * np.float32(qmax - zero_point)
        if not (_EPS < lo32 - lower or _EPS < upper - hi32):
            return True  # ClipQuantFusion
        return next_to_op and _level(lo32, s, zero_point) <= qmin and _level(hi32, s, zero_point) >= qmax


def clamps_redundant(clamps: Iterable[tuple[str, float | None, float | None]], scale: float, zero_point: int,
                     dtype: np.dtype | type) -> bool:
    """Whether every Relu/Clip of a chain conv -> clamps -> Q goes: the first (next to the conv) by
    either rule, the others only by the fusions that remove a Relu/Clip before any Q."""
    return all(clamp_redundant(op, lo, hi, scale, zero_point, dtype, i == 0)
               for i, (op, lo, hi) in enumerate(clamps))
