"""Handlers for ONNX's sorting, cumulative, gather/scatter and resampling ops (TopK, CumSum,
GatherElements, ScatterElements, ScatterND, Resize, GridSample). Registered into
``onnx_ops.HANDLERS`` on import.

ONNX allows negative indices where torch.gather and torch.scatter do not: a constant index is
wrapped at import, a computed one through ``where(i < 0, i + size, i)``.
"""

from __future__ import annotations

import numpy as np
import torch

from slimgraph.frontends.onnx_ops import Unhandled, _ints, _symbolic, _x, handles
from slimgraph.ir import Value
from slimgraph.ir.symbolic import SymDim


def _static_dim(x: Value, axis: int) -> int | None:
    """The size of ``x`` at ``axis`` where it is the same at every input size, else None."""
    return None if x.sym and x.sym[axis] is not None else x.shape[axis]


@handles("TopK")
def topk(cv):
    """k of all elements is a (stable) sort; fewer a topk. ONNX orders ties by index, as a stable sort."""
    x = _x(cv)
    axis = int(cv.attr("axis", -1)) % x.rank
    k = _ints(cv.static(1))[0] if len(cv.node.inputs) > 1 else int(cv.attr("k"))
    largest = bool(int(cv.attr("largest", 1)))
    if k == x.dim(axis):  # the same expression where the axis is symbolic
        outs = cv.emit("sort", [x], {"axis": axis, "descending": largest})
    elif isinstance(k, SymDim) or x.dtype.torch == torch.bool:
        raise Unhandled
    else:
        outs = cv.emit("topk", [x], {"axis": axis, "k": k, "largest": largest})
    return list(outs)


@handles("CumSum")
def cumsum(cv):
    x = _x(cv)
    if int(cv.attr("exclusive", 0)) or int(cv.attr("reverse", 0)):
        raise Unhandled
    axis = _ints(cv.static(1))
    if len(axis) != 1 or _symbolic(axis):
        raise Unhandled
    return cv.emit("cumsum", [x], {"axis": int(axis[0]) % x.rank})


# ops whose output holds only values of their (first) input: an index made by them from a
# non-negative one is non-negative
_MOVES = {"identity", "reshape", "expand", "unsqueeze", "squeeze", "permute", "flatten", "tile", "slice", "select",
          "gather", "flip", "roll", "concat"}


def _non_negative(value: Value, depth: int = 0) -> bool:
    """Whether an integer index is known to hold no negative entry: a constant's entries, argmax's and
    sort's indices, what movement ops make of those, and an index wrapped by ``_wrapped`` (so an
    imported file imports again as it is)."""
    if value.is_constant:
        return bool((value.const_value >= 0).all())
    node = value.producer
    if node is None or depth > 16:
        return False
    if node.op in ("argmax", "argmin") or node.op in ("topk", "sort") and value is node.outputs[1]:
        return True
    if node.op in _MOVES:
        data = node.inputs if node.op == "concat" else node.inputs[:1]
        return all(_non_negative(v, depth + 1) for v in data)
    if node.op == "where":  # where(i < 0, i + n, i), n >= 0: wrapped already
        cond, shifted, index = node.inputs[0].producer, node.inputs[1].producer, node.inputs[2]
        return cond is not None and cond.op == "lt" and cond.inputs[0] is index and cond.inputs[1].is_constant \
            and not cond.inputs[1].const_value.any() and shifted is not None and shifted.op == "add" \
            and shifted.inputs[0] is index and shifted.inputs[1].is_constant \
            and bool((shifted.inputs[1].const_value >= 0).all())
    return False


def _wrapped(cv, index: Value | np.ndarray, x: Value, axis: int, label: str) -> Value:
    """An index with ONNX's negative entries (from the end) made positive, as torch's gathers take it."""
    if isinstance(index, np.ndarray):
        if index.dtype == object:
            raise Unhandled
        size = _static_dim(x, axis)
        if size is None and (index < 0).any():
            raise Unhandled
        if size:
            index = np.where(index < 0, index + size, index)
        cv.env[f"{cv.name}::{label}"] = index.astype(np.int64)
        return cv.value(f"{cv.name}::{label}", f"{cv.name}_{label}")
    if _non_negative(index):
        return index
    size = _static_dim(x, axis)
    if size is None or index.dtype.is_float:
        raise Unhandled
    zero = cv.graph.add_constant(f"{cv.name}_zero", torch.tensor(0, dtype=index.dtype.torch))
    n = cv.graph.add_constant(f"{cv.name}_size", torch.tensor(size, dtype=index.dtype.torch))
    negative = cv.emit("lt", [index, zero], suffix=f"_{label}_negative")
    return cv.emit("where", [negative, cv.emit("add", [index, n], suffix=f"_{label}_shifted"), index],
                   suffix=f"_{label}_wrapped")


@handles("GatherElements")
def gather_elements(cv):
    x = _x(cv)
    axis = int(cv.attr("axis", 0)) % x.rank
    index = cv.input(1)
    return cv.emit("gather_elements", [x, _wrapped(cv, index, x, axis, "index")], {"axis": axis})


