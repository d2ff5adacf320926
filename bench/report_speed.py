"""Time OptimizeResult.report() (the HTML report of slimgraph/report.py) on torchvision models
through a four-pass pipeline, one thread; the report's size too.

Writes bench/results/report_speed.md. Usage: python bench/report_speed.py [--repeats 5] [models...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import slimgraph

PIPELINE = "fold-bn,prune{ratio=0.5},quantize,fold-int8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", default=["resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model, x = torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224)
        calibration = [torch.randn(1, 3, 224, 224) for _ in range(2)]
        result = slimgraph.optimize(model, PIPELINE, example_inputs=x, calibration_data=calibration)
        times, size = [], 0
        with tempfile.TemporaryDirectory() as folder:
            for i in range(args.repeats):
                start = time.perf_counter()
                path = result.report(Path(folder) / f"{i}.html")
                times.append(time.perf_counter() - start)
                size = path.stat().st_size
        nodes = len(result.snapshots.before.nodes)
        rows.append(f"| {name} | {nodes} | {statistics.median(times):.2f} | {size / 1e6:.2f} |")
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "report_speed.md"
    header = "| model | nodes before | seconds | MB |\n|---|---:|---:|---:|\n"
    out.write_text("# HTML report: time to write it and its size\n\n"
                   f"bench/report_speed.py: `{PIPELINE}` at 224x224, then `result.report(path)`, median of "
                   f"{args.repeats} writes, one thread.\n\n" + header + "\n".join(rows) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
