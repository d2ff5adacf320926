"""scikit-learn's digits as a small real task: 8x8 images upsampled to 32x32, a split per seed;
and the experiments the real-data tests check, by seed, so that bench/digits_spread.py measures the
spread of the very figures the tests assert on (over seeds and CPU float paths)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def digits_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


class DigitsResNet(nn.Module):
    """A small residual CNN: stem, two residual blocks around a strided conv, pooling, classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(1, width)
        self.block1 = nn.Sequential(cbr(width, width), nn.Conv2d(width, width, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(width))
        self.down = cbr(width, 2 * width, 2)
        self.block2 = nn.Sequential(cbr(2 * width, 2 * width), nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = self.down(x)
        x = F.relu(x + self.block2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 0.05,
          slimming: float = 0.0, seed: int = 0) -> nn.Module:
    """SGD with momentum, as network slimming uses: an L1 penalty sparsifies under SGD, while
    Adam's per-parameter scaling keeps every gamma near 1."""
    from slimgraph import bn_l1_penalty

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    # a cosine decay settles the weights (and BatchNorm statistics) for a stable test accuracy
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if slimming:
                loss = loss + bn_l1_penalty(model, slimming)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def both_backends(graph, x, y) -> tuple[float, float]:
    """Test accuracy of the emitted PyTorch module and of the emitted ONNX in onnxruntime."""
    import slimgraph
    from slimgraph.backends.onnx import run_onnxruntime

    torch_acc = accuracy(slimgraph.to_torch(graph).eval(), x, y)
    proto = slimgraph.to_onnx(graph)
    for v in [*proto.graph.input, *proto.graph.output]:  # exported at batch 1: let the batch vary
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.graph.value_info[:]
    (logits,) = run_onnxruntime(proto, [x])
    return torch_acc, float((logits.argmax(1) == y).float().mean()) * 100


# ---------------------------------------------------------------------------- the experiments
@dataclass
class Slimmed:
    """Network slimming on the width-24 CNN, a 50% global bn_gamma prune and a 6-epoch fine-tune."""

    model: nn.Module
    base: float  # fp32 test accuracy, %
    result: object  # slimgraph.iterative_prune's result
    after: float  # pruned + fine-tuned test accuracy, %
    data: tuple


def slimming_prune(seed: int = 0) -> Slimmed:
    import slimgraph

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits_data(seed)
    model = train(DigitsResNet(width=24), xtr, ytr, epochs=10, slimming=1e-3, seed=seed)
    base = accuracy(model, xte, yte)

    def finetune(module):
        train(module, xtr, ytr, epochs=6, lr=0.02, seed=seed + 1)

    result = slimgraph.iterative_prune(model, xtr[:1], finetune, ratio=0.5, steps=1, criterion="bn_gamma",
                                       scope="global")
    after = accuracy(slimgraph.to_torch(result.graph), xte, yte)
    return Slimmed(model, base, result, after, (xtr, ytr, xte, yte))


@dataclass
class Trained:
    """The width-16 CNN trained with slimming, and 32 calibration batches of 8 training images."""

    model: nn.Module
    base: float
    data: tuple
    calibration: list
    seed: int


def trained_for_int8(seed: int = 0) -> Trained:
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits_data(seed)
    model = train(DigitsResNet(width=16), xtr, ytr, epochs=8, slimming=1e-3, seed=seed)  # sparse gammas to prune
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed + 3))
    calibration = [(b,) for b in xtr[order[:256]].split(8)]
    return Trained(model, accuracy(model, xte, yte), (xtr, ytr, xte, yte), calibration, seed)


def calibrate(t: Trained):
    """fold-bn,quantize on the trained model: the fake-quant result, and the int8 accuracies
    (torch, onnxruntime) after fold-int8."""
    import slimgraph

    fq = slimgraph.optimize(t.model, "fold-bn,quantize{progress=false}", example_inputs=t.data[0][:1],
                            calibration_data=t.calibration)
    return fq, both_backends(slimgraph.optimize(fq.graph, "fold-int8").graph, *t.data[2:])


def quantization_aware_training(t: Trained, module: nn.Module) -> None:
    """Two epochs of QAT at a small rate on the emitted fake-quant module (weights and scales)."""
    train(module, t.data[0], t.data[1], epochs=2, lr=0.001, seed=t.seed + 2)


def prune_then_int8(t: Trained) -> tuple[float, float, float]:
    """A 50% bn_gamma prune + 6-epoch fine-tune, then fold-bn,quantize,fold-int8: the pruned fp32
    accuracy and the int8 accuracies (torch, onnxruntime)."""
    import slimgraph

    xtr, ytr, xte, yte = t.data

    def finetune(module):
        train(module, xtr, ytr, epochs=6, lr=0.02, seed=t.seed + 1)

    pruned = slimgraph.iterative_prune(t.model, xtr[:1], finetune, ratio=0.5, steps=1, criterion="bn_gamma",
                                       scope="global")
    pruned_acc = accuracy(slimgraph.to_torch(pruned.graph), xte, yte)
    result = slimgraph.optimize(pruned.graph, "fold-bn,quantize{progress=false},fold-int8",
                                calibration_data=t.calibration)
    assert any(n.op == "dequantize_linear" for n in result.graph.nodes)
    return (pruned_acc, *both_backends(result.graph, xte, yte))
