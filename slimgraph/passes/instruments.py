"""Instruments: hooks the PassManager calls before and after each pass, and after a failure."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from typing import TextIO

import torch

from slimgraph.errors import NumericalError
from slimgraph.ir import Graph, graph_stats, opaque_ops, print_graph, run
from slimgraph.passes.base import Pass
from slimgraph.passes.trace import PassRecord


class Instrument:
    def before_pass(self, pass_: Pass, graph: Graph, record: PassRecord) -> None:
        pass

    def after_pass(self, pass_: Pass, graph: Graph, record: PassRecord) -> None:
        pass

    def on_failure(self, pass_: Pass, graph: Graph, record: PassRecord, error: BaseException) -> None:
        pass


class TraceInstrument(Instrument):
    """Snapshot the printed IR and stats around every pass; record the unified diff."""

    def __init__(self, context_lines: int = 1) -> None:
        self.context_lines = context_lines
        self._cache: tuple[int, int, str, dict] | None = None  # (graph id, version, text, stats)

    def _snapshot(self, graph: Graph) -> tuple[str, dict]:
        if self._cache and self._cache[:2] == (id(graph), graph.version):
            return self._cache[2], self._cache[3]
        text, stats = print_graph(graph), graph_stats(graph)
        self._cache = (id(graph), graph.version, text, stats)
        return text, stats

    def before_pass(self, pass_, graph, record):
        self._before, record.stats_before = self._snapshot(graph)

    def after_pass(self, pass_, graph, record):
        after, record.stats_after = self._snapshot(graph)
        record.opaque_ops = opaque_ops(graph) if record.stats_after.get("opaque") else {}
        if after != self._before:
            record.diff = "\n".join(difflib.unified_diff(
                self._before.splitlines(), after.splitlines(),
                f"before {record.pipeline_item}", f"after {record.pipeline_item}",
                n=self.context_lines, lineterm=""))

    def on_failure(self, pass_, graph, record, error):
        record.error = f"{type(error).__name__}: {error}"


class NumericalCheck(Instrument):
    """Run the graph on sample inputs before and after each pass and record the error.

    Exact passes must keep every output within ``rtol`` (relative to the output's magnitude)
    or the pipeline stops with a NumericalError; lossy passes only report their error.
    """

    def __init__(self, inputs: Sequence[torch.Tensor], rtol: float = 1e-4, layer_errors: bool = True) -> None:
        self.inputs = list(inputs)
        self.rtol = rtol
        self.layer_errors = layer_errors
        self._cache: tuple[int, int, list[torch.Tensor]] | None = None

    def _outputs(self, graph: Graph) -> list[torch.Tensor]:
        if self._cache and self._cache[:2] == (id(graph), graph.version):
            return self._cache[2]
        outs = run(graph, self.inputs)
        self._cache = (id(graph), graph.version, outs)
        return outs

    def _capturing(self, graph: Graph) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Outputs, and every node's float outputs by name."""
        values = [v for n in graph.nodes for v in n.outputs if v.dtype is not None and v.dtype.is_float]
        outs, captured = run(graph, self.inputs, capture=values)
        return outs, {v.name: t for v, t in captured.items()}

    def before_pass(self, pass_, graph, record):
        self._values = None
        if pass_.exact or not self.layer_errors:
            self._before = self._outputs(graph)
        else:  # a lossy pass: where in the network its error arises
            self._before, self._values = self._capturing(graph)

    def after_pass(self, pass_, graph, record):
        if not record.changed and self._cache and self._cache[:2] == (id(graph), graph.version):
            record.max_abs_error = record.max_rel_error = 0.0
            return
        if self._values is not None:
            after, values = self._capturing(graph)
            record.layer_errors = _layer_errors(self._values, values)
            self._values = None
        else:
            after = self._outputs(graph)
        abs_err, rel_err = 0.0, 0.0
        for i, (b, a) in enumerate(zip(self._before, after)):
            if b.shape != a.shape:
                raise NumericalError(
                    f"pass {record.name}: output {i} changed shape {tuple(b.shape)} -> {tuple(a.shape)}")
            if not b.is_floating_point():
                err = float((b != a).sum())
                abs_err, rel_err = max(abs_err, err), max(rel_err, err)
                continue
            diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            scale = float(b.double().abs().max()) if b.numel() else 0.0
            abs_err = max(abs_err, diff)
            rel_err = max(rel_err, diff / scale if scale > 0 else diff)
        record.max_abs_error, record.max_rel_error = abs_err, rel_err
        if pass_.exact and not rel_err <= self.rtol:
            raise NumericalError(
                f"pass {record.name} is exact but changed the outputs by {rel_err:.3g} relative "
                f"({abs_err:.3g} absolute), above {self.rtol:g}"
            )


def relative_error(after: torch.Tensor, before: torch.Tensor) -> float:
    """max |after - before| / max |before| (the absolute error where ``before`` is all zeros)."""
    diff = float((after.double() - before.double()).abs().max()) if before.numel() else 0.0
    scale = float(before.double().abs().max()) if before.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _layer_errors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of every value named the same, of the same shape, in both runs; worst first."""
    errors = {name: relative_error(after[name], b) for name, b in before.items()
              if name in after and after[name].shape == b.shape}
    return dict(sorted(errors.items(), key=lambda kv: -kv[1]))


class PrintAfterChange(Instrument):
    """Print each changing pass's diff (like MLIR's -print-ir-after-change)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def after_pass(self, pass_, graph, record):
        if record.changed:
            stream = self.stream or sys.stdout
            print(f"// ----- after {record.pipeline_item} -----", file=stream)
            print(record.diff or print_graph(graph), file=stream)
