"""Element types of IR values.

Quantized tensors are plain int8/uint8 values; their scale and zero point travel as separate
IR values feeding quantize/dequantize nodes (the ONNX QDQ model), so nothing here needs to know
about quantization beyond the integer element types.
"""

from __future__ import annotations

import enum

import torch


class DType(enum.Enum):
    float32 = "f32"
    float16 = "f16"
    bfloat16 = "bf16"
    float64 = "f64"
    int64 = "i64"
    int32 = "i32"
    int16 = "i16"
    int8 = "i8"
    uint64 = "u64"
    uint32 = "u32"
    uint16 = "u16"
    uint8 = "u8"
    bool = "bool"

    @property
    def short(self) -> str:
        return self.value

    @property
    def is_float(self) -> bool:
        return self in (DType.float32, DType.float16, DType.bfloat16, DType.float64)

    @property
    def torch(self) -> torch.dtype:
        return _TO_TORCH[self]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch).element_size()

    @staticmethod
    def from_torch(dtype: torch.dtype) -> DType:
        try:
            return _FROM_TORCH[dtype]
        except KeyError:
            from slimgraph.errors import UnsupportedError

            raise UnsupportedError(f"dtype {dtype} is not supported by the IR") from None


_TO_TORCH = {
    DType.float32: torch.float32,
    DType.float16: torch.float16,
    DType.bfloat16: torch.bfloat16,
    DType.float64: torch.float64,
    DType.int64: torch.int64,
    DType.int32: torch.int32,
    DType.int16: torch.int16,
    DType.int8: torch.int8,
    DType.uint64: torch.uint64,
    DType.uint32: torch.uint32,
    DType.uint16: torch.uint16,
    DType.uint8: torch.uint8,
    DType.bool: torch.bool,
}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}
