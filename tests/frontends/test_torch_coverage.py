"""The torch frontend covers torch's op surface, not a list of the ops we met: every op of the Core
ATen opset (the ops torch.export decomposes to) has a handler or sits in aten.NOT_CONVERTED with
its reason, and every composite op kept whole through the decomposition has a handler."""

from __future__ import annotations

import torch

from slimgraph.frontends.torch import tracing
from slimgraph.frontends.torch.ops import aten, find_handler


def core_aten_ops() -> list[torch._ops.OpOverload]:
    ops = []
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if torch.Tag.core in op.tags:
                ops.append(op)
    return ops


def coverage() -> tuple[list, list, list]:
    """(converted, listed with a reason, neither) over the Core ATen opset."""
    listed = {name for names in aten.NOT_CONVERTED.values() for name in names}
    converted, excused, missing = [], [], []
    for op in core_aten_ops():
        if find_handler("call_function", op) is not None:
            converted.append(op)
        elif op._opname in listed:
            excused.append(op)
        else:
            missing.append(op)
    return converted, excused, missing


def test_every_core_aten_op_converts_or_is_listed_with_a_reason():
    converted, excused, missing = coverage()
    assert missing == [], f"Core ATen ops with no handler and no listed reason: {sorted(map(str, missing))}"
    assert len(core_aten_ops()) > 150  # the opset was found (not an empty enumeration)
    # the README quotes this figure; keep them in step
    print(f"Core ATen coverage: {len(converted)} of {len(converted) + len(excused)}")


def test_the_listed_exceptions_are_core_ops_without_handlers():
    names = {op._opname for op in core_aten_ops()}
    for reason, listed in aten.NOT_CONVERTED.items():
        for name in listed:
            assert name in names, f"{name} ({reason}) is not a Core ATen op"
            ops = [op for op in core_aten_ops() if op._opname == name]
            assert all(find_handler("call_function", op) is None for op in ops), f"{name} is listed but converts"


def test_every_op_kept_whole_through_decomposition_has_a_handler():
    assert tracing.KEEP
    assert [str(op) for op in tracing.KEEP if find_handler("call_function", op) is None] == []


class _FlattenOfScalar(torch.nn.Module):
    """aten.flatten of a 0-d tensor: its handler refuses it (Unhandled), its decomposition is a view."""

    def forward(self, x):
        return torch.flatten(x.sum()) * 2


class _FlattenOfScalarBranching(_FlattenOfScalar):
    def forward(self, x):
        if x.shape[1] > 2:  # torch.fx cannot branch on a size: the whole model goes through torch.export
            return super().forward(x)
        return x


def test_an_export_whose_handler_refuses_its_arguments_is_decomposed_not_left_opaque():
    """torch.export's graph converts without decomposition when every op has a handler; one that
    raises Unhandled on its arguments sends it through the decomposition again, both for one call
    fx left whole and for a whole model fx cannot trace."""
    import slimgraph
    from slimgraph.ir import OPAQUE, run

    x = torch.randn(2, 3)
    for model, source in ((_FlattenOfScalar(), "torch.fx"), (_FlattenOfScalarBranching(), "torch.export")):
        graph = slimgraph.import_model(model, (x,))
        assert graph.meta["source"] == source
        assert [n.op for n in graph.nodes if n.op == OPAQUE] == []
        torch.testing.assert_close(run(graph, [x])[0], model(x))
