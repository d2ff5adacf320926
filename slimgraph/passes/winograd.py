"""Winograd minimal filtering for 3x3 stride-1 convolutions (Lavin & Gray 2015, arXiv:1509.09308).

``winograd{tile=2|4|auto}`` rewrites conv(3x3, stride 1, dilation 1, groups 1) as F(m x m, 3x3),
m = 2 or 4, with α = m + 2 points per tile side. The filter transform U = G g Gᵀ is computed once,
here, in float64. Everything else is spelled in IR ops that every backend already emits:

    reshape  [N·C, 1, H, W]                                  every channel an image of its own
    conv     α² kernels Bᵀ⊗Bᵀ (α×α), stride m, pads          tiling + Bᵀ d B   [N·C, α², th, tw]
    reshape  [N, C, α², P] -> permute [α², N, C, P]                           (P = th·tw tiles)
    matmul   U [α², 1, K, C] @ V                               the α² products, as K×C GEMMs
    reshape  [α², N·K·P] -> matmul Aᵀ⊗Aᵀ [m², α²] @ .            output transform Aᵀ M A
    depth-to-space [m, m, N·K·th·tw] -> [N, K, th·m, tw·m] as two 3-D transposes (below)
    slice    crop to the conv's output size (only if tiles overhang); add the bias

This departs from the ONNX form in ANCHORS.md in three places, all measured (bench/winograd.py):
channels folded into the batch and one single-channel conv, instead of a grouped conv
(groups=C), runs the input transform 1.5-3x faster in torch; the output transform is a matmul,
not a grouped 1x1 conv, which saves one reshape/permute pair; and depth-to-space is two
transposes that each move one axis ([i, j, X] -> [i, X, j], then [i, Y, tw·m] -> [Y, i, tw·m]),
because onnxruntime's Transpose runs a general 6-D permutation several times slower than these
(at C=K=64 on 56x56 it took a quarter of the layer's time; torch gains little). N stays
outside K in the GEMM output (U broadcasts over N) so the two transposes are right at any batch.
The bias is added last, on the cropped output. The transform matrices come from a Cook-Toom
construction in exact rational arithmetic (``cook_toom``), so any interpolation points work.

``tile=auto`` rewrites a layer only where the measured cost table (winograd_cost.json, written
by bench/winograd.py) says a tile beats the direct conv on the target backend: ``target`` picks
the table's measurements, onnxruntime (CPU, one thread) by default, or torch. See
``choose_tile`` for the rule.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch

from slimgraph.errors import PassError, UnsupportedError
from slimgraph.ir import DType, Graph, Node, Value, clean_name
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass

Matrix = list[list[Fraction]]

# Interpolation points (∞ is always added). For F(4x4,3x3), 0, ±1, 1/2, -2 (as TVM uses, after
# Barabasz et al. 2018) has about half the fp32 error of 0, ±1, ±2. 0, ±1, ±1/2 does not help:
# x -> 1/x maps {0, ∞, ±1, ±2} onto {∞, 0, ±1, ±1/2}, the same algorithm on a flipped tile, and
# measures the same; a set that mixes 1/2 and -2 is balanced (bench/results/winograd.md).
POINTS: dict[int, tuple[Fraction, ...]] = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(1, 2), Fraction(-2)),
}
COST_TABLE = Path(__file__).with_name("winograd_cost.json")
TARGETS = ("onnxruntime", "torch")  # backends the cost table measures; the first is the default
_FLOAT_TYPES = (DType.float32, DType.float64)


# ============================================================================ transforms
def _poly_from_roots(roots: Sequence[Fraction], length: int) -> list[Fraction]:
    """Coefficients (lowest degree first) of prod(x - root), zero-padded to ``length``."""
    coeffs = [Fraction(1)]
    for root in roots:
        nxt = [Fraction(0)] * (len(coeffs) + 1)
        for i, c in enumerate(coeffs):
            nxt[i + 1] += c
            nxt[i] -= root * c
        coeffs = nxt
    return coeffs + [Fraction(0)] * (length - len(coeffs))


def _integer_scale(coeffs: Sequence[Fraction]) -> Fraction:
    """The positive rational that turns ``coeffs`` into coprime integers."""
    den = math.lcm(*(c.denominator for c in coeffs))
    return Fraction(den, math.gcd(*(int(c * den) for c in coeffs)))


def cook_toom(m: int, r: int, points: Sequence[Fraction | int]) -> tuple[Matrix, Matrix, Matrix]:
    """Aᵀ (m×α), G (α×r), Bᵀ (α×α) of F(m, r) from α - 1 finite points plus ∞, exactly.

    Correlation y = Aᵀ[(G g) ⊙ (Bᵀ d)] is the transpose of the linear convolution computed by
    evaluating both factors at the points, multiplying and interpolating (Toom-Cook): Aᵀ and G
    are Vandermonde matrices (∞ picks the leading coefficient) and Bᵀ is the transposed inverse
    Vandermonde, whose rows are the Lagrange basis polynomials (for ∞: prod(x - p)). Each Bᵀ row
    is scaled by a positive rational to coprime integers and G takes the inverse factor, so the
    fractions stay in the filter transform, done once at compile time. Lavin & Gray's sign
    convention is kept by negating the ∞ row of Bᵀ and the ∞ column of Aᵀ.
    """
    pts = [Fraction(p) for p in points]
    alpha = m + r - 1
    if len(pts) != alpha - 1 or len(set(pts)) != len(pts):
        raise ValueError(f"F({m},{r}) needs {alpha - 1} distinct finite points, got {list(points)}")
    at = [[p**j for p in pts] + [Fraction(-1 if j == m - 1 else 0)] for j in range(m)]
    g: Matrix = []
    bt: Matrix = []
    for i, p in enumerate(pts):
        others = pts[:i] + pts[i + 1:]
        denominator = math.prod((p - q for q in others), start=Fraction(1))
        basis = [c / denominator for c in _poly_from_roots(others, alpha)]
        scale = _integer_scale(basis)
        bt.append([c * scale for c in basis])
        g.append([p**k / scale for k in range(r)])
    top = _poly_from_roots(pts, alpha)
    scale = _integer_scale(top)
    bt.append([-c * scale for c in top])
    g.append([Fraction(1 if k == r - 1 else 0) / scale for k in range(r)])
    return at, g, bt


def transform_tensors(m: int, points: Sequence[Fraction | int] | None = None) -> tuple[torch.Tensor, ...]:
    """Aᵀ, G, Bᵀ of F(m, 3) as float64 tensors (default points: ``POINTS[m]``). Do not mutate."""
    return _transform_tensors(m, tuple(Fraction(p) for p in (POINTS[m] if points is None else points)))


@functools.cache
def _transform_tensors(m: int, points: tuple[Fraction, ...]) -> tuple[torch.Tensor, ...]:
    mats = cook_toom(m, 3, points)
    return tuple(torch.tensor([[float(x) for x in row] for row in mat], dtype=torch.float64) for mat in mats)


# ============================================================================ eligibility
def skip_reason(node: Node) -> str | None:
    """Why a conv node cannot be rewritten, or None if it can."""
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    a = node.attrs
    if w is None or w.shape is None or len(w.shape) != 4:
        return "not a 2-D conv"
    if tuple(w.shape[2:]) != (3, 3):
        return f"kernel {w.shape[2]}x{w.shape[3]}"
    if list(a["stride"]) != [1, 1]:
        return f"stride {a['stride']}"
    if list(a["dilation"]) != [1, 1]:
        return f"dilation {a['dilation']}"
    if a["groups"] != 1:
        depthwise = a["groups"] == w.shape[0] == x.shape[1]
        return "depthwise" if depthwise else f"grouped ({a['groups']} groups)"
    if not w.is_constant or (b is not None and not b.is_constant):
        return "weight or bias is not a constant"
    if w.dtype not in _FLOAT_TYPES or x.dtype not in _FLOAT_TYPES:
        return f"{w.dtype.name if w.dtype else '?'}: Winograd is too inaccurate below fp32"
    if x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return "input shape not static"
    return None


# ============================================================================ rewrite
def _shared_constant(graph: Graph, name: str, tensor: torch.Tensor) -> Value:
    """One constant per distinct transform (same name, same values) across all layers."""
    existing = graph.constants.get(clean_name(name))
    if existing is not None and existing.const_value.dtype == tensor.dtype \
            and existing.const_value.shape == tensor.shape and torch.equal(existing.const_value, tensor):
        return existing
    return graph.add_constant(name, tensor)


def rewrite_conv(graph: Graph, node: Node, m: int, points: Sequence[Fraction | int] | None = None) -> Value:
    """Replace one eligible conv (see ``skip_reason``) by F(m x m, 3x3); returns its new output."""
    reason = skip_reason(node) if node.op == "conv" else f"a {node.op}, not a conv"
    if reason is not None or (points is None and m not in POINTS):
        raise UnsupportedError(f"node {node.name}: no Winograd F({m}x{m},3x3) for it: {reason or 'unknown tile'}")
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = w.const_value.dtype
    n, c, h, wd = x.shape
    k = w.shape[0]
    pt, pl, pb, pr = node.attrs["pads"]
    ho, wo = h + pt + pb - 2, wd + pl + pr - 2
    th, tw = -(-ho // m), -(-wo // m)  # tiles; the last ones may overhang and are cropped
    alpha = m + 2
    a2, p = alpha * alpha, th * tw
    at, g, bt = transform_tensors(m, points)
    tag = f"winograd_f{m}" + ("" if points is None else "_" + "_".join(str(Fraction(q)) for q in points))

    # filter transform, once, in float64: U[ξα+ν, 0, k, c] = (G g Gᵀ)[ξ, ν]
    taps = w.const_value.double().permute(2, 3, 0, 1).reshape(3, -1)  # [a, b, K·C]: U comes out contiguous
    u = (g @ (g @ taps).reshape(alpha, 3, -1)).reshape(a2, 1, k, c)
    u_val = graph.add_constant(f"{node.name}_winograd_u", u.to(dtype), trainable=w.meta.get("trainable", False))
    # input transform as α² kernels of α×α: (Bᵀ d B)[ξ, ν] = Σ Bᵀ[ξ, a] Bᵀ[ν, b] d[a, b]
    bt_kernels = torch.einsum("xa,yb->xyab", bt, bt).reshape(a2, 1, alpha, alpha)
    bt_val = _shared_constant(graph, f"{tag}_input", bt_kernels.to(dtype))
    # output transform (Aᵀ M A)[i, j] = Σ Aᵀ[i, ξ] Aᵀ[j, ν] M[ξ, ν] as one [m², α²] matrix
    at_kron = torch.einsum("ix,jy->ijxy", at, at).reshape(m * m, a2)
    at_val = _shared_constant(graph, f"{tag}_output", at_kron.to(dtype))

    def add(op: str, inputs: list[Value | None], attrs: dict[str, Any], suffix: str) -> Value:
        meta = {"origin": f"pass:winograd:{node.name}"}
        return graph.create_node(op, inputs, attrs, name=f"{node.name}_wg_{suffix}", before=node, meta=meta).output

    pads = [pt, pl, th * m + 2 - h - pt, tw * m + 2 - wd - pl]  # ≥ the conv's own end pads
    v = add("reshape", [x], {"shape": [-1, 1, h, wd]}, "planes")
    v = add("conv", [v, bt_val, None],
            {"stride": [m, m], "pads": pads, "dilation": [1, 1], "groups": 1}, "tiles")
    v = add("reshape", [v], {"shape": [-1, c, a2, p]}, "split")
    v = add("permute", [v], {"perm": [2, 0, 1, 3]}, "to_gemm")  # [α², N, C, P]
    y = add("matmul", [u_val, v], {}, "gemm")  # [α², N, K, P]
    y = add("reshape", [y], {"shape": [a2, -1]}, "flat")
    y = add("matmul", [at_val, y], {}, "output")  # [m·m, N·K·th·tw], rows (i, j)
    # depth-to-space: [i, j, (N K th tw)] -> [i, (N K th tw), j] -> [i, (N K th), (tw j)] -> [(N K th), i, (tw j)]
    y = add("reshape", [y], {"shape": [m, m, -1]}, "unflat")
    y = add("permute", [y], {"perm": [0, 2, 1]}, "cols")
    y = add("reshape", [y], {"shape": [m, -1, tw * m]}, "rows_in")
    y = add("permute", [y], {"perm": [1, 0, 2]}, "rows")
    y = add("reshape", [y], {"shape": [-1, k, th * m, tw * m]}, "image")
    if (th * m, tw * m) != (ho, wo):
        y = add("slice", [y], {"axes": [2, 3], "starts": [0, 0], "ends": [ho, wo], "steps": [1, 1]}, "crop")
    if b is not None:
        bias = graph.add_constant(f"{node.name}_winograd_bias", b.const_value.reshape(k, 1, 1),
                                  trainable=b.meta.get("trainable", False))
        y = add("add", [y, bias], {}, "bias")

    graph.replace_all_uses_with(node.output, y)
    graph.remove_node(node)
    for const in (w, b):
        if const is not None and not const.uses and const not in graph.outputs:
            graph.remove_constant(const)
    return y


# ============================================================================ cost model
@functools.cache
def load_cost_table(path: str = str(COST_TABLE)) -> dict[str, Any]:
    """The measured table bench/winograd.py writes (see its "about" and "rule" fields)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PassError(f"winograd: cannot read the cost table {path}: {exc}") from exc


