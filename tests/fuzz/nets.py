"""Random CNNs from a seed, as torch modules (so the torch frontend is exercised too): chains and
DAGs of convs (plain, strided, depthwise, grouped), BatchNorm, activations, residual adds and
multiplies, concats (the same tensor twice too), channel splits and shuffles, pooling, and a
flatten + linear head. One integer reproduces a graph."""

from __future__ import annotations

import math
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


class RandomTransformer(nn.Module):
    """Random encoder-like nets on [batch, seq, width], batch and seq symbolic: linears on 3-D
    inputs, LayerNorm, attention written out (q/k/v, view to heads, permute, scaled scores, an
    optional additive padding mask, softmax) or as scaled_dot_product_attention or
    nn.MultiheadAttention, MLPs, gated products, residual adds, splits and concats on the feature
    dim; token ids through an embedding (int64 inputs) or float features; float32 or float64. Ends
    in a per-token head or a mean over the sequence. One integer reproduces a net."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.seed = seed
        self.heads = rng.choice([1, 2, 4])
        self.width = self.heads * rng.choice([4, 8])
        self.seq = rng.choice([5, 8, 12])
        self.vocab = rng.choice([0, 0, 11])  # > 0: int64 token ids through an embedding
        self.masked = rng.random() < 0.4  # a second input: 1 for tokens, 0 for padding
        self.dtype = torch.float64 if rng.random() < 0.2 else torch.float32
        self.symbolic = rng.random() < 0.5  # imported with symbolic batch and seq (torch.export), else by fx
        self.embed = nn.Embedding(self.vocab, self.width) if self.vocab else nn.Identity()
        self.steps: list[tuple] = []  # (kind, input indices, module name or None, heads)
        widths = [self.width]
        layers = nn.ModuleDict()
        for i in range(rng.randint(2, 8)):
            kind = rng.choice(["attention", "attention", "sdpa", "mha", "mlp", "norm", "linear", "act", "add", "gate",
                               "split", "concat"])
            src = rng.randrange(len(widths)) if rng.random() < 0.3 else len(widths) - 1
            e = widths[src]
            name = f"l{i}"
            heads = rng.choice([h for h in (1, 2, 4) if e % h == 0])
            if kind in ("attention", "sdpa"):
                layers[name] = nn.ModuleList([nn.Linear(e, e, bias=rng.random() < 0.7) for _ in range(4)])
                self.steps.append((kind, (src,), name, heads))
            elif kind == "mha":
                layers[name] = nn.MultiheadAttention(e, heads, batch_first=True)
                self.steps.append((kind, (src,), name, heads))
            elif kind == "mlp":
                hidden = rng.choice([2, 4]) * e
                act = rng.choice([nn.GELU(), nn.ReLU(), nn.SiLU(), nn.GELU(approximate="tanh")])
                layers[name] = nn.Sequential(nn.Linear(e, hidden), act, nn.Linear(hidden, e))
                self.steps.append(("layer", (src,), name, None))
            elif kind == "norm":
                layers[name] = nn.LayerNorm(e)
                with torch.no_grad():  # not the identity init, so folding has something to keep
                    gen = torch.Generator().manual_seed(seed * 100 + i)
                    layers[name].weight.copy_(torch.rand(e, generator=gen) + 0.5)
                    layers[name].bias.copy_(torch.randn(e, generator=gen) * 0.1)
                self.steps.append(("layer", (src,), name, None))
            elif kind == "linear":
                out = rng.choice([e, 8, 16])
                layers[name] = nn.Linear(e, out, bias=rng.random() < 0.7)
                self.steps.append(("layer", (src,), name, None))
                e = out
            elif kind == "act":
                layers[name] = rng.choice([nn.GELU(), nn.Tanh(), nn.Sigmoid(), nn.SiLU()])
                self.steps.append(("layer", (src,), name, None))
            elif kind == "add":
                other = rng.choice([j for j, w in enumerate(widths) if w == e])  # possibly itself: x + x
                self.steps.append(("add", (src, other), None, None))
            elif kind == "gate":  # x * sigmoid(linear(x)), as GLU-style MLPs gate
                layers[name] = nn.Linear(e, e)
                self.steps.append(("gate", (src,), name, None))
            elif kind == "split" and e % 2 == 0:  # halves swapped: the features move, none is lost
                self.steps.append(("split", (src,), None, None))
            elif kind == "concat":
                other = rng.randrange(len(widths))  # possibly itself
                self.steps.append(("concat", (src, other), None, None))
                e += widths[other]
            else:
                continue
            widths.append(e)
        self.layers = layers
        self.pool = rng.random() < 0.5  # mean over the sequence, else a per-token head
        self.head = nn.Linear(widths[-1], rng.choice([3, 5]))
        self.to(self.dtype)

    @property
    def input_names(self) -> list[str]:
        return ["x", "mask"] if self.masked else ["x"]

    @property
    def dynamic_dims(self) -> dict:
        return {name: {0: "batch", 1: "seq"} for name in self.input_names}

    def example(self, batch: int = 2, seq: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        seq = seq or self.seq
        if self.vocab:
            x = torch.randint(0, self.vocab, (batch, seq), generator=gen)
        else:
            x = torch.randn(batch, seq, self.width, generator=gen, dtype=self.dtype)
        if not self.masked:
            return (x,)
        lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(self.dtype)
        return x, mask

    def _attention(self, x, name, heads, bias):
        q_proj, k_proj, v_proj, out = self.layers[name]
        b, n, e = x.shape
        q, k, v = (p(x).view(b, n, heads, e // heads).transpose(1, 2) for p in (q_proj, k_proj, v_proj))
        scores = q @ k.transpose(-2, -1) / math.sqrt(e // heads)
        if bias is not None:
            scores = scores + bias
        y = torch.softmax(scores, dim=-1) @ v
        return out(y.transpose(1, 2).reshape(b, n, e))

    def forward(self, x, mask=None):
        x = self.embed(x)
        bias = None if mask is None else (1.0 - mask)[:, None, None, :] * -1e4
        values = [x]
        for kind, srcs, name, heads in self.steps:
            a = values[srcs[0]]
            if kind == "attention":
                y = self._attention(a, name, heads, bias)
            elif kind == "sdpa":
                q_proj, k_proj, v_proj, out = self.layers[name]
                b, n, e = a.shape
                q, k, v = (p(a).view(b, n, heads, e // heads).transpose(1, 2) for p in (q_proj, k_proj, v_proj))
                y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                y = out(y.transpose(1, 2).reshape(b, n, e))
            elif kind == "mha":
                y = self.layers[name](a, a, a, need_weights=False)[0]
            elif kind == "layer":
                y = self.layers[name](a)
            elif kind == "add":
                y = a + values[srcs[1]]
            elif kind == "gate":
                y = a * torch.sigmoid(self.layers[name](a))
            elif kind == "split":
                first, second = torch.chunk(a, 2, dim=-1)
                y = torch.cat([second, first], dim=-1)
            else:  # concat
                y = torch.cat([a, values[srcs[1]]], dim=-1)
            values.append(y)
        y = values[-1]
        if self.pool:
            y = y.mean(dim=1)
        return self.head(y)
