"""Calibration for int8 quantization: activation ranges from sample batches, and the scales and
zero points they give.

An observer watches each tensor to quantize over every calibration batch. ``minmax`` keeps the
extremes (one pass over the data). The histogram methods take a second pass that fills a fine
histogram (2048 bins by default) over the range the first pass found, then choose a narrower
clipping range from it:

  percentile  clip the given share of outliers, half on each side;
  entropy     the range whose quantized distribution is closest to the real one in KL divergence
              (TensorRT's method; it needs many more bins than quantization levels, or every
              candidate is the whole range and it silently equals minmax);
  mse         the range with the least expected squared error: rounding (step^2 / 12) inside the
              range, clipping distance outside.

Ranges always contain 0, so zero padding and ReLU's zeros are exact in the quantized model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from slimgraph.errors import PassError
from slimgraph.ir import Graph, Value, run

METHODS = ("minmax", "percentile", "entropy", "mse")
SCALE_FLOOR = 1e-20  # a range this narrow is noise; the floor keeps 1 / scale finite in float32


def check_batches(graph: Graph, data: Any, who: str) -> list[tuple[torch.Tensor, ...]]:
    """The calibration data as a list of input tuples, or a PassError saying what is wrong with it."""
    if data is None:
        raise PassError(f"{who} needs calibration data: optimize(..., calibration_data=[inputs, ...]), "
                        "an iterable of input tuples")
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise PassError(f"{who}: calibration_data must be an iterable of input tuples, got a "
                        f"{type(data).__name__} (wrap a single batch in a list)")
    batches = []
    for i, item in enumerate(data):
        batch = (item,) if isinstance(item, torch.Tensor) else item
        if not isinstance(batch, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in batch):
            raise PassError(f"{who}: calibration batch {i} is a {type(item).__name__}, not a tensor or a "
                            "tuple of tensors")
        if len(batch) != len(graph.inputs):
            raise PassError(f"{who}: calibration batch {i} has {len(batch)} inputs; the graph takes "
                            f"{len(graph.inputs)}")
        for j, (value, t) in enumerate(zip(graph.inputs, batch)):
            where = f"{who}: calibration batch {i}, input {j} (%{value.name})"
            fixed = [a for a in range(1, len(value.shape)) if not (value.sym and value.sym[a] is not None)]
            if t.dim() != len(value.shape) or any(t.shape[a] != value.shape[a] for a in fixed):
                raise PassError(f"{where}: expected shape {value.type_str()} (any batch size"
                                f"{', any size on the symbolic dims' if value.sym else ''}), got {tuple(t.shape)}")
            if t.dtype != value.dtype.torch:
                raise PassError(f"{where}: expected dtype {value.dtype.torch}, got {t.dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise PassError(f"{where} contains {kind}")
        batches.append(tuple(t.detach() for t in batch))
    if not batches:
        raise PassError(f"{who}: calibration_data is empty")
    return batches


# ---------------------------------------------------------------------------- observers
class Observer:
    """The range of one tensor over the batches, then (histogram methods) its histogram."""

    def __init__(self, value: Value, symmetric: bool) -> None:
        self.value = value
        self.symmetric = symmetric
        self.lo, self.hi = 0.0, 0.0  # start at 0: ranges always contain it
        self.hist: np.ndarray | None = None
        self.not_finite: int | None = None  # the first batch on which it held NaN or Inf

    def update_range(self, t: torch.Tensor, batch: int) -> None:
        lo, hi = (float(m) for m in torch.aminmax(t.detach().float()))
        if math.isnan(lo) or math.isnan(hi):  # NaN reaches the extremes: the float model computes it
            raise PassError(f"quantize: tensor %{self.value.name} is not finite on calibration batch {batch}")
        if math.isinf(lo) or math.isinf(hi):  # an attention mask's -inf: no int8 grid holds it
            self.not_finite = batch if self.not_finite is None else self.not_finite
            return
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    @property
    def span(self) -> tuple[float, float]:
        """Where the histogram lives: the observed range, made symmetric for symmetric types."""
        if self.symmetric:
            m = max(-self.lo, self.hi)
            return -m, m
        return self.lo, self.hi

    def update_hist(self, t: torch.Tensor, bins: int) -> None:
        a, b = self.span
        if b <= a:
            return
        t = t.detach().float().reshape(-1)
        # exact zeros are left out: every range holds 0 exactly, and ReLU's spike of them would
        # otherwise outweigh the rest of the distribution in the entropy and mse choices
        counts = torch.histc(t[t != 0], bins, a, b).double().numpy()
        self.hist = counts if self.hist is None else self.hist + counts

    def range(self, method: str, levels: int, percentile: float) -> tuple[float, float]:
        a, b = self.span
        if method == "minmax" or self.hist is None or self.hist.sum() == 0 or b <= a:
            return a, b
        if method == "percentile":
            return percentile_range(self.hist, a, b, percentile)
        t = best_shrink(self.hist, a, b, levels, method)
        return a * t, b * t


def observe(graph: Graph, values: Sequence[Value], batches: list[tuple[torch.Tensor, ...]], method: str,
            symmetric: bool, bins: int, progress: bool) -> list[Observer]:
    """Run the graph over the batches (twice for histogram methods) and observe ``values``."""
    from tqdm.auto import tqdm

    observers = [Observer(v, symmetric) for v in values]
    rounds = 1 if method == "minmax" else 2
    for r in range(rounds):
        label = "calibrating" + (f" ({'ranges' if r == 0 else 'histograms'})" if rounds > 1 else "")
        # disable=None: a bar on terminals only, so logs and CI stay clean
        for i, batch in enumerate(tqdm(batches, desc=label, unit="batch", disable=None if progress else True)):
            _, captured = run(graph, list(batch), capture=values)
            for obs in observers:
                t = captured[obs.value]
                if r == 0:
                    obs.update_range(t, i)
                else:
                    obs.update_hist(t, bins)
    return observers


# ---------------------------------------------------------------------------- range choice
def percentile_range(hist: np.ndarray, a: float, b: float, percentile: float) -> tuple[float, float]:
    """Clip (100 - percentile)% of the values, half from each end."""
    cdf = np.cumsum(hist) / hist.sum()
    tail = (100.0 - percentile) / 200.0
    edges = np.linspace(a, b, len(hist) + 1)
    lo = edges[int(np.searchsorted(cdf, tail, side="right"))]
    hi = edges[int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1]
    return min(float(lo), 0.0), max(float(hi), 0.0)


def best_shrink(hist: np.ndarray, a: float, b: float, levels: int, method: str) -> float:
    """The factor t in (0, 1] for which the range [t*a, t*b] loses the least (entropy or mse).

    Shrinking towards 0 keeps zero's place in the range, so one number describes a candidate
    for signed and one-sided tensors alike.
    """
    bins = len(hist)
    zero = -a / (b - a) * bins  # where 0 falls, in bins
    ts = np.linspace(1.0, 0.0, 129)[:-1]  # 128 candidates, widest first
    best_t, best = 1.0, math.inf
    for t in ts:
        i0, i1 = int(round(zero - t * zero)), int(round(zero + t * (bins - zero)))
        if i1 - i0 < levels:  # fewer bins than levels: nothing left to compare
            break
        loss = kl_loss(hist, i0, i1, levels) if method == "entropy" else mse_loss(hist, i0, i1, levels, a, b)
        if loss < best:
            best_t, best = float(t), loss
    return best_t


def kl_loss(hist: np.ndarray, i0: int, i1: int, levels: int) -> float:
    """KL(P || Q): P is the histogram clipped to bins [i0, i1) (outliers piled on the end bins),
    Q the same bins quantized to ``levels`` equal steps, each step's mass spread evenly over its
    non-empty bins."""
    inside = hist[i0:i1]
    p = inside.copy()
    p[0] += hist[:i0].sum()
    p[-1] += hist[i1:].sum()
    starts = np.linspace(0, len(inside), levels + 1).astype(int)[:-1]
    mass = np.add.reduceat(inside, starts)
    filled = np.add.reduceat((inside > 0).astype(np.float64), starts)
    per_bin = np.divide(mass, filled, out=np.zeros_like(mass), where=filled > 0)
    q = np.where(inside > 0, np.repeat(per_bin, np.diff(np.append(starts, len(inside)))), 0.0)
    p, q = p / p.sum(), q / max(q.sum(), 1e-300)
    keep = p > 0
    q = np.where(keep & (q == 0), 1e-12, q)  # an end bin that only outliers reached
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def mse_loss(hist: np.ndarray, i0: int, i1: int, levels: int, a: float, b: float) -> float:
    """Expected squared error of quantizing to [edge i0, edge i1) with ``levels`` steps."""
    edges = np.linspace(a, b, len(hist) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    lo, hi = edges[i0], edges[i1]
    step = (hi - lo) / (levels - 1)
    clipped = np.clip(centers, lo, hi)
    err = np.where(centers == clipped, step * step / 12.0, (centers - clipped) ** 2)
    return float(np.sum(hist * err) / hist.sum())


# ---------------------------------------------------------------------------- parameters
def activation_params(lo: float, hi: float, dtype: torch.dtype,
                      bounds: tuple[float | None, float | None] = (None, None)) -> tuple[float, int]:
    """(scale, zero point) of a per-tensor range: uint8 asymmetric or int8 symmetric.

    ``bounds`` are those of a clip or ReLU the tensor comes out of: the representable range is
    kept inside them (to the float32 bit), so a runtime may drop the clip into the quantizer.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if dtype == torch.uint8:
        qmin, qmax, scale = 0, 255, (hi - lo) / 255.0
    else:
        qmin, qmax, scale = -127, 127, max(-lo, hi) / 127.0
    if scale == 0.0:  # a tensor that is always zero: any scale is exact; never 0 or NaN
        return 1.0, 0
    scale = max(scale, SCALE_FLOOR)
    zero_point = 0 if dtype == torch.int8 else int(min(max(round(-lo / scale), qmin), qmax))
    scale = _inside(np.float32(scale), zero_point, qmin, qmax, bounds)
    return float(scale), zero_point


