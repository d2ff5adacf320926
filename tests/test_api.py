import pytest
import torch

import slimgraph
from slimgraph.errors import PassError, SlimgraphError
from slimgraph.passes import PassRecord


def test_optimize_returns_graph_and_a_full_trace(tiny):
    model, inputs = tiny
    result = slimgraph.optimize(model, ["dce", "remove-identity"], example_inputs=inputs)
    assert isinstance(result.graph, slimgraph.Graph)
    assert [r.name for r in result.trace] == ["dce", "remove-identity"]
    record = result.trace[1]
    assert isinstance(record, PassRecord)
    assert record.changed  # the Dropout(p=0) is an identity
    assert record.stats_before["nodes"] == record.stats_after["nodes"] + 1
    assert {"params", "macs", "nodes"} <= set(record.stats_after)
    assert record.stats_after["macs"] > 0 and record.stats_after["params"] > 0
    assert "-  %drop" in record.diff and record.max_abs_error == 0.0 and record.seconds >= 0
    table = result.trace.summary()
    assert "remove-identity" in table and "MACs" in table
    with torch.no_grad():
        assert torch.allclose(result.to_torch()(*inputs), model(*inputs), atol=1e-6)


def test_optimize_accepts_a_graph_without_modifying_it(tiny):
    model, inputs = tiny
    graph = slimgraph.import_model(model, inputs)
    before = str(graph)
    result = slimgraph.optimize(graph, "remove-identity")
    assert str(graph) == before and len(result.graph) == len(graph) - 1


def test_bad_pass_and_bad_inputs(tiny):
    model, inputs = tiny
    with pytest.raises(PassError, match="unknown pass 'fold-everything'"):
        slimgraph.optimize(model, "fold-everything", example_inputs=inputs)
    with pytest.raises(PassError, match="no option 'ratio'"):
        slimgraph.optimize(model, "dce{ratio=2}", example_inputs=inputs)
    with pytest.raises(SlimgraphError, match="failed on the example inputs"):
        slimgraph.optimize(model, "dce", example_inputs=torch.randn(1, 3))
    with pytest.raises(SlimgraphError, match="expected f32"):
        slimgraph.optimize(slimgraph.import_model(model, inputs), "dce", example_inputs=torch.randn(1, 4, 16, 16))


def test_every_error_is_a_slimgrapherror():
    from slimgraph import errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, SlimgraphError)
