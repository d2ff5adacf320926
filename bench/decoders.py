"""Decoders on onnxruntime: GPT-2 and Llama-architecture models (random init from configs) through
slimgraph's presets, against torch.onnx.export -> onnxruntime's transformers optimizer ->
quantize_dynamic built in the same run.

The whole-sequence forward (no KV cache: that is issue 15's), batch 1, sequence 128, one thread,
every path once per repetition (interleaved), medians. Accuracy against the PyTorch model in fp32
on held-out random token sequences (the weights are random, so there are no real sentences to
prefer): the relative error of the logits and how often the next-token argmax agrees.
Writes bench/results/decoders.md.

Usage: python bench/decoders.py [--repeats 21]
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

ROOT = Path(__file__).resolve().parent.parent
# run as a script, this file's folder leads sys.path: the repository must, for bench.ort_common
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
from bench.ort_common import anchor_paths, cpu_name, feeds_for, profile_table, session  # noqa: E402

OUT = Path(__file__).parent / "results" / "decoders.md"
NAMES = ["input_ids", "attention_mask"]
SEQ = 128


def models():
    import transformers as T

    yield "GPT-2 (6 layers, 768 wide, 12 heads, vocab 50257)", T.GPT2LMHeadModel(T.GPT2Config(
        n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)), "gpt2", 12, 768
    yield "Llama (6 layers, 768 wide, 12 heads, 4 kv heads, SwiGLU 2048, vocab 32000)", T.LlamaForCausalLM(
        T.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)), "gpt2", 12, 768


class LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def token_batches(vocab: int, count: int, seed: int, lengths: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab, (1, n), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def build_paths(model, model_type: str, heads: int, hidden: int, folder: Path) -> tuple[dict[str, str], dict, dict]:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))
    trace = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # batch 2: batch and seq stay symbolic
    paths, fused = anchor_paths(LogitsOnly(model), trace, "logits", folder, model_type, heads, hidden)
    dims = {n: {0: "batch", 1: "seq"} for n in NAMES}
    calibration = [tuple(b[n] for n in NAMES) for b in token_batches(vocab, 16, 1, (32, 96))]
    chosen = {}
    for label, passes in [("slimgraph onnxruntime-fp32", "onnxruntime-fp32"),
                          ("slimgraph onnxruntime-int8", "onnxruntime-int8")]:
        result = slimgraph.optimize(model, passes, example_inputs=trace, dynamic_dims=dims,
                                    calibration_data=calibration)
        path = folder / (re.sub(r"\W+", "_", label) + ".onnx")
        result.to_onnx(path)
        paths[label] = str(path)
        stats = {r.name: r.pass_stats for r in result.trace}
        if "quantize" in stats:
            chosen = {"pipeline": " -> ".join(str(r.pipeline_item) for r in result.trace),
                      "smoothing alpha": stats["smooth"].get("alpha"),
                      "dynamic int8 linears": stats["quantize"]["quantized_ops"],
                      "linears kept float": stats["quantize"].get("kept_float_by_auto", [])}
    return paths, fused, chosen


def measure(name: str, model, model_type: str, heads: int, hidden: int, repeats: int) -> str:
    model.eval()
    vocab = model.config.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths, fused, chosen = build_paths(model, model_type, heads, hidden, Path(tmp))
        built = time.perf_counter() - start
        sessions = {label: session(path) for label, path in paths.items()}
        held_out = token_batches(vocab, 8, 2, (SEQ, SEQ))
        errors: dict[str, list[float]] = {label: [] for label in ["PyTorch eager", *sessions]}
        agree: dict[str, list[float]] = {label: [] for label in errors}
        for batch in held_out:
            with torch.no_grad():
                want = model(**batch, use_cache=False).logits.double().numpy()
            feed = {k: v.numpy() for k, v in batch.items()}
            for label in errors:
                got = want if label == "PyTorch eager" else \
                    sessions[label].run(None, feeds_for(sessions[label], feed))[0].astype(np.float64)
                errors[label].append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
                agree[label].append(float((got.argmax(-1) == want.argmax(-1)).mean()))
        one = {k: v.numpy() for k, v in held_out[0].items()}
        one_t = held_out[0]
        times: dict[str, list[float]] = {label: [] for label in errors}
        for _ in range(repeats):
            for label in times:
                start = time.perf_counter()
                if label == "PyTorch eager":
                    with torch.no_grad():
                        model(**one_t, use_cache=False)
                else:
                    sessions[label].run(None, feeds_for(sessions[label], one))
                times[label].append(time.perf_counter() - start)
        profile = profile_table(paths, ["+ quantize_dynamic (int8)", "slimgraph onnxruntime-fp32",
                                        "slimgraph onnxruntime-int8"], one, 10, Path(tmp))
    medians = {label: statistics.median(t[2:]) * 1000 for label, t in times.items()}
    base, dyn = medians["+ transformers optimizer"], medians["+ quantize_dynamic (int8)"]
    rows = [f"| {label} | {ms:.1f} | {ms / base:.2f} | {ms / dyn:.2f} | {max(errors[label]):.2e} | "
            f"{min(agree[label]):.4f} |" for label, ms in medians.items()]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"## {name}\n\n{params:.0f}M parameters; paths built in {built:.0f} s. onnxruntime's transformers "
            f"optimizer (model_type {model_type}) fused: {fused}. onnxruntime-int8 chose: {chosen}.\n\n"
            "| path | latency ms | vs optimizer | vs quantize_dynamic | max rel. error of logits | "
            "min next-token agreement |\n|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) +
            "\n\nMilliseconds per run in each op type (onnxruntime's profiler, 10 runs after 3 warm-up runs):\n\n"
            + profile + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import onnxruntime as ort

    sections = [measure(name, model, model_type, heads, hidden, args.repeats)
                for name, model, model_type, heads, hidden in models()]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        "# Decoders on onnxruntime: slimgraph's presets against export -> optimizer -> quantize_dynamic\n\n"
        f"Measured by bench/decoders.py on {cpu_name()}, onnxruntime {ort.__version__}, torch {torch.__version__}: "
        f"random-init models from configs, the whole-sequence forward at batch 1, sequence {SEQ}, one thread, "
        f"{args.repeats} interleaved repetitions, medians. Accuracy on 8 held-out random sequences against the "
        "fp32 PyTorch model; slimgraph's int8 calibrates on 16 other random sequences (lengths 32-96).\n\n"
        + "\n".join(sections))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
