"""The op registry: inference matches execution; coupling declarations are well formed."""

import pytest
import torch

from slimgraph.errors import VerificationError
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


# ---------------------------------------------------------------------------- closed-form inference
def _node(op, shapes, attrs, dtypes=None):
    g = Graph()
    dtypes = dtypes or [DType.float32] * len(shapes)
    inputs = [None if s is None else g.add_input(f"in{i}", s, dt) for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    return g.create_node(op, inputs, attrs)


def _meta_types(node):
    """What the reference computes on meta tensors (the inference used where an op has no closed form)."""
    from slimgraph.ir.ops import run_reference

    metas = [None if v is None else torch.empty(v.shape, dtype=v.dtype.torch, device="meta") for v in node.inputs]
    return [(tuple(o.shape), DType.from_torch(o.dtype)) for o in run_reference(node, metas)]


def _real_types(node):
    from slimgraph.ir.ops import run_reference

    def sample(v):
        if v is None:
            return None
        if v.dtype.is_float:
            return torch.randn(v.shape, dtype=v.dtype.torch)
        return torch.randint(0, 5, v.shape, dtype=v.dtype.torch)

    return [(tuple(o.shape), DType.from_torch(o.dtype)) for o in run_reference(node, [sample(v) for v in node.inputs])]


POOL = {"stride": [2, 2], "pads": [0, 0, 0, 0]}
CLOSED_FORM = [
    ("linear", [(2, 5, 7), (3, 7), (3,)], {}),
    ("linear", [(7,), (3, 7)], {}),
    ("linear", [(4, 7), (3, 7), None], {}),
    ("max_pool", [(1, 2, 7, 7)], {"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": True}),
    ("max_pool", [(1, 1, 5, 5)], {"kernel": [2, 2], "stride": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": True}),
    ("max_pool", [(1, 2, 9, 8)], {"kernel": [3, 3], "stride": [1, 2], "pads": [0, 1, 0, 1], "dilation": [2, 2]}),
    ("max_pool", [(1, 2, 8, 8)], {"kernel": [3, 2], "stride": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": True}),
    ("max_pool", [(1, 1, 4, 4)], {"kernel": [2, 2], "stride": [1, 1], "pads": [2, 2, 2, 2]}),
    ("max_pool", [(1, 3, 10)], {"kernel": [3], "stride": [2], "pads": [1, 1], "ceil_mode": False}),
    ("max_pool", [(1, 2, 5, 6, 7)], {"kernel": [2, 2, 2], **POOL, "stride": [2, 2, 2], "pads": [0] * 6,
                                     "ceil_mode": True}),
    ("avg_pool", [(1, 2, 7, 7)], {"kernel": [2, 2], "stride": [2, 2], "pads": [0, 0, 1, 1]}),
    ("avg_pool", [(1, 2, 7, 7)], {"kernel": [3, 3], "stride": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": True,
                                  "count_include_pad": False}),
    ("avg_pool", [(2, 4, 56, 56)], {"kernel": [2, 2], **POOL}),
    ("adaptive_avg_pool", [(1, 4, 7, 7)], {"output_size": [1, 1]}),
    ("adaptive_avg_pool", [(1, 4, 7, 9)], {"output_size": [3, 2]}),
    ("adaptive_avg_pool", [(2, 3, 10)], {"output_size": [4]}),
    ("adaptive_max_pool", [(1, 4, 7, 7)], {"output_size": [2, 3]}),
    ("flatten", [(2, 3, 4, 5)], {"start": 1, "end": 3}),
    ("flatten", [(2, 3, 4, 5)], {"start": -3, "end": -2}),
    ("flatten", [(2, 3)], {"start": 1, "end": 1}),
    ("reshape", [(2, 6, 4)], {"shape": ["N", 3, -1]}),
    ("reshape", [(2, 6, 4)], {"shape": [48]}),
    ("reshape", [(2, 6, 4)], {"shape": [-1, 8]}),
    ("reshape", [(1, 0, 3)], {"shape": [0, 5]}),
    ("permute", [(1, 2, 3)], {"perm": [0, 2, 1]}),
    ("permute", [(2, 3, 4, 5)], {"perm": [-1, 0, 2, 1]}),
    ("concat", [(1, 2, 3), (1, 5, 3)], {"axis": 1}),
    ("concat", [(2, 3, 1), (2, 3, 4), (2, 3, 2)], {"axis": -1}),
    ("split", [(1, 7, 3)], {"axis": 1, "sizes": [3, 4]}),
    ("split", [(2, 3, 5)], {"axis": -1, "sizes": [0, 2, 3]}),
    ("mean", [(1, 4, 3, 3)], {"axes": [2, 3], "keepdim": True}),
    ("mean", [(1, 4, 3, 3)], {"axes": [-1]}),
    ("sum", [(2, 3, 4)], {"axes": [0, 2], "keepdim": False}),
    ("add", [(1, 4, 1, 3), (4, 5, 1)], {}),
    ("mul", [(2, 1), (1, 0)], {}),
    ("sub", [(3,), ()], {}),
]


@pytest.mark.parametrize("op,shapes,attrs", CLOSED_FORM, ids=[c[0] for c in CLOSED_FORM])
def test_closed_form_inference_matches_the_reference(op, shapes, attrs):
    node = _node(op, shapes, attrs)
    closed = get_op(op).infer(node)
    assert closed is not None, "this case is meant to be covered by the closed form"
    assert closed == _meta_types(node) == _real_types(node)
    assert [(v.shape, v.dtype) for v in node.outputs] == closed


FALLBACK = [  # not covered by the closed form: the reference on meta decides, exactly as before
    ("concat", [(1, 2), (1, 3)], {"axis": 1}, [DType.float32, DType.float64]),
    ("sum", [(2, 3)], {"axes": [1]}, [DType.int32]),
    ("max_pool", [(2, 7, 7)], {"kernel": [3, 3], "stride": [2, 2], "pads": [0, 0, 0, 0]}, None),
    ("linear", [(4, 7), (3, 7)], {}, [DType.float32, DType.float64]),
    ("conv_transpose", [(2, 3, 3, 2), (3, 3, 2, 2)],  # it only checks the sizes
     {"stride": [1, 1], "padding": [1, 1], "output_padding": [0, 0], "dilation": [1, 1], "groups": 3}, None),
]


@pytest.mark.parametrize("op,shapes,attrs,dtypes", FALLBACK, ids=[c[0] for c in FALLBACK])
def test_closed_form_defers_to_the_reference_where_it_does_not_apply(op, shapes, attrs, dtypes):
    from slimgraph.ir.ops import infer_types

    g = Graph()
    dtypes = dtypes or [DType.float32] * len(shapes)
    inputs = [g.add_input(f"in{i}", s, dt) for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    node = g.create_node(op, inputs, attrs)
    assert get_op(op).infer(node) is None
    assert infer_types(node) == _meta_types(node) == [(v.shape, v.dtype) for v in node.outputs]


INVALID = [
    ("reshape", [(2, 6, 4)], {"shape": [5, -1]}),
    ("max_pool", [(1, 1, 2, 2)], {"kernel": [3, 3], "stride": [1, 1], "pads": [0, 0, 0, 0]}),
    ("concat", [(1, 2, 3), (1, 2, 4)], {"axis": 1}),
    ("split", [(1, 7, 3)], {"axis": 1, "sizes": [3, 3]}),
    ("linear", [(2, 5), (3, 7)], {}),
    ("add", [(2, 3), (4, 3)], {}),
    ("flatten", [(2, 3, 4)], {"start": 2, "end": 1}),
    ("adaptive_avg_pool", [(2, 3, 4, 4)], {"output_size": [0, 2]}),  # torch's meta gives [2, 3, 0, 2]
    # ir 4000109: a padding that crops the width to 0, which torch's meta kernel lets through
    ("conv_transpose", [(2, 3, 3, 1), (3, 3, 2, 2)],
     {"stride": [1, 1], "padding": [1, 1], "output_padding": [0, 0], "dilation": [1, 1], "groups": 3}),
]


@pytest.mark.parametrize("op,shapes,attrs", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_operands_fail_inference_with_the_node_named(op, shapes, attrs):
    g = Graph()
    inputs = [g.add_input(f"in{i}", s, DType.float32) for i, s in enumerate(shapes)]
    with pytest.raises(VerificationError, match=f"node {op}.*shape inference failed"):
        g.create_node(op, inputs, attrs)
