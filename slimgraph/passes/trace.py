"""The pass-by-pass record of a pipeline run, and its text summary."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload


@dataclass
class PassRecord:
    """What one pass did. Instruments fill in the fields they own."""

    name: str
    pipeline_item: str = ""
    iteration: int = 0
    changed: bool = False
    seconds: float = 0.0
    stats_before: dict[str, int] = field(default_factory=dict)
    stats_after: dict[str, int] = field(default_factory=dict)
    diff: str = ""
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    pass_stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    opaque_ops: dict[str, int] = field(default_factory=dict)  # after the pass: target -> nodes
    # lossy passes: relative error of each value named the same before and after, worst first
    layer_errors: dict[str, float] = field(default_factory=dict)
    latency_ms: float | None = None  # the graph after the pass, timed by optimize(..., measure=...)


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _change(before: float | None, after: float | None) -> str:
    """A latency, and where it came from when it moved by 1% or more."""
    if after is None:
        return "-"
    if before is None or abs(after - before) < 0.01 * before:
        return f"{after:.2f}"
    return f"{before:.2f} -> {after:.2f}"


class Trace(Sequence[PassRecord]):
    def __init__(self, records: list[PassRecord] | None = None) -> None:
        self._records: list[PassRecord] = list(records or [])
        self.input_latency_ms: float | None = None  # the graph before the first pass, when measured
        self.measure_seconds: float = 0.0  # what measuring cost, apart from the passes' own time

    def append(self, record: PassRecord) -> None:
        self._records.append(record)

    @overload
    def __getitem__(self, i: int) -> PassRecord: ...
    @overload
    def __getitem__(self, i: slice) -> list[PassRecord]: ...
    def __getitem__(self, i):  # type: ignore[override]
        return self._records[i]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[PassRecord]:
        return iter(self._records)

    def summary(self) -> str:
        """A text table: one row per pass with params, MACs, nodes, time and error."""
        header = ["pass", "changed", "params", "MACs", "nodes", "time (ms)", "max abs err"]
        measured = any(r.latency_ms is not None for r in self._records)
        if measured:
            header.append("latency (ms)")
        rows = []
        latency = self.input_latency_ms
        for r in self._records:
            b, a = r.stats_before, r.stats_after

            def delta(key: str) -> str:
                if a.get(key) == b.get(key):
                    return _human(a.get(key))
                return f"{_human(b.get(key))} -> {_human(a.get(key))}"

            err = "-" if r.max_abs_error is None else f"{r.max_abs_error:.2e}"
            name = r.pipeline_item or r.name
            if r.iteration:
                name += f" (#{r.iteration + 1})"
            rows.append([name, "yes" if r.changed else "no", delta("params"), delta("macs"), delta("nodes"),
                         f"{r.seconds * 1000:.1f}", err if r.error is None else f"FAILED: {r.error[:40]}"])
            if measured:
                rows[-1].append(_change(latency, r.latency_ms))
                latency = r.latency_ms
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        if measured:
            out.append(f"latency: the graph after each pass, median of interleaved runs; measuring took "
                       f"{self.measure_seconds:.1f} s (not in the passes' time)")
        # decisions a pass explains in words (stats["notes"]), e.g. quantize's weight range and why
        out += [f"{r.pipeline_item or r.name}: {note}" for r in self._records for note in r.pass_stats.get("notes", ())]
        if self._records and self._records[-1].opaque_ops:  # never silent: what passes could not see
            from slimgraph.ir.stats import describe_opaque

            out.append(f"opaque ops (passes skip them and keep the channels they touch): "
                       f"{describe_opaque(self._records[-1].opaque_ops)}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"Trace({len(self)} passes)"
