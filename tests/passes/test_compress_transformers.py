"""Heads and FFN channels pruned, linears factored: the modules slimgraph emits still train."""

from __future__ import annotations

import torch
import transformers

import slimgraph
from tests.frontends.test_transformers import dynamic, text_inputs


def test_pruned_and_factored_bert_trains_back_toward_the_original():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)).eval()
    inputs = text_inputs(2, 12)
    data = [tuple(text_inputs(4, 10, seed=s).values()) for s in range(4)]
    result = slimgraph.optimize(
        model, "fuse{ops=[attention]},prune{ratio=0.5,criterion=activation},"
               "lowrank{params_ratio=0.6,whiten=true,scope=global}",
        example_inputs=inputs, dynamic_dims=dynamic(inputs), calibration_data=data)
    lowrank = result.trace[2].pass_stats
    assert lowrank["factored"] > 0 and result.trace[1].pass_stats["removed"] > 0
    module = result.to_torch().train()
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    batches = [text_inputs(4, 10, seed=10 + s) for s in range(4)]
    with torch.no_grad():
        targets = [model(**b)[:2] for b in batches]  # both outputs: every layer gets a gradient

    def loss() -> torch.Tensor:
        return sum(torch.nn.functional.mse_loss(got, want) for b, t in zip(batches, targets)
                   for got, want in zip(module(*b.values()), t))

    before = float(loss())
    for _ in range(30):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    factors = [p for name, p in module.named_parameters() if name.split(".")[0].endswith(("_u", "_v"))]
    assert factors and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in factors)
    assert float(loss()) < 0.8 * before  # measured 0.63x after 30 steps