def _inside(scale: np.float32, zp: int, qmin: int, qmax: int, bounds: tuple[float | None, float | None]
            ) -> np.float32:
    """Nudge scale down (by float32 ulps) until [(qmin - zp), (qmax - zp)] * scale fits the bounds."""
    lo, hi = bounds
    for _ in range(8):
        over_hi = hi is not None and np.float32(qmax - zp) * scale > np.float32(hi)
        under_lo = lo is not None and np.float32(qmin - zp) * scale < np.float32(lo)
        if not (over_hi or under_lo):
            break
        scale = np.nextafter(scale, np.float32(0))
    return scale


def weight_params(w: torch.Tensor, axis: int | None, qmax: int = 127) -> torch.Tensor:
    """Symmetric int8 scales (|w| max / qmax: 127, or 64 for 7-bit weights), per channel along
    ``axis`` or per tensor.

    An all-zero channel borrows the largest scale of the others (1.0 if all are zero): its
    weights stay exactly 0 and its bias keeps the same int32 step as its neighbours'.
    """
    w = w.detach().double()
    if axis is None:
        absmax = w.abs().max().reshape(())
    else:
        absmax = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(1)
    scale = absmax / float(qmax)
    fallback = float(scale.max()) if bool((scale > 0).any()) else 1.0
    scale = torch.where(scale > 0, scale.clamp_min(SCALE_FLOOR), torch.full_like(scale, fallback))
    return scale.float()
