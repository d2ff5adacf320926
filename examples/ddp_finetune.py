"""Fine-tuning after pruning, and quantization-aware training, on several processes with
DistributedDataParallel: slimgraph's outputs are plain nn.Modules, so torch.distributed scales
their training out as it does any model's. A template to copy.

    torchrun --standalone --nproc_per_node=2 examples/ddp_finetune.py --out out/ddp

(``--nnodes=N --node_rank=i --master_addr=HOST --master_port=PORT`` on each of N machines.) The
gloo backend runs on CPUs; on GPUs pass ``--backend nccl``, and in ``data_parallel`` and ``fit``
move the module and the batches to ``cuda:LOCAL_RANK`` (``DDP(module, device_ids=[local_rank])``).
The task is scikit-learn's digits (8x8 images, shipped with scikit-learn: nothing is downloaded),
a 360-image test split fixed by the seed. On every rank:

1. a small CNN with BatchNorm is trained (DDP, each rank on its shard of the training set);
2. ``slimgraph.iterative_prune`` removes half of its channels in two steps, each followed by
   ``finetune``, which wraps the emitted module in DDP and trains it on the rank's shard;
3. ``fold-bn,quantize`` makes the fake-quant graph; its module is trained under DDP (weights and
   LSQ scales), ``slimgraph.load_weights`` brings the result back, and ``fold-int8`` rounds it.

The rules that make this work, whatever the model:

- Every rank runs the same graph passes on the same inputs, so the graphs (pruned channels,
  calibrated scales) are the same everywhere; the model must start identical on every rank
  (same seed, or one checkpoint), since pruning decisions are taken before DDP first broadcasts.
  DDP's constructor broadcasts rank 0's parameters and buffers, and averages the gradients in
  every backward, so the parameters stay bit for bit the same on every rank.
- BatchNorm's running statistics are buffers, not parameters: each rank updates them on its own
  batches, so after training they differ. ``average_buffers`` makes them the mean over the ranks
  (torch's SyncBatchNorm shares batch statistics in every step, but runs on GPUs only). Do it
  before ``load_weights``, or the ranks' graphs would differ.
- ``slimgraph.load_weights`` takes the module or its DDP wrapper.
- Rank 0 alone writes the models (``--out``); every rank writes ``rank{r}.pt``: what it trained on
  and its final weights, so the ranks can be compared bit for bit (tests/test_ddp.py does).
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import slimgraph


class DigitsCNN(nn.Module):
    """Three conv + BatchNorm + ReLU layers (the second strided), pooling and a classifier."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(cbr(1, width), cbr(width, 2 * width, 2), cbr(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as [N, 1, 8, 8] in [0, 1]: a training set and 360 test images, the
    same split on every rank."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x[order[360:]], y[order[360:]]), TensorDataset(x[order[:360]], y[order[:360]])


