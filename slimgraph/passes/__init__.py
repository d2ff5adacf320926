"""Passes and the pass manager."""

from slimgraph.passes.base import (
    Pass,
    PassContext,
    PassResult,
    available,
    function_pass,
    get_pass,
    make_pass,
    register_pass,
)
from slimgraph.passes.instruments import Instrument, NumericalCheck, PrintAfterChange, TraceInstrument
from slimgraph.passes.manager import PassManager
from slimgraph.passes.pattern import Any_, P, explain, match
from slimgraph.passes.pipeline import parse_pipeline, to_passes
from slimgraph.passes.trace import PassRecord, Trace

__all__ = [
    "Any_", "Instrument", "NumericalCheck", "P", "Pass", "PassContext", "PassManager", "PassRecord",
    "PassResult", "PrintAfterChange", "Trace", "TraceInstrument", "available", "explain", "function_pass",
    "get_pass", "make_pass", "match", "parse_pipeline", "register_pass", "to_passes",
]
