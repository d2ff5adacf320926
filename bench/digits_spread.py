"""The spread of the real-data tests' accuracy figures over seeds and CPU float paths, from which
their bars are set (tests/realdata/): the same experiments, by seed (tests/realdata/digits.py).

A CPU's float path changes the training trajectory (the issue saw 98.61% -> 97.22% on an AVX2-only
machine where a VNNI one gave 98.06%): each run is a fresh process with its float kernels chosen by
environment: ``native`` (what this CPU picks), and ``sse41`` (torch's non-vectorised ATen kernels
and oneDNN capped at SSE4.1, a different summation order everywhere), so one machine measures two
paths. Writes bench/results/digits_spread.md.

    python bench/digits_spread.py --seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"native": {}, "sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}}

# the figures, each a drop in accuracy points from the fp32 model (what the tests bound)
FIGURES = {
    "prune": "slimming prune 50% + fine-tune (width 24)",
    "ptq": "int8 after calibration, worse of torch / onnxruntime (width 16)",
    "qat": "int8 after 2 epochs of QAT, worse of the two",
    "pipeline_prune": "prune 50% + fine-tune (width 16), before int8",
    "pipeline_int8": "then int8, worse of the two, from the pruned model",
    "pipeline": "prune 50% + fine-tune + int8, worse of the two, from fp32",
}


def one_run(seed: int) -> dict:
    import torch

    import slimgraph
    from slimgraph.cpu import integer_isa
    from tests.realdata.digits import (
        both_backends,
        calibrate,
        prune_then_int8,
        quantization_aware_training,
        slimming_prune,
        trained_for_int8,
    )

    torch.set_num_threads(1)
    slimmed = slimming_prune(seed)
    t = trained_for_int8(seed)
    fq, ptq = calibrate(t)
    module = fq.to_torch().train()
    quantization_aware_training(t, module)
    slimgraph.load_weights(fq.graph, module)
    qat = both_backends(slimgraph.optimize(fq.graph, "fold-int8").graph, *t.data[2:])
    pruned, *pipeline = prune_then_int8(t)
    return {"seed": seed, "cpu": integer_isa(), "base24": slimmed.base, "base16": t.base,
            "prune": slimmed.base - slimmed.after, "ptq": t.base - min(ptq), "qat": t.base - min(qat),
            "pipeline_prune": t.base - pruned, "pipeline_int8": pruned - min(pipeline),
            "pipeline": t.base - min(pipeline)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each one thread)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one seed
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "digits_spread.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.one is not None:
        print(json.dumps(one_run(args.one)))
        return

    def child(path: str, seed: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--one", str(seed)], env={**os.environ, **PATHS[path]},
                             cwd=ROOT, capture_output=True, text=True, check=True)
        run = json.loads(out.stdout.strip().splitlines()[-1]) | {"path": path}
        print(run, flush=True)
        return run

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: child(*job), [(p, s) for p in PATHS for s in range(args.seeds)]))
    lines = ["# The real-data tests' figures over seeds and CPU float paths", "",
             f"{args.seeds} seeds x {len(PATHS)} float paths ({', '.join(PATHS)}; see the script) on one "
             f"machine whose integer path is `{runs[0]['cpu']}`. Each figure is a drop in test accuracy points "
             "from the fp32 model (360 test images: one image is 0.28 points); negative is a gain.", "",
             "| figure | min | mean | max | runs |", "|---|---:|---:|---:|---|"]
    for key, label in FIGURES.items():
        values = [r[key] for r in runs]
        lines.append(f"| {key}: {label} | {min(values):.2f} | {statistics.mean(values):.2f} | {max(values):.2f} | "
                     + ", ".join(f"{r['path']}/{r['seed']}: {r[key]:.2f}" for r in runs) + " |")
    for key in ("base24", "base16"):
        values = [r[key] for r in runs]
        lines.append(f"| fp32 accuracy, {key} (%) | {min(values):.2f} | {statistics.mean(values):.2f} | "
                     f"{max(values):.2f} | |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
