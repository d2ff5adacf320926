"""The op registry: inference matches execution; coupling declarations are well formed."""

import pytest
import torch

from slimgraph.ir import DType, Graph, get_op, registered_ops, run
from slimgraph.ir.coupling import Coupling

CASES = [
    ("conv", [(1, 4, 9, 9), (8, 2, 3, 3)], {"stride": [2, 2], "pads": [1, 0, 1, 0], "dilation": [1, 1], "groups": 2}),
    ("linear", [(2, 5, 7), (3, 7), (3,)], {}),
    ("matmul", [(2, 4, 5), (5, 6)], {}),
    ("batch_norm", [(1, 4, 3, 3), (4,), (4,), (4,), (4,)], {"eps": 1e-5}),
    ("max_pool", [(1, 2, 7, 7)], {"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": True}),
    ("avg_pool", [(1, 2, 7, 7)], {"kernel": [2, 2], "stride": [2, 2], "pads": [0, 0, 1, 1]}),
    ("concat", [(1, 2, 3), (1, 5, 3)], {"axis": 1}),
    ("split", [(1, 7, 3)], {"axis": 1, "sizes": [3, 4]}),
    ("slice", [(1, 8, 4)], {"axes": [1], "starts": [1], "ends": [7], "steps": [2]}),
    ("permute", [(1, 2, 3)], {"perm": [0, 2, 1]}),
    ("reshape", [(2, 6, 4)], {"shape": ["N", 3, -1]}),
    ("add", [(1, 4, 1, 3), (4, 5, 1)], {}),
    ("softmax", [(2, 5)], {"axis": -1}),
    ("mean", [(1, 4, 3, 3)], {"axes": [2, 3], "keepdim": True}),
]


@pytest.mark.parametrize("op,shapes,attrs", CASES, ids=[c[0] for c in CASES])
def test_inferred_types_match_execution_and_couplings_are_valid(op, shapes, attrs):
    g = Graph()
    inputs = [g.add_input(f"in{i}", s, DType.float32) for i, s in enumerate(shapes)]
    node = g.create_node(op, inputs, attrs)
    g.set_outputs(list(node.outputs))
    results = run(g, [torch.randn(s) for s in shapes])
    assert [tuple(r.shape) for r in results] == [v.shape for v in node.outputs]
    couplings = get_op(op).coupling(node)
    assert couplings and all(isinstance(c, Coupling) for c in couplings)
    for c in couplings:
        for d in c.dims:
            v = node.inputs[d.index] if d.port == "in" else node.outputs[d.index]
            assert 0 <= d.axis < v.rank, (op, c)


def test_conv_coupling_distinguishes_dense_depthwise_and_grouped():
    g = Graph()
    x = g.add_input("x", (1, 8, 5, 5), DType.float32)
    attrs = {"stride": [1, 1], "pads": [0, 0, 0, 0], "dilation": [1, 1]}
    dense = g.create_node("conv", [x, g.add_constant("w", torch.randn(4, 8, 1, 1))], {**attrs, "groups": 1})
    dw = g.create_node("conv", [x, g.add_constant("dw", torch.randn(8, 1, 3, 3))], {**attrs, "groups": 8})
    grp = g.create_node("conv", [x, g.add_constant("gw", torch.randn(8, 2, 3, 3))], {**attrs, "groups": 4})
    wide = g.create_node("conv", [x, g.add_constant("mw", torch.randn(16, 2, 3, 3))], {**attrs, "groups": 4})
    kinds = lambda n: sorted(c.kind for c in get_op("conv").coupling(n))  # noqa: E731
    assert kinds(dense) == ["same", "same", "same"]
    assert kinds(dw) == ["same", "same"]
    assert "group" in kinds(grp)
    assert "frozen" in kinds(wide)  # in != out channels: no safe per-channel mapping


def test_every_op_has_a_reference_and_description():
    ops = registered_ops()
    assert len(ops) > 40
    for name, opdef in ops.items():
        assert callable(opdef.reference) and opdef.description, name