def choose_tile(c: int, k: int, h: int, w: int, table: dict[str, Any] | None = None,
                target: str = TARGETS[0]) -> tuple[int | None, str]:
    """(tile or None for direct, why) for a 3x3 conv with C inputs, K outputs on an HxW map.

    Rule, on the ``target`` backend's measurements: take the measured point nearest in log2
    space over (C, K, H, W) and use its winner (a tile wins a shape only if it beat the direct
    conv by the table's margin there); if several are equally near and their winners differ,
    keep the direct conv (a wrong Winograd costs more than a missed one). Shapes outside the
    table take the nearest edge.
    """
    table = table if table is not None else load_cost_table()
    if target not in table["backends"]:
        raise PassError(f"winograd: the cost table has no measurements for target {target!r}")
    entries = table["backends"][target]["entries"]
    query = [math.log2(max(v, 1)) for v in (c, k, h, w)]

    def distance(e: dict[str, Any]) -> float:
        return sum((math.log2(e[key]) - q) ** 2 for key, q in zip("CKHW", query))

    best = min(distance(e) for e in entries)
    nearest = [e for e in entries if distance(e) <= best + 1e-9]
    winners = {e["best"] for e in nearest}
    e = nearest[0]
    where = f"{target}, nearest measured C={e['C']} K={e['K']} {e['H']}x{e['W']}"
    if len(winners) > 1:
        return None, f"cost model: tie between measured shapes on {target} ({', '.join(sorted(winners))}), direct"
    winner = winners.pop()
    if winner == "direct":
        return None, f"cost model: direct is fastest ({where})"
    return int(winner[1:]), f"cost model: {winner} ({where}: {e['direct_ms'] / e[winner + '_ms']:.2f}x)"


