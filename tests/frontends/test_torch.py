import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import SlimgraphError
from slimgraph.ir import OPAQUE, run, verify
from tests.conftest import HostRoundTrip, TinyNet, perturb_bn, rel_error


def roundtrip(model, *inputs, batch_check: int | None = None):
    """import -> verify -> interpreter and to_torch() both match the model."""
    graph = slimgraph.import_model(model, inputs)
    verify(graph)
    with torch.no_grad():
        expected = model(*inputs)
        assert rel_error(run(graph, list(inputs))[0], expected) < 1e-5
        emitted = slimgraph.to_torch(graph)
        assert rel_error(emitted(*inputs), expected) < 1e-5
        if batch_check:
            big = [torch.randn(batch_check, *t.shape[1:]) for t in inputs]
            assert rel_error(emitted(*big), model(*big)) < 1e-5
    return graph


class Shapes(nn.Module):
    """The shape-manipulating idioms of real models: view with the batch, chunk, slicing, expand."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 6))
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):  # x: [B, 6, 4, 4]
        n, c, h, w = x.shape
        y = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(x.size(0), c, h * w)  # channel shuffle
        y = y.permute(0, 2, 1)
        y = torch.cat([self.token.expand(n, -1, -1), y], dim=1)
        a, b = y.chunk(2, dim=2)
        y = torch.cat([b, a], -1) * 0.5 + 1
        y = self.norm(F.gelu(self.proj(y)))
        first = y[:, 0]
        rest = y[:, 1::2, :3].mean(1)
        return torch.softmax(first, -1) + rest.sum(-1, keepdim=True)


def test_shape_idioms_roundtrip_at_any_batch():
    torch.manual_seed(0)
    graph = roundtrip(Shapes().eval(), torch.randn(1, 6, 4, 4), batch_check=3)
    assert not any(n.op == OPAQUE for n in graph.nodes)
    assert "expand_batch" in {n.op for n in graph.nodes}


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.up = nn.Upsample(scale_factor=2)
        self.host = HostRoundTrip(16)  # untraceable: an opaque module

    def forward(self, x):
        y = torch.cumsum(self.fc(x), dim=-1)  # a function, a module and a method torch maps
        y = self.up(y.unsqueeze(1)).squeeze(1).flip(-1)
        return self.host(y)


def test_unknown_calls_become_opaque_nodes_that_still_run():
    torch.manual_seed(0)
    graph = roundtrip(WithOpaque().eval(), torch.randn(2, 3, 8))
    targets = sorted(repr(n.attrs["impl"]) for n in graph.nodes if n.op == OPAQUE)
    assert targets == ["host"]
    assert {"cumsum", "resize", "flip"} <= {n.op for n in graph.nodes}


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.shape[-1] > 8:  # torch.fx cannot trace Python control flow on shapes
            x = F.max_pool2d(x, 2)
        return F.relu(self.bn(self.conv(x))).mean((2, 3))


def test_torch_export_fallback_when_fx_cannot_trace():
    torch.manual_seed(0)
    graph = roundtrip(perturb_bn(DataDependent().eval()), torch.randn(1, 3, 16, 16))
    assert graph.meta["source"] == "torch.export"
    assert {n.op for n in graph.nodes} >= {"max_pool", "conv", "batch_norm", "relu", "mean"}


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_import_and_optimize_leave_the_model_bit_identical_even_in_train_mode():
    torch.manual_seed(0)
    model = perturb_bn(TinyNet()).train()
    before = state_of(model)
    slimgraph.import_model(model, torch.randn(2, 3, 16, 16))
    slimgraph.optimize(model, "dce,remove-identity", example_inputs=torch.randn(2, 3, 16, 16))
    after = model.state_dict()
    assert model.training
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_example_inputs_are_reported():
    model = TinyNet().eval()
    with pytest.raises(SlimgraphError, match="conv1.*failed on the example inputs"):
        slimgraph.import_model(model, torch.randn(1, 5, 16, 16))
    with pytest.raises(SlimgraphError, match="needs example_inputs"):
        slimgraph.import_model(model)
    with pytest.raises(SlimgraphError, match="tensor or a tuple of tensors"):
        slimgraph.import_model(model, [[1, 2, 3]])
    with pytest.raises(SlimgraphError, match="do not fit TinyNet.forward"):
        slimgraph.import_model(model, (torch.randn(1, 3, 16, 16), torch.randn(1)))


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on data: neither fx nor export can capture it
            return x * 2
        return x


def test_untraceable_model_names_both_tracers():
    with pytest.raises(SlimgraphError, match="cannot trace the model: torch.fx said: .*torch.export said"):
        slimgraph.import_model(Untraceable(), torch.randn(1, 3))


def test_non_module_is_refused():
    with pytest.raises(SlimgraphError, match="cannot import a list"):
        slimgraph.import_model([1, 2], None)


def test_tied_weights_stay_one_constant():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    graph = roundtrip(Tied().eval(), torch.randn(1, 4))
    assert len([c for c in graph.constants.values() if c.shape == (4, 4)]) == 1


# ---------------------------------------------------------------------------- the private copy
class _Custom(nn.Module):
    """A module deepcopy copies through a class method of its own (the fast copy defers to it)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.copied = 0

    def __deepcopy__(self, memo):
        new = _Custom()
        new.scale = nn.Parameter(self.scale.detach().clone())
        new.copied = self.copied + 1
        return new


