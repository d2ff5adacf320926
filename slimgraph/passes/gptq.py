"""GPTQ weight rounding (Frantar et al. 2023, after Optimal Brain Quantization): round a layer's
weights one input column at a time and push each column's rounding error onto the columns not yet
rounded, weighted by the inverse of the layer's input Hessian H = X Xᵀ over the calibration data,
so that the layer's outputs on that data, not its weights, stay closest to the float ones.

The integers keep the grid ``quantize`` chose (per output channel scales, the same range), so
nothing downstream changes: the result is a float weight that lies on the grid, which
``fake_quant`` and ``fold-int8`` then reproduce exactly. Measured on random-init resnet18
(weights quantized, activations float; logits 1 - cosine against fp32): nearest rounding 8-bit
7.8e-5, 7-bit 3.1e-4; GPTQ 7-bit 2.3e-6. That is what lets 7-bit weights (for CPUs whose int8
kernels saturate) be more accurate than 8-bit ones rounded to nearest.

Layers it handles: conv1d/conv2d (grouped and depthwise too, one Hessian per group) and linear.
A layer keeps nearest rounding where its Hessian would be too large (``MAX_COLUMNS`` inputs per
output) or where the calibration data shows it fewer than inputs / 16 rows. Between that and as
many rows as inputs (a classifier's linear sees one row per image), the damping grows by
inputs / rows, so that the rounding leans less on the directions the data could not show.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimgraph.ir import Graph, Node, run
from slimgraph.ir.opdefs.nn import torch_pad_arg

MAX_COLUMNS = 6144  # inputs per output: the Hessian and its inverse factor stay under 150 MB each
ROWS_PER_INPUT = 8  # rows kept per layer input (evenly spaced positions): the Hessian costs K / C_out
# times the layer's own MACs per row, and beyond a few rows per input a better estimate gains little
DAMPING = 0.01  # of the Hessian's mean diagonal, as GPTQ does (times inputs / rows where that is more than 1)
MIN_ROWS_FRACTION = 1 / 16  # fewer rows per input than this: the damping would leave little to gain


def supported(node: Node) -> bool:
    """conv1d/conv2d and linear with a constant weight, and matmul with a constant [K, N] one."""
    w = node.inputs[1]
    return (node.op == "linear" or (node.op == "conv" and w.rank in (3, 4)) or (node.op == "matmul" and w.rank == 2)) \
        and w.is_constant


def _columns(node: Node, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as [groups, inputs per output, rows]: what each output channel reads."""
    if node.op in ("linear", "matmul"):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    a, w = node.attrs, node.inputs[1]
    if w.rank == 3:  # conv1d as conv2d over a height of 1
        x = x.unsqueeze(2)
        pads, kernel = [0, a["pads"][0], 0, a["pads"][1]], (1, w.shape[2])
        stride, dilation = (1, a["stride"][0]), (1, a["dilation"][0])
    else:
        pads, kernel, stride, dilation = a["pads"], tuple(w.shape[2:]), a["stride"], a["dilation"]
    x = F.pad(x, torch_pad_arg(list(pads)))
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C * kh * kw, L], channel-major
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    return cols.reshape(a["groups"], -1, cols.shape[1])