# ============================================================================ the pass
@register_pass
@dataclass
class Winograd(Pass):
    name = "winograd"
    description = "3x3 stride-1 convs as Winograd F(2x2,3x3) / F(4x4,3x3) where a measured cost model says it pays"
    exact = False  # exact in exact arithmetic; in fp32 the trace reports the error

    tile: Literal[2, 4, "auto"] = "auto"
    target: Literal["onnxruntime", "torch"] = "onnxruntime"  # whose measurements `auto` follows

    def __post_init__(self) -> None:
        if self.tile not in (2, 4, "auto"):
            raise PassError(f"pass 'winograd' option 'tile': {self.tile!r} is not one of 2, 4, auto")
        if self.target not in TARGETS:
            raise PassError(f"pass 'winograd' option 'target': {self.target!r} is not one of {', '.join(TARGETS)}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers: dict[str, str] = {}
        plan: list[tuple[Node, int]] = []
        for node in graph.nodes:
            if node.op != "conv":
                continue
            reason = skip_reason(node)
            if reason is None:
                if self.tile == "auto":
                    x, w = node.inputs[0], node.inputs[1]
                    tile, reason = choose_tile(x.shape[1], w.shape[0], x.shape[2], x.shape[3], target=self.target)
                else:
                    tile = self.tile
                if tile is not None:
                    plan.append((node, tile))
                    layers[node.name] = f"F({tile}x{tile},3x3)" + (f" ({reason})" if reason else "")
                    continue
            layers[node.name] = f"skipped: {reason}"
        for node, tile in plan:  # nothing is edited unless something is rewritten
            rewrite_conv(graph, node, tile)
        stats = {
            "rewritten": len(plan),
            "f2": sum(t == 2 for _, t in plan),
            "f4": sum(t == 4 for _, t in plan),
            "layers": layers,
        }
        return PassResult(bool(plan), stats)