class _Sharing(nn.Module):
    """Tied weights, a shared submodule, buffers that are views of one storage, a plain tensor
    attribute, a list holding a module, a hook: everything a copy must keep (or keep apart)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.shared = nn.ReLU()
        self.again = self.shared
        table = torch.arange(12.0)
        self.register_buffer("head", table[:6])
        self.register_buffer("whole", table)
        self.plain = torch.randn(3)
        self.listed = [self.a]
        self.custom = _Custom()
        self.a.register_forward_hook(lambda m, i, o: None)
        self.a.cache = self.b.cache = {}  # one (empty) dict two modules share

    def forward(self, x):
        return self.b(self.shared(self.a(x))) * self.custom.scale + self.plain


def test_private_copy_is_a_deepcopy_and_owns_its_parameters():
    import copy

    from slimgraph.frontends.torch.copying import private_copy as _private_copy

    model = _Sharing()
    ours, owned = _private_copy(model)
    ref = copy.deepcopy(model)
    assert type(ours) is _Sharing and ours.training == model.training
    assert ours.b.weight is ours.a.weight and ours.again is ours.shared and ours.listed[0] is ours.a
    assert ours.head.untyped_storage().data_ptr() == ours.whole.untyped_storage().data_ptr()  # still one storage
    assert ours.custom.copied == ref.custom.copied == 1  # its own __deepcopy__ ran
    assert ours.a.cache is ours.b.cache and ours.a.cache is not model.a.cache
    assert len(ours.a._forward_hooks) == 1 and ours.a._forward_hooks is not model.a._forward_hooks
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    originals = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), model.plain)}
    copies = (*ours.parameters(), *ours.buffers(), ours.plain)
    assert not originals & {t.untyped_storage().data_ptr() for t in copies}
    # tied: one parameter; the one _Custom.__deepcopy__ made outside the memo is not known to be ours
    assert set(owned) == {id(p) for p in ours.parameters()} - {id(ours.custom.scale)}
    x = torch.randn(2, 3)
    assert torch.equal(ours(x), model(x))


def test_graph_constants_share_no_memory_with_the_model():
    torch.manual_seed(0)
    model = perturb_bn(TinyNet()).eval()
    before = state_of(model)
    graph = roundtrip(model, torch.randn(2, 3, 16, 16))
    user = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not user & {v.const_value.untyped_storage().data_ptr() for v in graph.constants.values()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _WritesItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x):
        y = x * self.w
        with torch.no_grad():
            self.w.add_(1.0)  # a forward that updates its own parameter in place
        return y


def test_forward_writing_to_a_parameter_keeps_the_value_it_was_read_with():
    model = _WritesItsWeight()
    graph = slimgraph.import_model(model, torch.randn(1, 3))
    weights = [v.const_value for v in graph.constants.values() if v.shape == (3,)]
    assert weights and all(torch.equal(w, torch.full((3,), 2.0)) for w in weights)
    assert torch.equal(model.w, torch.full((3,), 2.0))  # the user's model is untouched


class _OpaqueHoldsAConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.host = HostRoundTrip(4)  # untraceable: an opaque module

    def forward(self, x):
        return self.host(x) + x * self.host.weight


def test_a_parameter_an_opaque_module_holds_is_not_shared_with_the_graph():
    torch.manual_seed(0)
    model = _OpaqueHoldsAConstant().eval()
    x = torch.randn(2, 4)
    graph = slimgraph.import_model(model, x)
    verify(graph)
    with torch.no_grad():
        assert rel_error(run(graph, [x])[0], model(x)) < 1e-6
    module = next(n.attrs["impl"].module for n in graph.nodes if n.op == OPAQUE)
    held = {t.untyped_storage().data_ptr() for t in module.parameters()}
    assert not held & {v.const_value.untyped_storage().data_ptr() for v in graph.constants.values()}


def test_a_table_read_through_an_index_buffer_stays_a_trainable_parameter():
    """Relative position biases (swin): table[index] is a gather, not a folded constant."""

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(7, 3))
            self.register_buffer("index", torch.tensor([6, 0, 3, 3, 1]))

        def forward(self, x):
            return x + self.table[self.index].sum(-1)

    model, x = Table().eval(), torch.randn(2, 5)
    graph = slimgraph.import_model(model, (x,))
    (gather,) = [n for n in graph.nodes if n.op == "gather"]
    assert gather.attrs == {"axis": 0, "indices": [6, 0, 3, 3, 1]}
    module = slimgraph.to_torch(graph)
    assert "table" in dict(module.named_parameters())
    assert torch.equal(module(x), model(x))
    (y,) = run_onnxruntime(slimgraph.to_onnx(graph), [x])
    assert torch.allclose(y, model(x), atol=1e-6)
    module.train()
    module(x).sum().backward()
    assert module.table.grad is not None and module.table.grad[2].abs().sum() == 0  # row 2 is never read


class FrozenByOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.host = nn.Conv2d(3, 8, 3, padding=1), HostRoundTrip(8)
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(self.host(torch.relu(self.conv1(x))))))


def test_what_stays_opaque_is_named_by_the_trace_and_by_prune():
    torch.manual_seed(0)
    result = slimgraph.optimize(FrozenByOpaque().eval(), "prune{ratio=0.5}", torch.randn(1, 3, 8, 8))
    record = result.trace[-1]
    assert record.changed  # conv2 still prunes
    assert record.pass_stats["frozen_by_opaque"] == {"host": 1}  # conv1's channels reach the opaque op
    summary = result.summary()
    assert "1 layer(s) kept whole: their channels reach opaque op host" in summary
    assert "opaque ops (passes skip them and keep the channels they touch): host" in summary


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_slice_scatter_at_any_dim_in_every_backend(dim):
    """fuzz-found: index_put (slice_scatter's form) failed shape inference past the leading axis."""
    class Scatter(torch.nn.Module):
        def forward(self, x):
            src = torch.zeros_like(x).narrow(dim, 0, 2)
            return torch.slice_scatter(x, src, dim=dim, start=1, end=5, step=2) * 2

    x = torch.randn(4, 5, 6)
    graph = slimgraph.import_model(Scatter(), (x,))
    assert any(n.op == "index_put" for n in graph.nodes)
    want = Scatter()(x)
    torch.testing.assert_close(slimgraph.to_torch(graph)(x), want)
    torch.testing.assert_close(torch.as_tensor(run_onnxruntime(slimgraph.to_onnx(graph), [x])[0]), want)


def test_div_keeps_its_rounding_mode():
    """torch.fx's torch.div(x, 1.0, rounding_mode='floor') imported as x / 1.0, which canonicalize then
    dropped: the import of model.py differed from the graph it was written from (fuzz-found: ir 100140)."""
    class Div(torch.nn.Module):
        def forward(self, x):
            return torch.div(x, 1.0, rounding_mode="floor"), x.div(3.0, rounding_mode="trunc"), torch.div(x, 2.0)

    x = torch.randn(2, 6) * 5
    graph = slimgraph.import_model(Div(), (x,))
    assert graph.meta["source"] != "torch.export"
    assert [n.attrs.get("rounding_mode") for n in graph.nodes if n.op == "div"] == ["floor", "trunc", None]
    for got, want in zip(run(graph, [x]), Div()(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class Views(nn.Module):
    """One reshape written three ways: torch.export keeps view's -1, reshape's decomposition writes the size."""

    def forward(self, x):
        t = torch.tanh(x.permute(0, 2, 1))  # not contiguous: reshape cannot be a view
        return t.view(x.shape[0], 1, 3, -1), t.reshape(x.shape[0], 1, 3, -1), t.reshape(-1, 4)


def test_a_symbolic_reshape_has_one_form_however_torch_spells_it():
    """Fuzz-found (ir 200076): IR -> PyTorch source -> IR was no fixed point: [batch,1,3,-1] came back [batch,1,3,4]."""
    x = torch.randn(2, 4, 3)
    graph = slimgraph.import_model(Views(), (x,), {"x": {0: "batch"}})
    view, reshape, flat = (n.attrs["shape"] for n in graph.nodes if n.op == "reshape")
    assert [str(d) for d in view] == [str(d) for d in reshape] == ["batch", "1", "3", "4"]
    assert flat == [-1, 4]  # a multiple of the batch: the -1 stays
    big = torch.randn(5, 4, 3)
    for got, want in zip(slimgraph.to_torch(graph)(big), Views()(big)):
        torch.testing.assert_close(got, want)


class LastTokens(nn.Module):
    def forward(self, x):
        return torch.relu(x[:, -1]), torch.relu(x[:, [-1, 0]])


def test_a_negative_index_along_a_symbolic_dim_counts_from_its_run_time_end():
    """x[:, -1] over seq was select(index=4) at the example's seq 5: at seq 7 it read row 4."""
    graph = slimgraph.import_model(LastTokens(), (torch.randn(2, 5, 3),), {"x": {0: "batch", 1: "seq"}})
    module, emitted = slimgraph.to_torch(graph), slimgraph.to_onnx(graph)
    x = torch.randn(3, 7, 3)
    with torch.no_grad():
        want = LastTokens()(x)
        for backend, got in [("interpreter", run(graph, [x])), ("PyTorch", module(x)),
                             ("onnxruntime", run_onnxruntime(emitted, [x]))]:
            for y, w in zip(got, want):
                assert torch.equal(torch.as_tensor(y), w), backend


class ShiftRight(nn.Module):
    """Hugging Face's shift_tokens_right: slice and select assignments along the sequence."""

    def forward(self, x):
        y = torch.zeros_like(x)
        y[:, 1:] = x[:, :-1]
        y[:, -1] = 5.0
        y[:, 0] = x[:, -2]
        return y


class Scatters(nn.Module):
    def forward(self, x):
        y = torch.select_scatter(x, x[:, 0] * 2, 1, -1)
        return torch.slice_scatter(y, y[:, :-2] + 1, 1, 2)


@pytest.mark.parametrize("model", [ShiftRight(), Scatters()], ids=["assignments", "scatters"])
def test_slice_and_select_assignments_along_a_symbolic_dim_follow_its_run_time_size(model):
    """y[:, 1:] = ... was an index_put at positions 1..4 of the example's seq 5 (at seq 7 it failed to
    run), select_scatter's index -1 position 4, and the fill of y[:, -1] an expand to the example's
    batch."""
    graph = slimgraph.import_model(model, (torch.randn(2, 5, 3),), {"x": {0: "batch", 1: "seq"}})
    module, emitted = slimgraph.to_torch(graph), slimgraph.to_onnx(graph)
    x = torch.randn(3, 7, 3)
    with torch.no_grad():
        want = model(x)
        for backend, got in [("interpreter", run(graph, [x])[0]), ("PyTorch", module(x)),
                             ("onnxruntime", run_onnxruntime(emitted, [x])[0])]:
            assert torch.equal(torch.as_tensor(got), want), backend
