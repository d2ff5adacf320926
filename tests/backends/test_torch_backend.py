import ast

import pytest
import torch

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.ir import DType, Graph
from tests.conftest import HostRoundTrip, perturb_bn, run_saved_model


def test_emitted_module_reads_like_hand_written_code(tiny):
    model, inputs = tiny
    graph = slimgraph.import_model(model, inputs)
    code = slimgraph.to_torch(graph).code
    ast.parse(code)
    assert "self.conv1 = nn.Conv2d(3, 8, kernel_size=(3, 3), padding=(1, 1), bias=False)" in code
    assert "self.bn1 = nn.BatchNorm2d(8)" in code
    assert "self.fc = nn.Linear(8, 4)" in code
    forward = code[code.index("def forward"):code.index("def load")]
    statements = [line.strip() for line in forward.splitlines()[1:] if line.strip()]
    assert len(statements) == len(graph) + 1  # one statement per node, then return
    assert any(line.startswith("add = relu + conv2") for line in statements)


def test_emitted_module_trains(tiny):
    model, inputs = tiny
    emitted = slimgraph.to_torch(slimgraph.import_model(model, inputs)).train()
    assert {n for n, _ in emitted.named_parameters()} == {n for n, _ in model.named_parameters()}
    batch = torch.randn(4, 3, 16, 16)
    loss = emitted(batch).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in emitted.parameters())
    assert emitted.bn1.num_batches_tracked.item() == 1  # BatchNorm really is in train mode


def test_saved_resnet18_reads_like_hand_written_code_and_loads_without_slimgraph(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = perturb_bn(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 224, 224)
    result = slimgraph.optimize(model, "dce", example_inputs=x)
    result.save_torch(tmp_path / "out")
    code = (tmp_path / "out" / "model.py").read_text()
    assert "self.layer1_0_conv1 = nn.Conv2d(64, 64, kernel_size=(3, 3), padding=(1, 1), bias=False)" in code
    assert "layer1_0_bn1 = self.layer1_0_bn1(layer1_0_conv1)" in code
    assert "add = layer1_0_bn2 + maxpool;  layer1_0_bn2 = maxpool = None" in code
    assert "import slimgraph" not in code
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    out = run_saved_model(tmp_path / "out", f"""
        y = net(torch.load({str(tmp_path / "x.pt")!r}))
        ref = torch.load({str(tmp_path / "y.pt")!r})
        print("relerr", float((y - ref).abs().max() / ref.abs().max()))
    """)
    assert float(out.split()[-1]) < 1e-5


def test_save_torch_never_overwrites(tiny, tmp_path):
    model, inputs = tiny
    result = slimgraph.optimize(model, "dce", example_inputs=inputs)
    result.save_torch(tmp_path)
    with pytest.raises(SlimgraphError, match="model.py, weights.pt already exist"):
        result.save_torch(tmp_path)
    result.save_torch(tmp_path, overwrite=True)


def test_names_are_data_never_code(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = f"x'); __import__('os').system('touch {sentinel}'); ('\n"
    g = Graph(evil)
    x = g.add_input(evil, (1, 4), DType.float32)
    w = g.add_constant(evil + "w", torch.randn(4, 4), trainable=True)
    y = g.create_node("linear", [x, w], name=evil + "\"\"\"").output
    y = g.create_node("gelu", [y], {"approximate": "tanh"}, name="import os").output
    y = g.create_node("stochastic_depth", [y], {"p": 0.0, "mode": evil}, name=evil).output
    z = g.create_node("pad", [y], {"pads": [1, 1], "mode": "constant", "value": 0.0}).output
    g.set_outputs([z])
    module = slimgraph.to_torch(g)
    ast.parse(module.code)
    out = module(torch.randn(1, 4))
    assert out.shape == (1, 6) and not sentinel.exists()
    assert "__import__(" not in module.code.replace(repr(evil), "")  # only inside a string literal
    module.train()(torch.randn(1, 4))
    assert not sentinel.exists()


def test_saved_fake_quant_model_learns_its_scales_without_slimgraph(tiny, tmp_path):
    """QAT outside slimgraph: model.py of a fake-quant graph runs and trains with torch alone,
    its scales among the parameters; load_weights then takes the trained state back."""
    model, (x,) = tiny
    data = [(torch.randn(x.shape),) for _ in range(4)]
    fq = slimgraph.optimize(model, "fold-bn,quantize{progress=false}", example_inputs=x, calibration_data=data)
    fq.save_torch(tmp_path / "out")
    torch.save(x, tmp_path / "x.pt")
    out = run_saved_model(tmp_path / "out", f"""
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.save(net(x), {str(tmp_path / "eval.pt")!r})
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        net.train()(x).square().mean().backward()
        opt.step()
        torch.save(net.state_dict(), {str(tmp_path / "trained.pt")!r})
        print(sorted(n for n, _ in net.named_parameters() if n.endswith("_scale")))
    """)
    assert "'relu_scale'" in out and "'conv2_weight_scale'" in out
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "eval.pt"), slimgraph.to_torch(fq.graph)(x))
    module = slimgraph.to_torch(fq.graph)
    module.load_state_dict(torch.load(tmp_path / "trained.pt"))
    before = float(fq.graph.constants["relu_scale"].const_value)
    slimgraph.load_weights(fq.graph, module)
    assert float(fq.graph.constants["relu_scale"].const_value) == float(module.relu_scale.detach()) != before


