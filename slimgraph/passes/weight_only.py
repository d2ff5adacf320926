"""Weight-only quantization (``quantize{weights=int4|int8,group_size=...,activations=none}``): the
weights of linears, and of matmuls with a constant [K, N] weight, become integers block-wise along
their input dim K, one scale and zero point per ``group_size`` inputs of each output; activations
stay float. Each such layer becomes one ``matmul_nbits`` node holding onnxruntime's MatMulNBits
layout (see ir/opdefs/quant.py): the backends emit it as MatMulNBits (ONNX) and as a packed-uint8
buffer unpacked at run time (PyTorch).

The grid is asymmetric, unsigned, as onnxruntime's own quantizer writes it (MLAS's block-wise
quantizer): a block's range is stretched to hold 0, scale = (max - min) / (2**bits - 1), zero point
round(-min / scale). Rounding is GPTQ on the calibration data (gptq.py, per group) where given, or
to nearest (``rounding=nearest``, or no calibration_data); ``rounding=awq`` searches AWQ's
per-input-channel scales on the calibration data first (see ``awq``), then rounds to nearest. On
MiniLM (bench/weight_only.py) GPTQ keeps the embeddings closest, AWQ is between it and nearest.
A K that is not a multiple of
``group_size`` is padded with zeros to whole blocks, as MatMulNBits expects.
"""

from __future__ import annotations

import fnmatch

import torch

from slimgraph.errors import PassError
from slimgraph.ir import Graph, Node, run
from slimgraph.ir.opdefs.quant import dequantize_nbits, pack_nbits
from slimgraph.passes import gptq
from slimgraph.passes.base import PassContext, PassResult
from slimgraph.passes.calibration import check_batches

BITS = {"int4": 4, "int8": 8}
GROUP_SIZE = 128  # the default, as onnxruntime's quantizer and NNCF's
# GPTQ's damping (of the Hessian's mean diagonal) for weight-only grids. 4-bit steps are coarse, and
# GPTQ's compensation fits the calibration data hard: at gptq.DAMPING (0.01) MiniLM's worst sentence
# got worse than with nearest rounding. Mean-pooled embeddings of 64 real sentences, calibrated on 16
# others, min / mean cosine to fp32 (int4, blocks of 32 | 128): nearest 0.963 / 0.972 | 0.919 / 0.956;
# damping 0.01 0.956 / 0.981 | 0.936 / 0.967; 0.1 0.966 / 0.985 | 0.960 / 0.975; 0.3 0.974 / 0.985 |
# 0.959 / 0.975; 1.0 0.977 / 0.984 | 0.961 / 0.974.
DAMPING = 0.3


