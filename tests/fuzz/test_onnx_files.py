"""The ONNX importer on mutated files (onnx_files.py): success with a checked model, or a
SlimgraphError naming the cause with no file written; never another exception or a hang. The
suite draws a fixed, derandomized budget; ``python -m tests.fuzz --files 10000`` runs campaigns."""

from __future__ import annotations

import os
import signal

from hypothesis import HealthCheck, given, settings

from tests.fuzz.onnx_files import Hang, check_file, mutated_files

EXAMPLES = int(os.environ.get("SLIMGRAPH_FUZZ_FILES", "300"))


def _alarm(signum, frame):
    raise Hang("one file took over 60 s")


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_files())
def test_mutated_files_import_or_fail_cleanly(drawn):
    what, data = drawn
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        check_file(data)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
