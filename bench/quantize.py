"""int8 in onnxruntime: fp32 vs onnxruntime's own quantizer vs slimgraph's fold-bn,quantize,fold-int8,
written as QDQ (the default) and as QOperator (``to_onnx(..., quant_format="qoperator")``).

The CPU matters: without VNNI, onnxruntime's u8s8 kernels saturate pairs of products to int16, so
the table names the CPU and its integer path, and has rows for the 7-bit weights that avoid it
(slimgraph's ``cpu=auto`` there, onnxruntime's ``reduce_range=True``) next to the full-range ones.

Writes bench/results/quantize.md: latency (onnxruntime CPU, one thread, interleaved repetitions,
medians), file size, how many convs run as integer kernels, and the logits' cosine against fp32.
Models: torchvision resnet18 and mobilenet_v2, random init with perturbed BatchNorm statistics,
calibrated on the same 32 random 224x224 inputs; cosine on 8 other random inputs (``--size``,
``--calibration`` and ``--held-out`` change those, e.g. for a quick check of the script).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import slimgraph  # noqa: E402
from slimgraph.backends.onnx import onnxruntime_kernels  # noqa: E402
from tests.conftest import perturb_bn  # noqa: E402


def ort_quantize_static(fp32: Path, out: Path, batches: list[tuple[torch.Tensor, ...]], reduce_range: bool = False,
                        weight_type: str = "QInt8") -> None:
    """onnxruntime.quantization's recommended flow: quant_pre_process, then QDQ quantize_static with
    per-channel int8 weights (7-bit with ``reduce_range``), uint8 activations and MinMax calibration."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(fp32)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch[0].numpy()}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, weight_type),
                    calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


VARIANTS = ("fp32", "ort", "ort-7bit", "ort-u8u8", "slimgraph", "slimgraph-8bit", "qoperator")


