"""PassManager: run passes in order (optionally to a fixed point), verify, call instruments."""

from __future__ import annotations

import time
from collections.abc import Sequence

from slimgraph.errors import PassError, SlimgraphError, VerificationError
from slimgraph.ir import Graph, verify
from slimgraph.passes.base import Pass, PassContext, PassResult
from slimgraph.passes.instruments import Instrument
from slimgraph.passes.requirements import check_requirements
from slimgraph.passes.trace import PassRecord, Trace


class PassManager:
    def __init__(
        self,
        passes: Sequence[Pass],
        instruments: Sequence[Instrument] = (),
        verify: bool = True,
        fixed_point: bool = False,
        max_iterations: int = 10,
    ) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.verify = verify
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations

    def run(self, graph: Graph, ctx: PassContext | None = None, trace: Trace | None = None) -> Trace:
        ctx = ctx or PassContext()
        trace = trace if trace is not None else Trace()
        passes = [p for item in self.passes for p in item.expand(graph)]
        for iteration in range(self.max_iterations if self.fixed_point else 1):
            any_changed = False
            for pass_ in passes:
                record = self._run_one(pass_, graph, ctx, iteration)
                trace.append(record)
                any_changed |= record.changed
            if not any_changed:
                break
        return trace

    def _run_one(self, pass_: Pass, graph: Graph, ctx: PassContext, iteration: int) -> PassRecord:
        record = PassRecord(name=pass_.name, pipeline_item=str(pass_), iteration=iteration)
        check_requirements(pass_, graph)
        for inst in self.instruments:
            inst.before_pass(pass_, graph, record)
        start = time.perf_counter()
        version = graph.version
        try:
            result = pass_.run(graph, ctx)
            record.seconds = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise PassError(f"pass {pass_.name} returned {type(result).__name__}, not a PassResult")
            record.changed, record.pass_stats = result.changed, dict(result.stats)
            if graph.version != version and not result.changed:
                raise PassError(f"pass {pass_.name} edited the graph but reported changed=False")
            if self.verify:
                try:
                    verify(graph)
                except VerificationError as exc:
                    raise VerificationError(f"after pass {pass_.name}: {exc}") from exc
            for inst in self.instruments:
                inst.after_pass(pass_, graph, record)
        except BaseException as exc:
            record.seconds = record.seconds or time.perf_counter() - start
            for inst in self.instruments:
                inst.on_failure(pass_, graph, record, exc)
            if isinstance(exc, SlimgraphError) or not isinstance(exc, Exception):
                raise
            raise PassError(f"pass {pass_.name} failed: {type(exc).__name__}: {exc}") from exc
        return record
