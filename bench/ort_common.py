"""What the onnxruntime benchmarks share: one-thread sessions, feeds, onnxruntime's per-op profile,
sentence-embedding cosines and the CPU's name."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch


def session(path: str, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def op_profile(path: str, feed: dict[str, np.ndarray], runs: int, folder: Path) -> dict[str, float]:
    """Milliseconds per run spent in each op type, from onnxruntime's own profiler."""
    s = session(path, profile=str(folder / "profile"))
    for _ in range(3):
        s.run(None, feeds_for(s, feed))  # warm-up runs are profiled too: counted apart below
    for _ in range(runs):
        s.run(None, feeds_for(s, feed))
    events = json.loads(Path(s.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (runs + 3)
    totals: dict[str, float] = {}
    for event in kernels[3 * per_run:]:
        op = event["args"]["op_name"]
        totals[op] = totals.get(op, 0.0) + event["dur"] / 1000 / runs
    return totals


def profile_table(paths: dict[str, str], labels: list[str], feed: dict[str, np.ndarray], runs: int, folder: Path
                  ) -> str:
    """Milliseconds per run in each op type, one column per path; ops under 0.05 ms left out."""
    profiles = {label: op_profile(paths[label], feed, runs, folder) for label in labels}
    ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, 0) for p in
                                                                                    profiles.values()))
    head = "| op | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels) + "\n"
    rows = [f"| {op} | " + " | ".join(f"{profiles[label].get(op, 0):.2f}" for label in labels) + " |"
            for op in ops if max(p.get(op, 0) for p in profiles.values()) >= 0.05]
    total = "| **total** | " + " | ".join(f"**{sum(profiles[label].values()):.2f}**" for label in labels) + " |"
    return head + "\n".join(rows + [total]) + "\n"


def feeds_for(s: ort.InferenceSession, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: batch[i.name] for i in s.get_inputs()}


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / m.sum(1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def anchor_paths(module: torch.nn.Module, trace: dict[str, torch.Tensor], output: str, folder: Path,
                 model_type: str, heads: int, hidden: int) -> tuple[dict[str, str], dict[str, int]]:
    """The path people take today, as files in ``folder``: torch.onnx.export (batch and sequence
    dynamic) -> onnxruntime's transformers optimizer -> quantize_dynamic (int8 weights); and what
    the optimizer fused."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    names = list(trace)
    exported = folder / "export.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a copy: the TorchScript exporter leaves the HF model computing something else afterwards
        torch.onnx.export(copy.deepcopy(module), tuple(trace.values()), str(exported), input_names=names,
                          output_names=[output], dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
                          opset_version=17, dynamo=False)
    optimized = optimizer.optimize_model(str(exported), model_type=model_type, num_heads=heads, hidden_size=hidden)
    optimized.save_model_to_file(str(folder / "optimizer.onnx"))
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    quantize_dynamic(str(folder / "optimizer.onnx"), str(folder / "quantize_dynamic.onnx"),
                     weight_type=QuantType.QInt8,  # BiasGelu's outputs have no inferred type: say float
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"torch.onnx.export": str(exported), "+ transformers optimizer": str(folder / "optimizer.onnx"),
            "+ quantize_dynamic (int8)": str(folder / "quantize_dynamic.onnx")}, fused


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "this machine"


NAMES = ["input_ids", "attention_mask", "token_type_ids"]  # MiniLM's inputs, in order


class Exportable(torch.nn.Module):
    """BertModel with positional inputs and a tuple output, for torch.onnx.export."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out[0]
