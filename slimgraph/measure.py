"""Measured latency of the graph after each pass: ``optimize(..., measure="onnxruntime")``.

The graph is copied after every pass that changed it; once the pipeline is done, each copy (and
the input graph) is built for the runtime and timed in interleaved rounds, one thread by default,
so machine noise falls on every copy alike; the median of the rounds is the latency. The time
this costs is kept apart from the passes' own (``Trace.measure_seconds``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from slimgraph.errors import SlimgraphError
from slimgraph.ir import Graph
from slimgraph.passes import Instrument, Pass, PassRecord, Trace

RUNTIMES = ("onnxruntime", "torch")


class Snapshots(Instrument):
    """A copy of the graph before the pipeline and after each pass that changed it."""

    def __init__(self) -> None:
        self.before: Graph | None = None
        self.after: list[tuple[PassRecord, Graph | None]] = []  # None: unchanged, the previous graph

    def before_pass(self, pass_: Pass, graph: Graph, record: PassRecord) -> None:
        if self.before is None:
            self.before = graph.clone()

    def after_pass(self, pass_: Pass, graph: Graph, record: PassRecord) -> None:
        self.after.append((record, graph.clone() if record.changed else None))

    def graphs(self) -> list[Graph]:
        """The graph before the first pass, then after each pass."""
        out = [self.before]
        for _, graph in self.after:
            out.append(graph if graph is not None else out[-1])
        return out


def _runner(graph: Graph, runtime: str, inputs: Sequence[torch.Tensor], threads: int) -> Callable[[], object]:
    if runtime == "onnxruntime":
        import onnxruntime as ort

        from slimgraph.backends.onnx import to_onnx

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(to_onnx(graph).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
        return lambda: session.run(None, feeds)
    from slimgraph.backends.pytorch import to_torch

    module = to_torch(graph).eval()

    def forward() -> object:
        with torch.no_grad():
            return module(*inputs)
    return forward


def measure(snapshots: Snapshots, trace: Trace, runtime: str, inputs: Sequence[torch.Tensor],
            rounds: int = 9, threads: int = 1) -> None:
    """Fill ``latency_ms`` of every record (and ``trace.input_latency_ms``) from interleaved runs."""
    if runtime not in RUNTIMES:
        raise SlimgraphError(f"measure={runtime!r} is not one of {', '.join(RUNTIMES)}")
    began = time.perf_counter()
    graphs = [snapshots.before] + [g for _, g in snapshots.after if g is not None]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runners = []
        for graph in graphs:
            try:
                runners.append(_runner(graph, runtime, inputs, threads))
            except Exception as exc:  # a graph this runtime cannot take: no figure for it, said so
                runners.append(exc)
        times: list[list[float]] = [[] for _ in runners]
        for r in range(rounds + 1):  # round 0 warms up
            for i, run in enumerate(runners):
                if isinstance(run, Exception):
                    continue
                start = time.perf_counter()
                run()
                if r:
                    times[i].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    latency = [statistics.median(t) * 1000 if t else None for t in times]
    trace.input_latency_ms = latency[0]
    current, k = latency[0], 0
    for record, graph in snapshots.after:
        if graph is not None:
            k += 1
            current = latency[k]
            if isinstance(runners[k], Exception):
                record.pass_stats["notes"] = [*record.pass_stats.get("notes", ()),
                                              f"not timed on {runtime}: {type(runners[k]).__name__}: {runners[k]}"]
        record.latency_ms = current
    trace.measure_seconds = time.perf_counter() - began