def average_buffers(module: nn.Module) -> None:
    """Make every rank's floating-point buffers (BatchNorm running statistics) their mean over the
    ranks. all_reduce gives every rank the same bits, so the ranks' models are then identical."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)  # a sum
            buffer.div_(dist.get_world_size())


def data_parallel(module: nn.Module) -> DDP:
    """``module`` wrapped for training on every rank. DDP's constructor broadcasts rank 0's
    parameters and buffers; each backward then averages the gradients over the ranks. Each rank
    keeps its own BatchNorm statistics while training (``fit`` averages them at the end)."""
    return DDP(module, forward_sync_buffers=False)


def fit(ddp: DDP, data: TensorDataset, epochs: int, lr: float, seed: int, batch: int = 32) -> list[int]:
    """Train the wrapped module in place on this rank's shard of ``data`` (SGD with momentum);
    returns the indices of the examples this rank trained on in the first epoch."""
    sampler = DistributedSampler(data, shuffle=True, seed=seed)  # rank r takes every world_size-th index
    loader = DataLoader(data, batch_size=batch, sampler=sampler)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    ddp.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # another shuffle each epoch, the same on every rank
        for x, y in loader:
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks here
            opt.step()
            sched.step()
    average_buffers(ddp.module)
    ddp.eval()
    sampler.set_epoch(0)
    return list(sampler)


def accuracy(module: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((module.eval()(x).argmax(1) == y).float().mean()) * 100


def conv_channels(graph: slimgraph.Graph) -> list[int]:
    """Output channels of every conv, in graph order."""
    return [n.inputs[1].shape[0] for n in graph.nodes if n.op == "conv"]


def constants(graph: slimgraph.Graph) -> dict[str, torch.Tensor]:
    return {name: v.const_value for name, v in graph.constants.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/ddp", help="folder for the models (rank 0) and rank{r}.pt")
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend: gloo (CPU) or nccl (GPU)")
    parser.add_argument("--width", type=int, default=16, help="the first conv's channels (then 2x, 2x)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the first training")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs after each pruning step")
    parser.add_argument("--qat-epochs", type=int, default=2, help="epochs of quantization-aware training")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of channels pruned")
    parser.add_argument("--steps", type=int, default=2, help="pruning steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()

    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for init_process_group
    dist.init_process_group(args.backend, timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print if rank == 0 else (lambda *a, **k: None)

    # 1. train the model (any trained model will do: it must be the same on every rank)
    train_set, test_set = digits(args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = DigitsCNN(args.width)
    shard = fit(data_parallel(model), train_set, args.epochs, lr=0.05, seed=args.seed)
    acc = {"fp32": accuracy(model, test_set)}
    example = train_set.tensors[0][:1]
    channels = {"before": conv_channels(slimgraph.import_model(model, example))}

    # 2. prune -> fine-tune (under DDP) -> prune again. iterative_prune calls finetune on every
    # rank with the module emitted from the pruned graph, then loads its weights back.
    finetuned: list[nn.Module] = []  # kept only to compare with the graph afterwards

    def finetune(module: nn.Module) -> None:
        fit(data_parallel(module), train_set, args.finetune_epochs, lr=0.02, seed=args.seed + len(finetuned) + 1)
        finetuned.append(module)

    pruned = slimgraph.iterative_prune(model, example, finetune, ratio=args.ratio, steps=args.steps,
                                       criterion="l1")
    acc["pruned"] = accuracy(pruned.to_torch(), test_set)
    channels["pruned"] = conv_channels(pruned.graph)
    log(f"{world} ranks; conv channels {channels['before']} -> {channels['pruned']}")

    # 3. quantization-aware training: the fake-quant graph's module under DDP, back with load_weights
    calibration = [(b,) for b in train_set.tensors[0][:256].split(16)]  # the same batches on every rank
    fq = slimgraph.optimize(pruned.graph, "fold-bn,quantize{progress=false}", calibration_data=calibration)
    acc["int8 calibrated"] = accuracy(slimgraph.optimize(fq.graph, "fold-int8").to_torch(), test_set)
    qat = data_parallel(fq.to_torch())
    fit(qat, train_set, args.qat_epochs, lr=0.002, seed=args.seed + 100)
    acc["fake-quant trained"] = accuracy(qat.module, test_set)
    slimgraph.load_weights(fq.graph, qat)  # weights and learned scales into the graph (DDP or not)
    int8 = slimgraph.optimize(fq.graph, "fold-int8")
    acc["int8 after QAT"] = accuracy(int8.to_torch(), test_set)
    log("test accuracy (%): " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))

    if rank == 0:  # the models, once
        pruned.save_torch(out / "pruned", overwrite=True)
        fq.save_torch(out / "qat", overwrite=True)
        int8.save_torch(out / "int8", overwrite=True)
        int8.to_onnx(out / "int8.onnx", overwrite=True)
    x_test = test_set.tensors[0]
    with torch.no_grad():
        logits = {"pruned": finetuned[-1].eval()(x_test), "qat": qat.module.eval()(x_test)}
    torch.save({"rank": rank, "world": world, "shard": shard, "accuracy": acc, "channels": channels,
                "weights": {"pruned": constants(pruned.graph), "qat": constants(fq.graph),
                            "int8": constants(int8.graph)},
                "trained_logits": logits}, out / f"rank{rank}.pt")
    dist.barrier()
    log(f"wrote {out}/rank0..{world - 1}.pt and the pruned, qat and int8 models")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
