import torch

from slimgraph.ir import DType, Graph, print_graph, run
from slimgraph.passes import PassContext, make_pass


def test_dce_removes_dead_nodes_and_constants():
    g = Graph()
    x = g.add_input("x", (1, 4), DType.float32)
    w = g.add_constant("w", torch.randn(3, 4))
    dead = g.create_node("linear", [x, w])
    g.create_node("relu", [dead.output])
    live = g.create_node("sigmoid", [x])
    g.set_outputs([live.output])
    result = make_pass("dce", {}).run(g, PassContext())
    assert result.changed and result.stats == {"nodes_removed": 2, "constants_removed": 1}
    assert [n.op for n in g.nodes] == ["sigmoid"] and not g.constants
    assert not make_pass("dce", {}).run(g, PassContext()).changed


def test_remove_identity_bypasses_no_ops_only():
    g = Graph()
    x = g.add_input("x", (2, 4), DType.float32)
    a = g.create_node("identity", [x]).output
    b = g.create_node("reshape", [a], {"shape": ["N", 4]}).output  # same shape: no-op
    c = g.create_node("permute", [b], {"perm": [1, 0]}).output  # a real transpose: kept
    d = g.create_node("mul", [c, g.add_constant("one", torch.tensor(1.0))]).output
    e = g.create_node("slice", [d], {"axes": [0], "starts": [0], "ends": [4], "steps": [1]}).output
    f = g.create_node("slice", [e], {"axes": [1], "starts": [1], "ends": [2], "steps": [1]}).output  # real
    g.set_outputs([f])
    inp = torch.randn(2, 4)
    (expected,) = run(g, [inp])
    result = make_pass("remove-identity", {}).run(g, PassContext())
    assert result.stats == {"removed": 4}
    assert [n.op for n in g.nodes] == ["permute", "slice"]
    assert torch.equal(run(g, [inp])[0], expected)
    before = print_graph(g)
    assert not make_pass("remove-identity", {}).run(g, PassContext()).changed
    assert print_graph(g) == before
