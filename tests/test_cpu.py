"""slimgraph.cpu: which integer instruction set a CPU gives onnxruntime's int8 kernels."""

from __future__ import annotations

import pytest

from slimgraph import cpu
from slimgraph.errors import SlimgraphError


@pytest.mark.parametrize("flags,expected", [
    ({"sse4_1", "avx2", "avx512f", "avx512bw", "avx512_vnni"}, "vnni"),  # Cascade Lake and later Xeons
    ({"sse4_1", "avx2", "avx_vnni"}, "vnni"),  # Alder Lake: VNNI without AVX512
    ({"sse4_1", "avx2", "avx512f", "avx512bw"}, "avx512"),  # Skylake-X
    ({"sse4_1", "avx2", "fma"}, "avx2"),  # AMD EPYC (Zen 2/3), Haswell
    ({"sse4_1", "ssse3"}, "avx2"),  # older x86: taken on the safe (saturating) side
])
def test_x86_flags_name_the_integer_path(monkeypatch, flags, expected):
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "_cpuinfo_flags", lambda: flags)
    assert cpu.integer_isa() == expected


def test_numpy_features_answer_where_there_is_no_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setattr(cpu.platform, "machine", lambda: "AMD64")
    monkeypatch.setattr(cpu, "_cpuinfo_flags", lambda: None)
    monkeypatch.setattr(cpu, "_numpy_flags", lambda: {"avx2", "avx512f", "avx512bw", "avx512vnni"})
    assert cpu.integer_isa() == "vnni"
    monkeypatch.setattr(cpu, "_numpy_flags", lambda: {"avx2"})
    assert cpu.integer_isa() == "avx2"


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "armv7l"])
def test_arm_is_arm(monkeypatch, machine):
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    assert cpu.integer_isa() == "arm"


def test_this_machines_flags_are_read():
    """On this machine the answer is one of the four, and numpy's table, read the same way, agrees
    wherever the two sources can tell (numpy does not know AVX-VNNI)."""
    flags = cpu._cpuinfo_flags()
    assert cpu.integer_isa() in cpu.ISAS
    if flags is not None and "avx_vnni" not in flags and cpu.platform.machine() == "x86_64":
        assert ("avx512_vnni" in flags) == ("avx512vnni" in cpu._numpy_flags())
        assert ("avx2" in flags) == ("avx2" in cpu._numpy_flags())


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_the_environment_answers_as_another_cpu_would(monkeypatch, isa):
    monkeypatch.setenv(cpu.ENV, isa.upper())
    assert cpu.integer_isa() == isa
    assert cpu.saturates_pairs(isa) == (isa in ("avx2", "avx512"))


def test_a_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "sse")
    with pytest.raises(SlimgraphError, match="SLIMGRAPH_CPU='sse' is not one of vnni, avx512, avx2, arm"):
        cpu.integer_isa()
