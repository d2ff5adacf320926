"""Which integer instruction set a CPU gives onnxruntime's int8 kernels, and what that means for
the weights ``quantize`` writes.

onnxruntime's x86 u8s8 kernels (QLinearConv, QGemm, MatMulInteger...) multiply uint8 activations
by int8 weights with VPMADDUBSW where the CPU has no VNNI: it adds each pair of products into an
int16 and saturates, so 255 * 127 * 2 = 64770 comes out as 32767. onnxruntime documents this and
advises 7-bit weights (its ``reduce_range``) or uint8 weights there: with weights in [-64, 64] a
pair is at most 255 * 64 * 2 = 32640, which fits. VNNI (AVX512-VNNI, AVX-VNNI: VPDPBUSD adds into
int32) and ARM's dot products sum exactly.

The answers, from the most to the least capable:
  vnni    AVX512-VNNI or AVX-VNNI                            exact int32 sums
  avx512  AVX512BW without VNNI                              pairs saturate to int16
  avx2    AVX2 (and any older x86, taken on the safe side)   pairs saturate to int16
  arm     ARM64 (NEON dot products, or widening multiplies)  exact int32 sums
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

ISAS = ("vnni", "avx512", "avx2", "arm")
ENV = "SLIMGRAPH_CPU"  # makes ``auto`` answer as another CPU would (tests, or building for another machine)


def integer_isa() -> str:
    """The integer instruction set of this CPU, one of ``ISAS``; ``$SLIMGRAPH_CPU`` overrides it.

    Linux's /proc/cpuinfo flags first (they name AVX-VNNI, which numpy does not), else numpy's
    own CPU feature table (Windows, macOS)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in ISAS:
            from slimgraph.errors import SlimgraphError

            raise SlimgraphError(f"environment variable {ENV}={forced!r} is not one of {', '.join(ISAS)}")
        return forced
    machine = platform.machine().lower()
    if machine.startswith(("arm", "aarch64")):
        return "arm"
    flags = _cpuinfo_flags()
    if flags is None:
        flags = _numpy_flags()
    if {"avx512_vnni", "avx_vnni", "avx512vnni"} & flags:
        return "vnni"
    if "avx512bw" in flags:
        return "avx512"
    return "avx2"


def saturates_pairs(isa: str) -> bool:
    """Whether u8s8 kernels on ``isa`` add pairs of products into a saturating int16."""
    return isa in ("avx2", "avx512")


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def _numpy_flags() -> set[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return {name.lower() for name, present in __cpu_features__.items() if present}