def input_hessians(graph: Graph, nodes: list[Node], batches: list[tuple[torch.Tensor, ...]]
                   ) -> dict[int, tuple[torch.Tensor, int]]:
    """id(node) -> (sum of X Xᵀ over the calibration batches [groups, K, K], rows used): at most
    ``ROWS_PER_INPUT`` x K rows per layer, spread evenly over the batches and their positions."""
    nodes = [n for n in nodes if supported(n) and _inputs_per_output(n) <= MAX_COLUMNS]
    sums: dict[int, tuple[torch.Tensor, int]] = {}
    inputs = list({id(n.inputs[0]): n.inputs[0] for n in nodes}.values())
    for batch in batches:
        _, captured = run(graph, list(batch), capture=inputs)
        for node in nodes:
            cols = _columns(node, captured[node.inputs[0]].float())
            keep = -(-ROWS_PER_INPUT * cols.shape[1] // len(batches))  # this batch's share, rounded up
            if cols.shape[2] > keep:
                cols = cols[:, :, torch.linspace(0, cols.shape[2] - 1, keep).round().long()]
            h, rows = sums.get(id(node), (0, 0))
            sums[id(node)] = (h + cols @ cols.transpose(1, 2), rows + cols.shape[2])
    return sums


def _inputs_per_output(node: Node) -> int:
    if node.op == "matmul":
        return node.inputs[1].shape[0]
    return math.prod(node.inputs[1].shape[1:])


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor | None:
    """U upper triangular with H⁻¹ = Uᵀ U, from one Cholesky and one triangular inverse (not
    GPTQ's three factorizations): with J the index reversal and J H J = L Lᵀ, U = J L⁻¹ J."""
    flipped = h.flip(-1, -2)
    lower, info = torch.linalg.cholesky_ex(flipped)
    if bool(info.any()):
        return None
    eye = torch.eye(h.shape[-1], dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-1, -2)


def _damped_inverse(hessian: torch.Tensor, rows: int, damping: float = DAMPING) -> torch.Tensor | None:
    """The upper factor of the damped inverse Hessian (see _inverse_cholesky_upper); None where it
    is too poorly sampled or not positive definite even when damped."""
    k = hessian.shape[-1]
    if rows < MIN_ROWS_FRACTION * k:
        return None
    h = hessian.float().clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    diag[diag == 0] = 1.0  # inputs always zero: nothing to compensate with; rounded to nearest
    for attempt in range(3):  # more damping if the Hessian is not positive definite
        damp = damping * max(1.0, k / max(rows, 1)) * 10**attempt * diag.mean(1)
        upper = _inverse_cholesky_upper(h + damp[:, None, None] * torch.eye(k, dtype=h.dtype))
        if upper is not None:
            return upper
    return None


def round_weight_groups(w: torch.Tensor, hessian: torch.Tensor, rows: int, group_size: int,
                        grid: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], qmax: int,
                        damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """GPTQ onto a grid per group of ``group_size`` inputs (weight-only quantization): w [N, K] ->
    (integers [N, K] in [0, qmax], scales [N, groups], zero points [N, groups]). Each group's grid
    is ``grid(columns)`` -> (scale, zero point) [N] each, chosen when GPTQ reaches the group's first
    column, from the weights as the earlier columns' errors left them (as GPTQ's own grouped
    rounding does). None where the Hessian does not allow it (the caller rounds to nearest)."""
    _, k = w.shape
    upper = _damped_inverse(hessian, rows, damping)
    if upper is None:
        return None
    upper = upper[0]
    W = w.detach().float().clone()
    groups = -(-k // group_size)
    ints = torch.empty(W.shape, dtype=torch.int32)
    scales = torch.empty(W.shape[0], groups)
    zeros = torch.empty(W.shape[0], groups)
    block = max(128, group_size)  # a multiple of every group size: groups never straddle two blocks
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, errors = W[:, i1:i2].clone(), torch.empty_like(W[:, i1:i2])
        for i in range(i2 - i1):
            col = w1[:, i]
            g = (i1 + i) // group_size
            if (i1 + i) % group_size == 0:
                end = min(i + group_size, i2 - i1)
                scales[:, g], zeros[:, g] = grid(w1[:, i:end])
            q = torch.clamp(torch.round(col / scales[:, g]) + zeros[:, g], 0, qmax)
            ints[:, i1 + i] = q.int()
            err = (col - (q - zeros[:, g]) * scales[:, g]) / upper[i1 + i, i1 + i]
            w1[:, i:] -= err[:, None] * upper[None, i1 + i, i1 + i:i2]
            errors[:, i] = err
        W[:, i2:] -= errors @ upper[i1:i2, i2:]
    return ints, scales, zeros


def round_weight(w: torch.Tensor, hessian: torch.Tensor, rows: int, scale: torch.Tensor, qmin: int, qmax: int,
                 block: int = 128) -> torch.Tensor | None:
    """The weight rounded by GPTQ onto the grid ``scale`` x [qmin, qmax] (a scale per output
    channel), as float values on that grid; None where the Hessian is not positive definite even
    when damped, or too poorly sampled (the caller keeps nearest rounding)."""
    groups, k, _ = hessian.shape
    if rows < MIN_ROWS_FRACTION * k:
        return None
    # float32, as GPTQ's own code: the damping keeps the factorizations well within its precision
    W = w.detach().float().reshape(groups, w.shape[0] // groups, k).clone()
    s = scale.float().reshape(groups, -1, 1)
    h = hessian.float().clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    diag[diag == 0] = 1.0  # inputs always zero: nothing to compensate with; rounded to nearest
    upper = None
    for attempt in range(3):  # more damping if the Hessian is not positive definite
        damp = DAMPING * max(1.0, k / max(rows, 1)) * 10**attempt * diag.mean(1)
        upper = _inverse_cholesky_upper(h + damp[:, None, None] * torch.eye(k, dtype=h.dtype))
        if upper is not None:
            break
    if upper is None:
        return None
    q_all = torch.empty_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, errors = W[:, :, i1:i2].clone(), torch.empty_like(W[:, :, i1:i2])
        for i in range(i2 - i1):
            col = w1[:, :, i]
            q = torch.clamp(torch.round(col / s[:, :, 0]), qmin, qmax) * s[:, :, 0]
            q_all[:, :, i1 + i] = q
            err = (col - q) / upper[:, i1 + i, i1 + i, None]
            w1[:, :, i:] -= err[:, :, None] * upper[:, None, i1 + i, i1 + i:i2]
            errors[:, :, i] = err
        W[:, :, i2:] -= errors @ upper[:, i1:i2, i2:]
    return q_all.reshape(w.shape).to(w.dtype)
