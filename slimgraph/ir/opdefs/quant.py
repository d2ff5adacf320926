"""Quantization ops, with ONNX QuantizeLinear / DequantizeLinear semantics.

A quantized tensor is a plain int8/uint8 (or int32, for biases) value; its ``scale`` (float)
and ``zero_point`` travel as separate inputs, per tensor (0-d) or per axis (1-D along the
``axis`` attribute, absent for per-tensor). The integer type is the zero point's dtype.

  quantize_linear(x, scale, zero_point)    q = saturate(round_half_even(x / scale) + zero_point)
  dequantize_linear(q, scale[, zero_point]) x = (q - zero_point) * scale
  fake_quant(x, scale, zero_point)          dequantize_linear(quantize_linear(x)) in one float op,
                                            the form quantization-aware training differentiates;
                                            attrs qmin/qmax narrow its saturation range (7-bit
                                            weights, for CPUs whose int8 kernels saturate)
"""

from __future__ import annotations

import torch

from slimgraph.ir.coupling import Coupling, frozen, inp, out, same
from slimgraph.ir.dtypes import DType
from slimgraph.ir.ops import register_op

# the saturation range of each integer type a quantized tensor may have
QRANGE: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int32: (-(2**31), 2**31 - 1),
}


def along(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A per-axis parameter reshaped to broadcast against ``x`` (a per-tensor one as it is)."""
    if axis is None or param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def qrange(dtype: torch.dtype, attrs: dict) -> tuple[int, int]:
    """The saturation range: the integer type's, or the narrower one fake_quant's qmin/qmax give."""
    lo, hi = QRANGE[dtype]
    return attrs.get("qmin", lo), attrs.get("qmax", hi)


def quantize_ref(xs, a) -> torch.Tensor:
    x, scale, zero_point = xs[0], xs[1], xs[2] if len(xs) > 2 else None
    dtype = zero_point.dtype if zero_point is not None else torch.uint8
    lo, hi = qrange(dtype, a)
    axis = a.get("axis")
    q = torch.round(x.float() / along(scale, x, axis))  # torch.round rounds half to even, as ONNX does
    if zero_point is not None:
        q = q + along(zero_point, x, axis).float()
    return q.clamp(lo, hi).to(dtype)


def dequantize_ref(xs, a) -> torch.Tensor:
    q, scale, zero_point = xs[0], xs[1], xs[2] if len(xs) > 2 else None
    axis = a.get("axis")
    x = q.float()
    if zero_point is not None:
        x = x - along(zero_point, q, axis).float()
    return x * along(scale, q, axis)


def fake_quant_ref(xs, a) -> torch.Tensor:
    x = xs[0]
    return dequantize_ref([quantize_ref(xs, a), *xs[1:]], a).to(x.dtype)


def _check_params(node) -> None:
    """Scale and zero point are 0-d (per tensor) or 1-D with one entry per ``axis`` channel."""
    x, params = node.inputs[0], [v for v in node.inputs[1:] if v is not None]
    axis = node.attrs.get("axis")
    if axis is not None and not 0 <= axis < x.rank:
        raise ValueError(f"axis {axis} is out of range for rank {x.rank}")
    want = () if axis is None else (x.shape[axis],)
    for v in params:
        if tuple(v.shape) != want:
            raise ValueError(f"%{v.name} has shape {v.shape}; {'per-tensor' if axis is None else 'per-axis'} "
                             f"parameters need shape {want}")
    if not node.inputs[1].dtype.is_float:
        raise ValueError(f"scale %{node.inputs[1].name} is {node.inputs[1].dtype.short}, not a float")


def quantize_infer(node) -> list:
    _check_params(node)
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = zp.dtype if zp is not None else DType.uint8
    if dtype.torch not in (torch.uint8, torch.int8):
        raise ValueError(f"zero point dtype {dtype.short}: quantize_linear makes int8 or uint8")
    return [(tuple(node.inputs[0].shape), dtype)]


def dequantize_infer(node) -> list:
    _check_params(node)
    if node.inputs[0].dtype.torch not in QRANGE:
        raise ValueError(f"input dtype {node.inputs[0].dtype.short} is not int8, uint8 or int32")
    return [(tuple(node.inputs[0].shape), DType.float32)]


def fake_quant_infer(node) -> list:
    quantize_infer(node)
    lo, hi = QRANGE[node.inputs[2].dtype.torch]
    qmin, qmax = qrange(node.inputs[2].dtype.torch, node.attrs)
    if not all(isinstance(q, int) and not isinstance(q, bool) for q in (qmin, qmax)) or not lo <= qmin < qmax <= hi:
        raise ValueError(f"qmin {qmin!r} and qmax {qmax!r} must be integers with {lo} <= qmin < qmax <= {hi}")
    return [(tuple(node.inputs[0].shape), node.inputs[0].dtype)]


def quant_coupling(node) -> list[Coupling]:
    """Element-wise in x; per-axis parameters follow their axis (pruning must slice them too)."""
    axis = node.attrs.get("axis")
    params = [inp(i, 0) for i, v in enumerate(node.inputs) if i > 0 and v is not None]
    return [same(inp(0, a), out(0, a), *(params if a == axis else [])) for a in range(node.inputs[0].rank)]


register_op("quantize_linear", quantize_ref, num_inputs=(2, 3), coupling=quant_coupling, infer=quantize_infer,
            description="float -> int8/uint8: saturate(round(x / scale) + zero_point); attr axis for per-channel")
register_op("dequantize_linear", dequantize_ref, num_inputs=(2, 3), coupling=quant_coupling,
            infer=dequantize_infer,
            description="int8/uint8/int32 -> float: (q - zero_point) * scale; attr axis for per-channel")
register_op("fake_quant", fake_quant_ref, num_inputs=(3, 3), coupling=quant_coupling, infer=fake_quant_infer,
            description="dequantize_linear(quantize_linear(x)): quantization simulated in float (QAT)")


# ---------------------------------------------------------------------------- dynamic activations
def dynamic_quantize_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: uint8 with the range of this very tensor (0 included):
    scale = (max - min) / 255, zero point = round(-min / scale), saturated."""
    lo = torch.clamp(x.min(), max=0.0).float()
    hi = torch.clamp(x.max(), min=0.0).float()
    scale = (hi - lo) / 255.0
    step = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero x: every level 0
    zero_point = torch.round(-lo / step).clamp(0, 255)
    q = (torch.round(x.float() / step) + zero_point).clamp(0, 255).to(torch.uint8)
    return q, scale, zero_point.to(torch.uint8)


def dynamic_quant_matmul_ref(xs, a) -> torch.Tensor:
    """x quantized per tensor at run time, times int8 weights [K, N] with a scale per column; the
    integer products summed exactly (float64 holds them), then scaled, as the int32 kernels do."""
    x, w, w_scale = xs[:3]
    bias = xs[3] if len(xs) > 3 else None
    q, scale, zero_point = dynamic_quantize_ref(x)
    acc = (q.double() - zero_point.double()) @ w.double()
    y = (acc * (scale.double() * w_scale.double())).to(x.dtype)
    return y if bias is None else y + bias


def dynamic_quant_matmul_infer(node) -> list:
    x, w, w_scale = node.inputs[:3]
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    if (w.rank != 2 or w.dtype.torch != torch.int8 or x.shape[-1] != w.shape[0]
            or tuple(w_scale.shape) not in ((), (w.shape[1],)) or (bias is not None and bias.shape != (w.shape[1],))):
        raise ValueError(f"dynamic_quant_matmul: x {x.shape}, int8 weight [K, N] {w.shape} {w.dtype.short}, "
                         f"scale {w_scale.shape} and bias {None if bias is None else bias.shape} do not fit")
    return [((*x.shape[:-1], w.shape[1]), x.dtype)]


def dynamic_quant_matmul_coupling(node) -> list[Coupling]:
    x, w = node.inputs[:2]
    couplings = [same(inp(0, a), out(0, a)) for a in range(x.rank - 1)]
    columns = [inp(1, 1), out(0, x.rank - 1)] + [inp(i, 0) for i in range(2, len(node.inputs))
                                                   if node.inputs[i].rank == 1]
    return couplings + [same(inp(0, x.rank - 1), inp(1, 0)), same(*columns)]


register_op("dynamic_quant_matmul", dynamic_quant_matmul_ref, num_inputs=(3, 4),
            coupling=dynamic_quant_matmul_coupling, infer=dynamic_quant_matmul_infer,
            description="x @ dequantized int8 weights [K, N] (+ bias) with x quantized to uint8 per tensor at run "
                        "time (onnxruntime's DynamicQuantizeMatMul); inputs x, w (int8), w_scale (per column), bias")


# ---------------------------------------------------------------------------- weight-only (block-wise)
# matmul_nbits(x, w, scales, zero_points[, bias]) {bits, block_size, K, N}: y = x @ dequant(w)ᵀ + bias, the
# weights quantized block-wise along the input dim K and kept as onnxruntime's MatMulNBits holds them:
#   w            uint8 [N, blocks, block_size * bits / 8], blocks = ceil(K / block_size); 4-bit values two a
#                byte, the lower K index in the low nibble; K padded with zeros to blocks x block_size
#   scales       float [N, blocks]
#   zero_points  uint8 [N, ceil(blocks * bits / 8)], packed as w
# dequant(w)[n, k] = (q[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size].
def unpack_nbits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes [..., B] -> their ``8 // bits`` values each, low bits first: [..., B * 8 // bits]."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def pack_nbits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of unpack_nbits: values in [0, 2**bits) along the last dim (a multiple of 8 // bits)."""
    if bits == 8:
        return values.to(torch.uint8)
    per = 8 // bits
    v = values.to(torch.uint8).reshape(*values.shape[:-1], -1, per)
    out = torch.zeros(v.shape[:-1], dtype=torch.uint8, device=values.device)
    for i in range(per):
        out |= v[..., i] << (i * bits)
    return out


def dequantize_nbits(w: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int, block_size: int,
                     k: int) -> torch.Tensor:
    """The float weight [N, K] a matmul_nbits holds."""
    n, blocks = scales.shape
    q = unpack_nbits(w, bits).reshape(n, blocks, block_size).float()
    zp = unpack_nbits(zero_points, bits)[:, :blocks].float()
    return ((q - zp[..., None]) * scales.float()[..., None]).reshape(n, blocks * block_size)[:, :k]


def matmul_nbits_ref(xs, a) -> torch.Tensor:
    x, w, scales, zero_points = xs[:4]
    bias = xs[4] if len(xs) > 4 else None
    weight = dequantize_nbits(w, scales, zero_points, a["bits"], a["block_size"], a["K"]).to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def matmul_nbits_infer(node) -> list:
    x, w, scales, zero_points = node.inputs[:4]
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    bits, block, k, n = (node.attrs.get(key) for key in ("bits", "block_size", "K", "N"))
    if bits not in (4, 8) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"matmul_nbits: bits {bits!r} must be 4 or 8 and block_size {block!r} a power of 2 >= 16")
    blocks = -(-k // block)
    want = {"w": ((n, blocks, block * bits // 8), DType.uint8), "scales": ((n, blocks), None),
            "zero_points": ((n, -(-blocks * bits // 8)), DType.uint8)}
    for name, v in (("w", w), ("scales", scales), ("zero_points", zero_points)):
        shape, dtype = want[name]
        if tuple(v.shape) != shape or (dtype is not None and v.dtype != dtype):
            raise ValueError(f"matmul_nbits: {name} %{v.name} is {v.dtype.short}{list(v.shape)}; K={k}, N={n}, "
                             f"bits={bits}, block_size={block} need {list(shape)}")
    if not scales.dtype.is_float or x.shape[-1] != k or (bias is not None and tuple(bias.shape) != (n,)):
        raise ValueError(f"matmul_nbits: x {x.shape}, scales {scales.dtype.short} and bias "
                         f"{None if bias is None else bias.shape} do not fit K={k}, N={n}")
    return [((*x.shape[:-1], n), x.dtype)]


def matmul_nbits_coupling(node) -> list[Coupling]:
    """Leading dims pass through; K and N are frozen (pruning would have to repack the blocks)."""
    x = node.inputs[0]
    weights = [inp(i, a) for i in range(1, len(node.inputs)) for a in range(node.inputs[i].rank)]
    return [same(inp(0, a), out(0, a)) for a in range(x.rank - 1)] + [
        frozen(inp(0, x.rank - 1), out(0, x.rank - 1), *weights)]


register_op("matmul_nbits", matmul_nbits_ref, num_inputs=(4, 5), coupling=matmul_nbits_coupling,
            infer=matmul_nbits_infer, macs=lambda node: node.outputs[0].numel * node.attrs["K"],
            description="x @ Wᵀ (+ bias), W quantized block-wise along K to 4 or 8 bits (onnxruntime's "
                        "MatMulNBits layout); inputs x, w (uint8 packed [N, blocks, bytes]), scales [N, blocks], "
                        "zero_points (uint8 packed [N, bytes]), bias; attrs bits, block_size, K, N")
