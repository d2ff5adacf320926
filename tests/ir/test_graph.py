import pytest
import torch

from slimgraph.errors import VerificationError
from slimgraph.ir import DType, Graph, print_graph, run, verify


def conv_graph():
    g = Graph("g")
    x = g.add_input("x", (1, 3, 8, 8), DType.float32)
    w = g.add_constant("w", torch.randn(4, 3, 3, 3))
    conv = g.create_node("conv", [x, w, None], {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1],
                                                "groups": 1})
    relu = g.create_node("relu", [conv.output])
    flat = g.create_node("reshape", [relu.output], {"shape": ["N", -1]})
    g.set_outputs([flat.output])
    return g, x, w, conv, relu, flat


def test_shapes_are_inferred_and_uses_recorded():
    g, x, w, conv, relu, flat = conv_graph()
    assert conv.output.shape == (1, 4, 8, 8) and conv.output.dtype is DType.float32
    assert flat.output.shape == (1, 256)
    assert [u.node for u in x.uses] == [conv] and [u.node for u in w.uses] == [conv]
    assert relu.inputs[0] is conv.output and conv.output.users() == [relu]
    verify(g)


def test_batch_symbol_lets_a_graph_traced_at_batch_1_run_at_batch_3():
    g, *_ = conv_graph()
    (y,) = run(g, [torch.randn(3, 3, 8, 8)])
    assert y.shape == (3, 256)


def test_replace_all_uses_and_remove_keep_use_lists_consistent():
    g, x, w, conv, relu, flat = conv_graph()
    g.replace_all_uses_with(relu.output, conv.output)
    assert flat.inputs[0] is conv.output and not relu.output.uses
    g.remove_node(relu)
    assert relu.graph is None and len(conv.output.uses) == 1
    verify(g)


def test_remove_refuses_a_node_still_in_use():
    g, x, w, conv, relu, flat = conv_graph()
    with pytest.raises(VerificationError, match="still used"):
        g.remove_node(relu)


def test_nodes_snapshot_allows_editing_while_iterating():
    g, *_ = conv_graph()
    for node in g.nodes:
        if node.op == "relu":
            g.create_node("sigmoid", [node.output], after=node)
    assert [n.op for n in g.nodes] == ["conv", "relu", "sigmoid", "reshape"]


def test_create_node_rejects_unknown_ops_and_bad_operands():
    g, x, *_ = conv_graph()
    with pytest.raises(VerificationError, match="unknown op"):
        g.create_node("frobnicate", [x])
    with pytest.raises(VerificationError, match="shape inference failed"):
        g.create_node("linear", [x, g.add_constant("w2", torch.randn(5, 7))])
    other = Graph("other").add_input("y", (1,), DType.float32)
    with pytest.raises(VerificationError, match="does not belong"):
        g.create_node("relu", [other])


def test_verify_catches_a_node_out_of_order():
    g, x, w, conv, relu, flat = conv_graph()
    g.move_before(flat, conv)  # reshape now reads relu's output before it exists
    with pytest.raises(VerificationError, match="reshape.*defined later"):
        verify(g)


def test_verify_catches_a_cycle():
    g, x, w, conv, relu, flat = conv_graph()
    conv.set_input(0, relu.output)  # relu -> conv -> relu
    with pytest.raises(VerificationError, match="cycle"):
        verify(g)


def test_verify_catches_corrupted_uses_and_wrong_shapes():
    g, x, w, conv, relu, flat = conv_graph()
    x.uses.clear()
    with pytest.raises(VerificationError, match="recorded uses"):
        verify(g)
    g, x, w, conv, relu, flat = conv_graph()
    relu.output.shape = (1, 5, 8, 8)
    with pytest.raises(VerificationError, match="relu"):
        verify(g)


def test_clone_is_independent_and_prints_the_same():
    g, *_ = conv_graph()
    c = g.clone()
    assert print_graph(c) == print_graph(g)
    relu = next(n for n in c.nodes if n.op == "relu")
    c.replace_all_uses_with(relu.output, relu.inputs[0])
    c.remove_node(relu)
    assert len(g) == 3 and len(c) == 2
    verify(g)
    verify(c)


