"""Random CNNs from a seed, as torch modules (so the torch frontend is exercised too): chains and
DAGs of convs (plain, strided, depthwise, grouped), BatchNorm, activations, residual adds and
multiplies, concats (the same tensor twice too), channel splits and shuffles, pooling, and a
flatten + linear head. One integer reproduces a graph."""

from __future__ import annotations

import random

import torch
from torch import nn


class RandomNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.seed = seed
        self.channels = rng.choice([3, 4, 8])
        self.size = rng.choice([7, 8, 11])
        self.steps: list[tuple] = []  # (kind, input indices, module name or None, extra)
        shapes = [(self.channels, self.size)]  # (channels, spatial) of every value so far
        layers = nn.ModuleDict()
        for i in range(rng.randint(3, 10)):
            kind = rng.choice(["conv", "conv", "dwconv", "gconv", "bn", "act", "add", "mul", "concat", "split",
                               "shuffle", "pool"])
            src = rng.randrange(len(shapes)) if rng.random() < 0.3 else len(shapes) - 1
            c, s = shapes[src]
            name = f"l{i}"
            if kind in ("conv", "dwconv", "gconv"):
                groups = c if kind == "dwconv" else (2 if kind == "gconv" and c % 2 == 0 else 1)
                out = c if kind == "dwconv" else rng.choice([4, 6, 8]) * groups
                k, stride = rng.choice([1, 3]), rng.choice([1, 1, 2]) if s > 4 else 1
                layers[name] = nn.Conv2d(c, out, k, stride, k // 2, groups=groups, bias=rng.random() < 0.5)
                self.steps.append(("layer", (src,), name, None))
                shapes.append((out, (s + 2 * (k // 2) - k) // stride + 1))
            elif kind == "bn":
                bn = layers[name] = nn.BatchNorm2d(c)
                with torch.no_grad():  # trained-looking statistics, so folding has something to fold
                    gen = torch.Generator().manual_seed(seed * 100 + i)
                    bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                    bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                    bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                self.steps.append(("layer", (src,), name, None))
                shapes.append((c, s))
            elif kind == "act":
                layers[name] = rng.choice([nn.ReLU(), nn.GELU(), nn.Sigmoid(), nn.Hardswish(), nn.ReLU6()])
                self.steps.append(("layer", (src,), name, None))
                shapes.append((c, s))
            elif kind in ("add", "mul"):
                same = [j for j, shape in enumerate(shapes) if shape == (c, s)]
                other = rng.choice(same)  # possibly itself: x + x
                self.steps.append((kind, (src, other), None, None))
                shapes.append((c, s))
            elif kind == "concat":
                same = [j for j, shape in enumerate(shapes) if shape[1] == s]
                other = rng.choice(same)
                self.steps.append(("concat", (src, other), None, None))
                shapes.append((c + shapes[other][0], s))
            elif kind == "split" and c % 2 == 0:  # halves swapped: the channels move, none is lost
                self.steps.append(("split", (src,), None, None))
                shapes.append((c, s))
            elif kind == "shuffle" and c % 2 == 0:
                self.steps.append(("shuffle", (src,), None, 2))
                shapes.append((c, s))
            elif kind == "pool" and s > 3:
                layers[name] = rng.choice([nn.MaxPool2d(2), nn.AvgPool2d(2)])
                self.steps.append(("layer", (src,), name, None))
                shapes.append((c, s // 2))
        self.layers = layers
        self.head = nn.Linear(shapes[-1][0], rng.choice([3, 5]))

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, self.channels, self.size, self.size, generator=torch.Generator().manual_seed(seed))

    def forward(self, x):
        values = [x]
        for kind, srcs, name, extra in self.steps:
            a = values[srcs[0]]
            if kind == "layer":
                y = self.layers[name](a)
            elif kind == "add":
                y = a + values[srcs[1]]
            elif kind == "mul":
                y = a * values[srcs[1]]
            elif kind == "concat":
                y = torch.cat([a, values[srcs[1]]], dim=1)
            elif kind == "split":
                first, second = torch.chunk(a, 2, dim=1)
                y = torch.cat([second, first], dim=1)
            else:  # shuffle
                b, c, h, w = a.shape
                y = a.view(b, extra, c // extra, h, w).transpose(1, 2).reshape(b, c, h, w)
            values.append(y)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(values[-1], 1), 1))