def test_opaque_module_with_parameters_loads_its_weights():
    class WithBilinear(torch.nn.Module):  # the host round trip cannot be traced: an opaque module
        def __init__(self):
            super().__init__()
            self.fc, self.bil = torch.nn.Linear(4, 4), HostRoundTrip(4)

        def forward(self, x):
            return self.bil(self.fc(x))

    torch.manual_seed(0)
    model, x = WithBilinear().eval(), torch.randn(2, 4)
    graph = slimgraph.import_model(model, (x,))
    module, other = slimgraph.to_torch(graph), slimgraph.to_torch(graph)
    assert "bil.weight" in module.state_dict()
    assert torch.equal(module(x), model(x))
    (opaque,) = [n for n in graph.nodes if n.op == "opaque"]
    assert module.bil is not opaque.attrs["impl"].module and module.bil is not other.bil
    with torch.no_grad():
        module.bil.weight.zero_()  # training one export leaves the graph and the other exports alone
    assert torch.equal(other(x), model(x)) and torch.equal(slimgraph.to_torch(graph)(x), model(x))


def test_a_value_named_like_a_helper_does_not_shadow_it():
    """fuzz-found (ir 7): a node named `attention` became a local that shadowed the attention helper."""
    graph = Graph("g")
    x = graph.add_input("x", (2, 3, 8), DType.float32)
    attention = graph.create_node("attention", [x, x, x], {"num_heads": 2, "scale": 0.5}, name="attention")
    fake_quant = graph.create_node("relu", [attention.outputs[0]], name="fake_quant")
    graph.set_outputs([fake_quant.outputs[0]])
    inputs = torch.randn(2, 3, 8)
    torch.testing.assert_close(slimgraph.to_torch(graph)(inputs), slimgraph.ir.run(graph, [inputs])[0])


def test_take_and_index_at_a_negative_axis():
    """fuzz-found (ir 72): the emitted subscript put a negative axis's index out of place."""
    graph = Graph("g")
    x = graph.add_input("x", (2, 4, 4), DType.float32)
    idx = graph.add_constant("idx", torch.tensor([3, 0, -1]))
    take = graph.create_node("take", [x, idx], {"axis": -1})
    index = graph.create_node("index", [take.outputs[0], idx], {"axes": [-2]})
    graph.set_outputs([index.outputs[0]])
    inputs = torch.randn(2, 4, 4)
    torch.testing.assert_close(slimgraph.to_torch(graph)(inputs), inputs[:, :, [3, 0, 3]][:, [3, 0, 3]])


def test_constants_named_like_module_attributes_keep_the_module_working():
    """Fuzz-found (ir 58): a constant named ``to`` was registered as a buffer over nn.Module.to."""
    g = Graph("named")
    x = g.add_input("x", (2, 3), DType.float32)
    for name in ("to", "eval", "forward", "training"):
        x = g.create_node("add", [x, g.add_constant(name, torch.randn(3))]).output
    g.set_outputs([x])
    model = slimgraph.to_torch(g)
    inputs = torch.randn(2, 3)
    torch.testing.assert_close(model.to(torch.float32)(inputs), slimgraph.ir.run(g, [inputs])[0])


def test_prelu_of_mixed_float_types_promotes_as_the_ir_does():
    """Fuzz-found (ir 300223): F.prelu refuses a float64 x with a float32 slope, which the IR promotes."""
    g = Graph("prelu")
    x = g.add_input("x", (2, 3), DType.float64)
    prelu = g.create_node("prelu", [x, g.add_constant("slope", torch.rand(3))])
    g.set_outputs([prelu.output])
    inputs = torch.randn(2, 3, dtype=torch.float64)
    got = slimgraph.to_torch(g)(inputs)
    assert got.dtype == prelu.output.dtype.torch == torch.float64
    torch.testing.assert_close(got, slimgraph.ir.run(g, [inputs])[0])