def test_printer_is_deterministic_and_names_do_not_shift():
    g, x, w, conv, relu, flat = conv_graph()
    before = print_graph(g).splitlines()
    g.create_node("sigmoid", [relu.output], after=relu)
    after = print_graph(g).splitlines()
    assert len(after) == len(before) + 1
    assert set(before) <= set(after)  # inserting one node leaves every other line as it was
    assert "%conv: f32[1,4,8,8] = conv(%x, %w, _) {dilation=[1,1], groups=1, pads=[1,1,1,1], stride=[1,1]}" in after[4]


def test_unique_names_and_clean_identifiers():
    g = Graph()
    a = g.add_input("x", (1,), DType.float32)
    b = g.add_input("x", (1,), DType.float32)
    c = g.add_input("1 bad name'); import os", (1,), DType.float32)
    assert a.name == "x" and b.name == "x_1"
    assert c.name.isidentifier()


def test_int8_values_and_quantization_dtypes_fit():
    g = Graph()
    q = g.add_constant("wq", torch.randint(-128, 127, (4, 4), dtype=torch.int8))
    assert q.dtype is DType.int8 and q.nbytes == 16
    assert DType.uint8.torch is torch.uint8


def test_symbolic_sizes_in_attrs_print_as_their_expressions_whatever_size_was_traced():
    """A graph traced at seq=5 prints as the one traced at seq=8 (the hints are the example's sizes, not
    the program): reshape targets print as shapes do."""
    from slimgraph.ir.symbolic import SymDim

    def graph(seq: int) -> str:
        g = Graph("g")
        x = g.add_input("x", (2, seq, 8), DType.float32, sym=("batch", "seq", None))
        split = g.create_node("reshape", [x], {"shape": [x.dim(0), x.dim(1), 2, 4]})
        g.set_outputs([split.output])
        assert isinstance(split.attrs["shape"][1], SymDim)
        return print_graph(g)

    assert graph(5) == graph(8)
    assert "reshape(%x) {shape=[batch,seq,2,4]}" in graph(5)


@pytest.mark.parametrize("op,shapes,attrs,canonical", [
    ("softmax", [(2, 3, 4)], {"axis": -1}, {"axis": 2}),
    ("concat", [(2, 3), (2, 5)], {"axis": -1}, {"axis": 1}),
    ("mean", [(2, 3, 4)], {"axes": [-1, 0], "keepdim": False}, {"axes": [2, 0]}),
    ("unsqueeze", [(2, 3)], {"axes": [-1]}, {"axes": [2]}),  # counted in the result's rank
    ("permute", [(2, 3, 4)], {"perm": [0, -1, 1]}, {"perm": [0, 2, 1]}),
    ("flatten", [(2, 3, 4)], {"start": 1, "end": -1}, {"start": 1, "end": 2}),
])
def test_axis_attrs_are_stored_non_negative_whoever_writes_them(op, shapes, attrs, canonical):
    g = Graph("g")
    xs = [g.add_input(f"x{i}", shape, DType.float32) for i, shape in enumerate(shapes)]
    node = g.create_node(op, xs, attrs)
    assert {k: node.attrs[k] for k in canonical} == canonical
    positive = g.create_node(op, xs, {**attrs, **canonical})
    assert positive.outputs[0].shape == node.outputs[0].shape
    tensors = [torch.randn(s) for s in shapes]
    torch.testing.assert_close(run(_alone(node), tensors)[0], run(_alone(positive), tensors)[0])


def _alone(node):
    g = Graph("alone")
    xs = [g.add_input(v.name, v.shape, v.dtype) for v in node.inputs]
    g.set_outputs([g.create_node(node.op, xs, node.attrs).outputs[0]])
    return g


def test_an_axis_out_of_range_is_left_as_written():
    g = Graph("g")
    x = g.add_input("x", (2, 3), DType.float32)
    assert g.create_node("softmax", [x], {"axis": -3}).attrs["axis"] == -3  # not silently made valid
