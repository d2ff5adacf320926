"""Time ONNX import + emit (with onnx.checker's full check) of the onnx package's light models.

Writes bench/results/onnx_speed.md. One thread, interleaved repetitions, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import onnx
import torch

from slimgraph.backends.onnx import build_model, check_model
from slimgraph.frontends.onnx import import_onnx

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def run_once(path: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    graph = import_onnx(path)
    t1 = time.perf_counter()
    model = build_model(graph)
    t2 = time.perf_counter()
    check_model(model)
    t3 = time.perf_counter()
    return {"import": t1 - t0, "emit": t2 - t1, "check": t3 - t2, "total": t3 - t0, "nodes": len(graph)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["densenet121", "inception_v2", "resnet50", "shufflenet"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "onnx_speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = {m: LIGHT / f"light_{m}.onnx" for m in args.models}
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in paths}
    for path in paths.values():  # warm-up
        run_once(path)
    for _ in range(args.repeats):
        for m, path in paths.items():
            runs[m].append(run_once(path))
    lines = [
        "# ONNX import + emit, one thread",
        "",
        f"onnx {onnx.__version__}, torch {torch.__version__}; {args.repeats} interleaved repetitions, medians in "
        "seconds. `check` is onnx.checker.check_model(full_check=True), which every emitted model passes.",
        "",
        "| model | ONNX nodes | IR nodes | import | emit | check | total |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        onnx_nodes = len(onnx.load(str(paths[m]), load_external_data=False).graph.node)
        lines.append(f"| {m} | {onnx_nodes} | {int(med['nodes'])} | {med['import']:.3f} | {med['emit']:.3f} | "
                     f"{med['check']:.3f} | {med['total']:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
