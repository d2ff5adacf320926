"""Emitted PyTorch modules on a GPU: fp32 vs fp16 vs bf16, and pruned vs original.

Writes bench/results/gpu.md. Usage: python bench/gpu.py [--model resnet50] [--batch 32] [--repeats 21]
Needs a CUDA device (``--device cpu`` runs the same code path on a CPU, for checking the script).
Every variant is built on the CPU by slimgraph (``to_torch()`` of the imported, fp16/bf16 and
pruned graphs), moved to the device, warmed up, then timed with CUDA events: each repetition runs
every variant once in a rotating order, and the table reports medians and the median of the
per-repetition ratios to the fp32 module.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

import slimgraph


def build_variants(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    """name -> module; the fp16/bf16 modules take and return float32 (the passes place the casts)."""
    graph = slimgraph.import_model(model, (x,))
    folded = slimgraph.optimize(graph, "fold-bn", example_inputs=(x,)).graph
    pruned = slimgraph.optimize(folded, "prune{ratio=0.5}", example_inputs=(x,)).graph
    return {
        "original (torchvision)": model,
        "fp32": slimgraph.to_torch(graph),
        "fp32 fold-bn": slimgraph.to_torch(folded),
        "fp16": slimgraph.optimize(folded, "fp16", example_inputs=(x,)).to_torch(),
        "bf16": slimgraph.optimize(folded, "bf16", example_inputs=(x,)).to_torch(),
        "pruned 0.5 fp32": slimgraph.to_torch(pruned),
        "pruned 0.5 fp16": slimgraph.optimize(pruned, "fp16", example_inputs=(x,)).to_torch(),
    }


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def time_call(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return time_call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU machine (or pass --device cpu to check the script)")
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    x_cpu = torch.randn(1, 3, args.size, args.size)
    variants = build_variants(model, x_cpu)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    runners, errors = {}, {}
    with torch.no_grad():
        reference = variants["fp32"].to(device)(x).float()
        for name, module in variants.items():
            module = module.to(device).eval()
            runners[name] = (lambda m: lambda: m(x))(module)
            out = runners[name]().float()
            errors[name] = float((out - reference).abs().max() / reference.abs().max())
        for run in runners.values():  # warm-up: cuDNN autotuning, lazy init
            for _ in range(3):
                run()
        time_call = timer(device)
        names = list(runners)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                times[name].append(time_call(runners[name]))
    base = times["fp32"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"# {args.model} emitted by slimgraph on {where}",
        "",
        f"torch {torch.__version__}, batch {args.batch}, {args.size}x{args.size}, {args.repeats} interleaved "
        "repetitions, medians; `vs fp32` is the median of per-repetition ratios to slimgraph's fp32 module "
        "(> 1: faster). "
        "`error` is the max abs difference to the fp32 module's logits over their max abs value.",
        "",
        "| variant | ms | vs fp32 | error |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        speedup = statistics.median(b / t for b, t in zip(base, times[name]))
        lines.append(f"| {name} | {statistics.median(times[name]):.2f} | {speedup:.2f}x | {errors[name]:.1e} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
