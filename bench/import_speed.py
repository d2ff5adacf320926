"""Time import + optimize(passes=["dce"]) + to_torch() on torchvision models, one thread.

Writes bench/results/import_speed.md. Usage: python bench/import_speed.py [--repeats 7] [models...]
Each repetition runs every model once (interleaved), and the table reports medians, so a noisy
neighbour slows all models alike instead of one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchvision

import slimgraph


def run_once(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    t0 = time.perf_counter()
    graph = slimgraph.import_model(model, (x,))
    t1 = time.perf_counter()
    result = slimgraph.optimize(graph, ["dce"], example_inputs=(x,))
    t2 = time.perf_counter()
    slimgraph.to_torch(result.graph)
    t3 = time.perf_counter()
    return {"import": t1 - t0, "optimize": t2 - t1, "to_torch": t3 - t2, "total": t3 - t0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["resnet50", "resnet18", "mobilenet_v2", "densenet121"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "import_speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {n: torchvision.models.get_model(n, weights=None).eval() for n in args.models}
    x = torch.randn(1, 3, 224, 224)
    times: dict[str, list[dict[str, float]]] = {n: [] for n in models}
    for m in models.values():  # warm-up (imports, allocator)
        run_once(m, x)
    for _ in range(args.repeats):
        for n, m in models.items():
            times[n].append(run_once(m, x))
    lines = [
        "# import + optimize(dce) + to_torch, one thread",
        "",
        f"torch {torch.__version__}, {args.repeats} interleaved repetitions, medians in seconds. "
        "`optimize` includes verification and the numerical check on one input.",
        "",
        "| model | nodes | import | optimize | to_torch | total |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, runs in times.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        nodes = len(slimgraph.import_model(models[n], (x,)))
        lines.append(f"| {n} | {nodes} | {med['import']:.3f} | {med['optimize']:.3f} | "
                     f"{med['to_torch']:.3f} | {med['total']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
