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


# files the campaigns found a disallowed outcome in, rebuilt by hand: each a SlimgraphError now
def _regression_files() -> dict[str, bytes]:
    import onnx
    from onnx import helper

    def model(initializer):
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [initializer])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    retyped = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0])
    retyped.data_type = onnx.TensorProto.INT32  # the values stay in float_data: int32_data is empty
    external = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0])
    external.ClearField("float_data")
    external.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("length", "16)4")):  # a flipped byte in the length
        external.external_data.add(key=key, value=value)
    empty_raw = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0])
    empty_raw.raw_data = b""  # set but empty: onnx reads it, not float_data
    undefined = onnx.load_from_string(model(helper.make_tensor("w", onnx.TensorProto.FLOAT, [1, 4], [0.0] * 4)))
    undefined.graph.node[0].attribute.append(helper.make_attribute("axis", 1))
    undefined.graph.node[0].attribute[0].type = onnx.AttributeProto.TENSOR  # an empty tensor of element type 0
    return {"values in another dtype's field": model(retyped), "external length not a number": model(external),
            "empty raw_data beside float_data": model(empty_raw),
            "int attribute retyped as a tensor": undefined.SerializeToString()}


def test_files_the_campaigns_found():
    for what, data in _regression_files().items():
        assert check_file(data) == "ImportError_", what
