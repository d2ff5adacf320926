import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.ir import OPAQUE, run, verify
from tests.conftest import TinyNet, perturb_bn, rel_error


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
        self.up = nn.Upsample(scale_factor=2)  # no canonical op yet: becomes an opaque module

    def forward(self, x):
        y = torch.cumsum(self.fc(x), dim=-1)  # opaque function
        return self.up(y.unsqueeze(1)).squeeze(1).flip(-1)  # opaque method


def test_unknown_calls_become_opaque_nodes_that_still_run():
    torch.manual_seed(0)
    graph = roundtrip(WithOpaque().eval(), torch.randn(2, 3, 8))
    targets = sorted(repr(n.attrs["impl"]) for n in graph.nodes if n.op == OPAQUE)
    assert targets == ["flip", "torch.cumsum", "up"]


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
    with pytest.raises(SlimgraphError, match="takes 1..1 inputs"):
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