_SCATTER_REDUCE = {"none": "none", "add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@handles("ScatterElements")
def scatter_elements(cv):
    """torch.scatter (reduction none) or scatter_reduce with the data included (ONNX's reductions)."""
    x, updates = _x(cv), cv.tensor_input(2)
    axis = int(cv.attr("axis", 0)) % x.rank
    reduction = cv.attr("reduction", "none")
    reduce = _SCATTER_REDUCE.get(reduction.decode() if isinstance(reduction, bytes) else reduction)
    if reduce is None or updates is None or updates.dtype != x.dtype:
        raise Unhandled
    index = _wrapped(cv, cv.input(1), x, axis, "index")
    return cv.emit("scatter", [x, index, updates], {"axis": axis, "reduce": reduce})


@handles("ScatterND")
def scatter_nd(cv):
    """x[indices[..., 0], ..., indices[..., k - 1]] = updates (reduction add: +=): index_put at the
    first k axes (torch's advanced indexing takes negative indices as ONNX does)."""
    x, indices, updates = _x(cv), cv.tensor_input(1), cv.tensor_input(2)
    reduction = cv.attr("reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in ("none", "add") or indices is None or updates is None or updates.dtype != x.dtype \
            or indices.dtype.is_float or indices.rank < 1 or not isinstance(indices.shape[-1], int) \
            or not 1 <= indices.shape[-1] <= x.rank:
        raise Unhandled
    parts = [cv.emit("select", [indices], {"axis": indices.rank - 1, "index": k}, suffix=f"_index{k}")
             for k in range(indices.shape[-1])]
    return cv.emit("index_put", [x, updates, *parts], {"axes": list(range(len(parts))),
                                                       "accumulate": reduction == "add"})


# ---------------------------------------------------------------------------- resampling
def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@handles("Resize")
def resize(cv):
    """The forms torch's interpolate computes: nearest as floor(dst / scale) ("asymmetric", "floor");
    linear (any rank) and cubic (2-D, a = -0.75) with half-pixel centres or align_corners. Scales
    or sizes of the spatial dims only; a region of interest, antialiasing, axes or aspect-ratio
    policies have no IR form."""
    x = _x(cv)
    if cv.opset < 11 or x.rank < 3:
        raise Unhandled  # Resize-10 has no coordinate modes
    mode = _text(cv.attr("mode", "nearest"))
    coords = _text(cv.attr("coordinate_transformation_mode", "half_pixel"))
    if int(cv.attr("antialias", 0)) or cv.attr("axes") is not None or int(cv.attr("exclude_outside", 0)) \
            or _text(cv.attr("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise Unhandled
    scales = cv.static(2) if len(cv.node.inputs) > 2 and cv.node.inputs[2].name else None
    sizes = _ints(cv.static(3)) if len(cv.node.inputs) > 3 and cv.node.inputs[3].name else None
    if scales is not None and scales.size == 0:
        scales = None
    attrs: dict = {"mode": mode}
    if sizes:
        if len(sizes) != x.rank or any(sizes[a] != x.dim(a) for a in (0, 1)) or _symbolic(sizes[2:]):
            raise Unhandled
        attrs["size"] = [int(d) for d in sizes[2:]]
        out = attrs["size"]
    elif scales is not None:
        factors = [float(f) for f in np.asarray(scales, dtype=np.float64).reshape(-1)]
        if len(factors) != x.rank or factors[:2] != [1.0, 1.0] or any(f <= 0 for f in factors):
            raise Unhandled
        attrs["scales"] = factors[2:]
        out = [int(np.floor(d * f)) for d, f in zip(x.shape[2:], factors[2:])]
    else:
        raise Unhandled
    if mode == "nearest":
        if coords != "asymmetric" or _text(cv.attr("nearest_mode", "round_prefer_floor")) != "floor":
            raise Unhandled
    elif mode in ("linear", "cubic"):
        if mode == "cubic" and (x.rank != 4 or abs(float(cv.attr("cubic_coeff_a", -0.75)) + 0.75) > 1e-7):
            raise Unhandled
        if x.rank > 5:
            raise Unhandled
        # half_pixel differs from pytorch_half_pixel only where an output dim has one element
        if coords == "pytorch_half_pixel" or coords == "half_pixel" and all(d > 1 for d in out):
            attrs["align_corners"] = False
        elif coords == "align_corners":
            attrs["align_corners"] = True
        else:
            raise Unhandled
    else:
        raise Unhandled
    return cv.emit("resize", [x], attrs)


_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
               "cubic": "bicubic"}


@handles("GridSample")
def grid_sample(cv):
    """F.grid_sample: 2-D (4-D input), or 3-D without cubic; modes as opset 16 or 20 name them."""
    x, grid = _x(cv), cv.tensor_input(1)
    mode = _GRID_MODES.get(_text(cv.attr("mode", "bilinear" if cv.opset < 20 else "linear")))
    padding = _text(cv.attr("padding_mode", "zeros"))
    if grid is None or mode is None or x.rank not in (4, 5) or (x.rank == 5 and mode == "bicubic") \
            or padding not in ("zeros", "border", "reflection") or grid.dtype != x.dtype:
        raise Unhandled
    return cv.emit("grid_sample", [x, grid], {"mode": mode, "padding_mode": padding,
                                              "align_corners": bool(int(cv.attr("align_corners", 0)))})
