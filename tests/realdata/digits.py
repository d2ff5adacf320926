"""scikit-learn's digits as a small real task: 8x8 images upsampled to 32x32, a fixed split."""

from __future__ import annotations

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
