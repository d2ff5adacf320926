import ast
import subprocess
import sys
import textwrap

import pytest
import torch

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.ir import DType, Graph
from tests.conftest import perturb_bn


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
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "slimgraph":
                    raise ImportError("slimgraph is blocked in this process")
        sys.meta_path.insert(0, Block())
        import torch
        spec = importlib.util.spec_from_file_location("model", {str(tmp_path / "out" / "model.py")!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        net = mod.load({str(tmp_path / "out")!r})
        y = net(torch.load({str(tmp_path / "x.pt")!r}))
        ref = torch.load({str(tmp_path / "y.pt")!r})
        assert "slimgraph" not in sys.modules
        print("relerr", float((y - ref).abs().max() / ref.abs().max()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) < 1e-5


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