def check_options(weights: str | None, group_size: int | None, activations: str, rounding: str) -> None:
    """A PassError naming the option and why, for any weight-only setting that cannot work."""
    if weights is None:
        if activations == "none":
            raise PassError("pass 'quantize' option 'activations': none (weight-only) needs weights=int8 or "
                            "weights=int4")
        if rounding == "awq":
            raise PassError("pass 'quantize' option 'rounding': awq scales weights for weight-only quantization "
                            "(weights=int8|int4, activations=none)")
        if group_size is not None:
            raise PassError(f"pass 'quantize' option 'group_size': {group_size!r} is for weight-only quantization "
                            "(weights=int8|int4, activations=none); int8 activations come with per-channel weights")
        return
    group_size = GROUP_SIZE if group_size is None else group_size
    if weights not in BITS:
        raise PassError(f"pass 'quantize' option 'weights': {weights!r} is not one of int8, int4 (block-wise "
                        "weights are 4 or 8 bits: what onnxruntime's MatMulNBits runs)")
    if activations != "none":
        raise PassError(f"pass 'quantize' option 'weights': weights={weights} is weight-only quantization and "
                        f"needs activations=none (got activations={activations}); int8 activations come with the "
                        "default per-channel int8 weights (leave weights unset)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 \
            or group_size & (group_size - 1):
        raise PassError(f"pass 'quantize' option 'group_size': {group_size!r} must be a power of 2 >= 16 "
                        "(MatMulNBits' block_size)")


def _layers(graph: Graph, skip: tuple[str, ...]) -> list[Node]:
    def float_const(v) -> bool:
        return v.is_constant and v.rank == 2 and v.const_value.is_floating_point()

    found = []
    for node in graph.nodes:
        if node.op not in ("linear", "matmul") or any(node.op == p or fnmatch.fnmatchcase(node.name, p)
                                                      for p in skip):
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x.is_constant or x.dtype is None or not x.dtype.is_float or x.rank < 1 or not float_const(w):
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None and not node.inputs[2].is_constant:
            continue
        found.append(node)
    return found


def grid(columns: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per row of ``columns`` [N, group]: its range stretched to hold 0, over
    [0, qmax] (a group of zeros gets scale 1, zero point 0: every value dequantizes to 0)."""
    lo = columns.amin(1).clamp(max=0.0)
    hi = columns.amax(1).clamp(min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def round_to_nearest(w: torch.Tensor, bits: int, group_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (integers [N, K], scales [N, groups], zero points [N, groups])."""
    n, k = w.shape
    qmax = 2**bits - 1
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w.float(), (0, groups * group_size - k)).reshape(n, groups, group_size)
    scale, zero = grid(padded.transpose(0, 1).reshape(groups * n, group_size), qmax)  # zeros pad: range has 0
    scale, zero = scale.reshape(groups, n).t(), zero.reshape(groups, n).t()
    ints = torch.clamp(torch.round(padded / scale[..., None]) + zero[..., None], 0, qmax)
    return ints.reshape(n, -1)[:, :k].int(), scale, zero


def pack(ints: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MatMulNBits' tensors: uint8 [N, blocks, block_size * bits / 8], float32 [N, blocks] and
    uint8 [N, ceil(blocks * bits / 8)]."""
    n, k = ints.shape
    blocks = scales.shape[1]
    padded = torch.nn.functional.pad(ints, (0, blocks * group_size - k))  # padding dequantizes to anything: x is 0
    w = pack_nbits(padded.reshape(n, blocks, group_size), bits)
    per = 8 // bits
    zp = torch.nn.functional.pad(zeros.to(torch.uint8), (0, -blocks % per))
    return w.contiguous(), scales.float().contiguous(), pack_nbits(zp, bits).contiguous()


AWQ_ALPHAS = [i / 20 for i in range(1, 21)]  # the exponents searched (AWQ's grid); 0, no scaling, always a candidate
AWQ_ROWS = 1024  # calibration rows kept per input tensor for the search


def awq(graph: Graph, layers: list[Node], batches: list, bits: int, group_size: int) -> dict:
    """AWQ (Lin et al. 2024): per input tensor x of linears, scale input channel j by
    s_j = mean|x_j|^alpha (normalized), W diag(s) quantized, x / s folded into x's producer where
    only these linears read x (else one ``mul``, as ``smooth`` does); alpha is searched per tensor,
    the one whose quantized outputs on the calibration rows err least (0: not scaled)."""
    from slimgraph.passes.smooth import _smooth, _smoothable  # smooth imports quantize, which imports us

    groups: dict[int, list[Node]] = {}
    for node in layers:
        if _smoothable(node):
            groups.setdefault(id(node.inputs[0]), []).append(node)
    inputs = [readers[0].inputs[0] for readers in groups.values()]
    rows: dict[int, list[torch.Tensor]] = {id(x): [] for x in inputs}
    for batch in batches:
        _, captured = run(graph, list(batch), capture=inputs)
        for x in inputs:
            r = captured[x].detach().float().reshape(-1, x.shape[-1])
            keep = -(-AWQ_ROWS // len(batches))
            rows[id(x)].append(r[torch.linspace(0, len(r) - 1, min(keep, len(r))).round().long()])
    stats: dict = {"smoothed": 0, "folded": {}, "mul": [], "alpha": {}}
    for x in inputs:
        readers, xs = groups[id(x)], torch.cat(rows[id(x)])
        weights = [r.inputs[1].const_value.float() for r in readers]
        want = [xs @ w.t() for w in weights]
        mean = xs.abs().mean(0)

        def error(s: torch.Tensor) -> float:
            total = 0.0
            for w, y in zip(weights, want):
                q = dequantize_nbits(*pack(*round_to_nearest(w * s, bits, group_size), bits, group_size), bits,
                                     group_size, w.shape[1])
                total += float(((xs / s) @ q.t() - y).pow(2).sum())
            return total

        best, best_alpha, best_s = error(torch.ones_like(mean)), 0.0, None
        for alpha in AWQ_ALPHAS:
            s = mean.pow(alpha).clamp_min(1e-4)
            s = s / (s.max() * s.min()).sqrt()
            e = error(s)
            if e < best:
                best, best_alpha, best_s = e, alpha, s
        stats["alpha"][x.name] = best_alpha
        if best_s is not None:
            _smooth(graph, x, readers, best_s.double(), stats)
            stats["smoothed"] += 1
    return stats


def run_weight_only(graph: Graph, ctx: PassContext, weights: str, group_size: int, rounding: str,
                    skip: tuple[str, ...]) -> PassResult:
    bits = BITS[weights]
    layers = _layers(graph, skip)
    batches = None
    if rounding in ("gptq", "awq") and ctx.calibration_data is not None:
        batches = check_batches(graph, ctx.calibration_data, "pass 'quantize'")
    awq_stats = None
    if rounding == "awq" and batches:
        awq_stats = awq(graph, layers, batches, bits, group_size)
        layers = _layers(graph, skip)  # the same layers, some reading x / s now
    hessians = gptq.input_hessians(graph, layers, batches) if batches and rounding == "gptq" else {}
    done: dict[tuple, tuple] = {}  # (id(weight), linear?) -> packed constants: a weight shared by layers packs once
    gptq_layers, float_bytes, packed_bytes = 0, 0, 0
    for node in layers:
        w = node.inputs[1]
        key = (id(w), node.op == "linear")  # a linear reads it as [N, K], a matmul as [K, N]
        if key not in done:
            weight = w.const_value.detach().float()
            weight = weight if node.op == "linear" else weight.t()  # [N, K]
            rounded = None
            if id(node) in hessians and len(w.uses) == 1:
                rounded = gptq.round_weight_groups(weight, *hessians[id(node)], group_size,
                                                   lambda cols: grid(cols, 2**bits - 1), 2**bits - 1, DAMPING)
                gptq_layers += rounded is not None
            ints, scales, zeros = rounded if rounded is not None else round_to_nearest(weight, bits, group_size)
            tensors = pack(ints, scales, zeros, bits, group_size)
            names = ("q4" if bits == 4 else "q8", "scales", "zero_points")
            done[key] = tuple(graph.add_constant(f"{w.name}_{suffix}", t) for suffix, t in zip(names, tensors))
            float_bytes += w.const_value.numel() * w.const_value.element_size()
            packed_bytes += sum(t.numel() * t.element_size() for t in tensors)
        n, k = (w.shape[0], w.shape[1]) if node.op == "linear" else (w.shape[1], w.shape[0])
        bias = node.inputs[2:3] if len(node.inputs) > 2 and node.inputs[2] is not None else []
        new = graph.create_node("matmul_nbits", [node.inputs[0], *done[key], *bias],
                                {"bits": bits, "block_size": group_size, "K": k, "N": n},
                                name=node.name, before=node, meta={**node.meta, "origin": "quantize"})
        graph.replace_all_uses_with(node.outputs[0], new.outputs[0])
        graph.remove_node(node)
        graph.take_name(new, node)  # diffs show the layer changed op, not name
        if not w.uses and graph.constants.get(w.name) is w and all(o is not w for o in graph.outputs):
            graph.remove_constant(w)
    kept = [n.name for n in graph.nodes if n.op in ("linear", "matmul", "conv") and n.inputs[1].is_constant]
    extra = {"awq_alpha": awq_stats["alpha"], "awq_mul": awq_stats["mul"]} if awq_stats else {}
    how = f"GPTQ on {gptq_layers} of {len(layers)} layers" if hessians else \
        f"AWQ scales on {awq_stats['smoothed']} inputs ({len(awq_stats['mul'])} by a mul), then nearest" \
        if awq_stats else "nearest" + (f" ({rounding} needs calibration_data)" if rounding != "nearest" else "")
    return PassResult(bool(layers), {
        "quantized_ops": len(layers), "float_layers": len(kept), "weight_bits": bits, "group_size": group_size,
        "activations": "float", "gptq_layers": gptq_layers, "weight_bytes_float": float_bytes,
        "weight_bytes_packed": packed_bytes, **extra,
        "notes": [f"{bits}-bit weights, asymmetric, blocks of {group_size} inputs (MatMulNBits)",
                  f"rounding: {how}"] + ([f"kept float: {', '.join(kept)}"] if kept else [])})
