"""Low rank and pruning on the real MiniLM: parameters and onnxruntime latency against embedding
cosine, no fine-tuning.

- lowrank: params_ratio per layer from the weights alone, the same with whitening on calibration
  sentences (SVD-LLM), and one global budget over the whitened spectra (``scope=global``).
- prune: whole heads and FFN channels (attention fused first, so heads are units), by weight norm
  (``l2``) and by what the channels carry on calibration sentences (``activation``).

Every path starts from ``onnxruntime-fp32``; latency at batch 1, sequence 128, one thread,
interleaved, medians; min cosine of mean-pooled embeddings of 48 real held-out sentences (one
padded batch) against fp32 PyTorch; 16 other sentences calibrate. Writes
bench/results/compress_transformers.md.

Usage: python bench/compress_transformers.py [--repeats 11]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import slimgraph
from slimgraph.ir import graph_stats

ROOT = Path(__file__).resolve().parent.parent
# run as a script, this file's folder leads sys.path and its name would hide the transformers package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
from bench.ort_common import cosines, cpu_name, feeds_for, mean_pooled, session  # noqa: E402
from tests.realdata.minilm import load_minilm, real_sentences  # noqa: E402

OUT = Path(__file__).parent / "results" / "compress_transformers.md"
FUSED = "onnxruntime-fp32,fuse{ops=[attention]}"


def curves() -> list[tuple[str, str, str]]:
    """(family, setting, pipeline)"""
    rows = [("baseline", "onnxruntime-fp32", "onnxruntime-fp32"), ("baseline", "+ fuse{ops=[attention]}", FUSED)]
    for p in (0.8, 0.6, 0.4):
        rows += [("lowrank, weights only", f"params_ratio={p}", f"onnxruntime-fp32,lowrank{{params_ratio={p}}}"),
                 ("lowrank, whitened", f"params_ratio={p}",
                  f"onnxruntime-fp32,lowrank{{params_ratio={p},whiten=true}}"),
                 ("lowrank, whitened, global budget", f"params_ratio={p}",
                  f"onnxruntime-fp32,lowrank{{params_ratio={p},whiten=true,scope=global}}")]
    for r in (0.1, 0.25, 0.5):
        rows += [("prune heads + FFN, l2", f"ratio={r}", f"{FUSED},prune{{ratio={r},criterion=l2}}"),
                 ("prune heads + FFN, activation", f"ratio={r}", f"{FUSED},prune{{ratio={r},criterion=activation}}")]
    return rows


def linear_params(graph) -> int:
    return sum(n.inputs[1].numel for n in graph.nodes if n.op == "linear")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort
    model, tokenizer = load_minilm()
    found = real_sentences(64)
    checked, calibration_text = found[:48], found[48:]
    trace = dict(tokenizer(checked[:2], padding=True, return_tensors="pt"))
    dims = {name: {0: "batch", 1: "seq"} for name in trace}
    graph = slimgraph.import_model(model, trace, dynamic_dims=dims)
    feed = tuple(trace[v.name] for v in graph.inputs)
    calibration = [tuple(dict(tokenizer([s], return_tensors="pt"))[v.name] for v in graph.inputs)
                   for s in calibration_text]
    text = dict(tokenizer(checked, padding=True, return_tensors="np"))
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in text.items()})[0].double().numpy()
    reference = mean_pooled(hidden, text["attention_mask"])
    one = dict(tokenizer(checked[:1], padding="max_length", max_length=128, return_tensors="np"))

    rows = curves()
    with tempfile.TemporaryDirectory() as tmp:
        sessions, sizes, cos = {}, {}, {}
        for family, setting, pipeline in rows:
            result = slimgraph.optimize(graph, pipeline, example_inputs=feed, calibration_data=calibration)
            path = Path(tmp) / (re.sub(r"\W+", "_", pipeline) + ".onnx")
            result.to_onnx(path)
            s = sessions[pipeline] = session(str(path))
            sizes[pipeline] = (graph_stats(result.graph)["params"], linear_params(result.graph))
            got = mean_pooled(s.run(None, feeds_for(s, text))[0].astype(np.float64), text["attention_mask"])
            cos[pipeline] = cosines(got, reference)
            print(f"{family} {setting}: min cosine {cos[pipeline].min():.4f}", flush=True)
        times: dict[str, list[float]] = {p: [] for p in sessions}
        for _ in range(args.repeats):
            for p, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds_for(s, one))
                times[p].append(time.perf_counter() - start)
    medians = {p: statistics.median(t[1:]) * 1000 for p, t in times.items()}
    base_params, base_linear = sizes["onnxruntime-fp32"]
    base_ms = medians["onnxruntime-fp32"]
    lines = [f"| {family} | {setting} | {sizes[p][0] / base_params:.2f} | {sizes[p][1] / base_linear:.2f} | "
             f"{medians[p] / base_ms:.2f} | {cos[p].min():.4f} | {cos[p].mean():.4f} |" for family, setting, p in rows]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        "# MiniLM compressed without fine-tuning: parameters and latency against embedding cosine\n\n"
        f"Measured by bench/compress_transformers.py on {cpu_name()}, onnxruntime {ort.__version__}, torch "
        f"{torch.__version__}: the real all-MiniLM-L6-v2 weights; every path starts from `onnxruntime-fp32`. "
        f"Latency: batch 1, sequence 128, one thread, {args.repeats} interleaved repetitions, medians, relative "
        f"to `onnxruntime-fp32` ({base_ms:.1f} ms here). Cosine: mean-pooled embeddings of {len(checked)} real "
        f"held-out sentences (one padded batch) against fp32 PyTorch; calibration (whitening, activation norms) "
        f"on {len(calibration_text)} other sentences. Params: all of the model's ({base_params - base_linear} "
        "of them outside the linears, embeddings mostly, untouched) and the linears' alone.\n\n"
        "| family | setting | params | linear params | latency | min cosine | mean cosine |\n"
        "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