def bench_model(name: str, folder: Path, repeats: int, calls: int, size: int = 224, n_calibration: int = 32,
                n_held_out: int = 8) -> dict:
    torch.manual_seed(0)
    model = perturb_bn(getattr(torchvision.models, name)().eval())
    gen = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(1, 3, size, size, generator=gen),) for _ in range(n_calibration)]
    gen = torch.Generator().manual_seed(1)
    held_out = [torch.randn(1, 3, size, size, generator=gen) for _ in range(n_held_out)]

    paths = {v: folder / f"{name}_{v}.onnx" for v in VARIANTS}
    slimgraph.optimize(model, "fold-bn", example_inputs=calibration[0]).to_onnx(paths["fp32"], overwrite=True)
    start = time.perf_counter()
    ort_quantize_static(paths["fp32"], paths["ort"], calibration)
    ort_seconds = time.perf_counter() - start
    ort_quantize_static(paths["fp32"], paths["ort-7bit"], calibration, reduce_range=True)
    ort_quantize_static(paths["fp32"], paths["ort-u8u8"], calibration, weight_type="QUInt8")
    start = time.perf_counter()
    result = slimgraph.optimize(model, "fold-bn,quantize{progress=false},fold-int8", example_inputs=calibration[0],
                                calibration_data=calibration)
    result.to_onnx(paths["slimgraph"], overwrite=True)
    ours_seconds = time.perf_counter() - start
    result.to_onnx(paths["qoperator"], overwrite=True, quant_format="qoperator")
    slimgraph.optimize(model, "fold-bn,quantize{progress=false,cpu=vnni},fold-int8", example_inputs=calibration[0],
                       calibration_data=calibration).to_onnx(paths["slimgraph-8bit"], overwrite=True)
    rows_meta = result.trace[1].pass_stats

    sessions = {v: session(p) for v, p in paths.items()}
    feed = {v: {s.get_inputs()[0].name: held_out[0].numpy()} for v, s in sessions.items()}
    rows = {}
    for v, s in sessions.items():
        logits = [s.run(None, {s.get_inputs()[0].name: x.numpy()})[0] for x in held_out]
        rows[v] = {"logits": logits, "size": os.path.getsize(paths[v]), "times": []}
        convs = {op: n for op, n in onnxruntime_kernels(paths[v]).items() if "Conv" in op}  # Conv, FusedConv, ...
        rows[v]["convs"] = f"{convs.get('QLinearConv', 0)}/{sum(convs.values())}"
    for v, s in sessions.items():  # warm-up
        for _ in range(calls):
            s.run(None, feed[v])
    for _ in range(repeats):  # interleaved: a slow minute on the machine hits every variant alike
        for v, s in sessions.items():
            start = time.perf_counter()
            for _ in range(calls):
                s.run(None, feed[v])
            rows[v]["times"].append((time.perf_counter() - start) / calls)
    for row in rows.values():
        row["ms"] = 1000 * statistics.median(row["times"])
        row["cos"] = statistics.mean(cosine(a, b) for a, b in zip(row["logits"], rows["fp32"]["logits"]))
    rows["quantize_seconds"] = {"ort": ort_seconds, "slimgraph": ours_seconds}
    rows["weights"] = f"{rows_meta['weight_bits']}-bit ({rows_meta['cpu']})"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--calibration", type=int, default=32, help="calibration inputs")
    parser.add_argument("--held-out", type=int, default=8, help="inputs the cosine is measured on")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: bench_model(m, Path(tmp), args.repeats, args.calls, args.size, args.calibration,
                                  args.held_out) for m in args.models}
    load_after = os.getloadavg()[0]
    from slimgraph.cpu import integer_isa

    isa = integer_isa()
    lines = [
        "# int8 in onnxruntime: fp32 vs onnxruntime's quantizer vs slimgraph",
        "",
        f"CPU: {cpu_name()}; integer path `{isa}` (slimgraph/cpu.py): "
        + ("onnxruntime's u8s8 kernels add pairs of products into a saturating int16 here, so full-range "
           "int8 weights (**ort**, **slimgraph-8bit**) can give wrong integers; 7-bit weights cannot."
           if isa in ("avx2", "avx512") else "onnxruntime's u8s8 kernels sum exactly here."),
        "",
        f"onnxruntime {ort.__version__}, CPU provider, one thread (intra- and inter-op), default graph "
        f"optimization; {args.repeats} interleaved repetitions of {args.calls} calls, medians. "
        f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after (other work shares this "
        f"{os.cpu_count()}-core machine).",
        "",
        "- **fp32**: slimgraph `fold-bn` emitted to ONNX (the reference for sizes and cosine).",
        "- **ort**: `quant_pre_process` + `quantize_static` (QDQ, per-channel, QInt8 weights, QUInt8 "
        f"activations, MinMax) on the same {args.calibration} calibration inputs ({args.size}x{args.size}).",
        "- **ort-7bit**: the same with `reduce_range=True` (weights in [-64, 64]), onnxruntime's advice for "
        "CPUs without VNNI; **ort-u8u8**: the same with QUInt8 weights (its other advice).",
        "- **slimgraph**: `fold-bn,quantize,fold-int8` (minmax calibration, `cpu=auto`: weights "
        f"{next(iter(results.values()))['weights']}), same inputs, written as QDQ (the default `quant_format`).",
        "- **slimgraph-8bit**: the same with `quantize{cpu=vnni}`: full-range int8 weights whatever this CPU.",
        "- **qoperator**: the same int8 graph written with `quant_format=\"qoperator\"`: QLinearConv, "
        "QGemm, QLinearAdd, ... in the file; `vs QDQ` compares its latency with **slimgraph**'s.",
        "",
        "Models are random-init torchvision constructors with perturbed BatchNorm statistics; cosine is the "
        f"mean over {args.held_out} held-out random inputs of the logits' cosine similarity to fp32. "
        "`int convs` counts QLinearConv among all convs in onnxruntime's optimized graph (level extended).",
        "",
        "| model | variant | latency ms | vs fp32 | vs ort | vs QDQ | file MB | vs fp32 | int convs | cosine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, rows in results.items():
        for v in VARIANTS:
            r = rows[v]
            fp32, baseline, qdq = rows["fp32"], rows["ort"], rows["slimgraph"]
            lines.append(
                f"| {m} | {v} | {r['ms']:.2f} | {fp32['ms'] / r['ms']:.2f}x faster | {r['ms'] / baseline['ms']:.3f}x | "
                f"{r['ms'] / qdq['ms']:.3f}x | {r['size'] / 1e6:.2f} | {r['size'] / fp32['size']:.3f}x | "
                f"{r['convs']} | {r['cos']:.6f} |")
    lines += ["", "Time to quantize (calibration included), seconds:", ""]
    for m, rows in results.items():
        q = rows["quantize_seconds"]
        lines.append(f"- {m}: onnxruntime {q['ort']:.1f}, slimgraph {q['slimgraph']:.1f}")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
