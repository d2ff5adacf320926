"""Generation with a key/value cache: time per new token at past length 16 and 512.

A Llama-architecture decoder (random init from its config) goes through
``optimize(model, "dce", example_inputs=(input_ids,), kv_cache=True)``; its step graph runs in
onnxruntime and as the emitted PyTorch module. For each past length the cache is filled by running
a prompt of that length once, then one new token is timed against it: both lengths in the same
loop (interleaved), one thread, medians. With the cache a step reads the past's keys and values
once (attention is linear in the past) and recomputes nothing of the prefix; without it (the last
column) every token reruns the whole sequence. Writes bench/results/kv_cache.md.

Usage: python bench/kv_cache.py [--repeats 31]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import slimgraph

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
from bench.ort_common import cpu_name  # noqa: E402

OUT = Path(__file__).parent / "results" / "kv_cache.md"
PASTS = (16, 512)


def models():
    import transformers as T

    yield "the test model (tests/test_kv_cache.py: 2 layers, 32 wide, 4 heads, 2 kv heads, vocab 96)", \
        T.LlamaForCausalLM(T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    yield "Llama (4 layers, 512 wide, 8 heads, 2 kv heads, SwiGLU 1408, vocab 32000)", T.LlamaForCausalLM(
        T.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2))


def step_feeds(step, past_len: int, vocab: int) -> dict[str, torch.Tensor]:
    """The feeds of one new token after a prompt of ``past_len`` tokens (the cache filled by the step itself)."""
    from slimgraph.frontends.torch.kv_cache import positions_of

    gen = torch.Generator().manual_seed(past_len)
    prompt = torch.randint(3, vocab, (1, past_len), generator=gen)
    mask = torch.ones_like(prompt)
    past = {name: torch.zeros(1, h, 0, d, dtype=dtype) for name, ((h, d), dtype) in step.past.items()}
    feeds = {"input_ids": prompt, "attention_mask": mask, "position_ids": positions_of(mask, past_len), **past}
    out = step.run({n: feeds[n] for n in step.inputs})
    mask = torch.ones(1, past_len + 1, dtype=torch.long)
    feeds = {"input_ids": torch.randint(3, vocab, (1, 1), generator=gen), "attention_mask": mask,
             "position_ids": positions_of(mask, 1)}
    feeds |= {name: out[name.replace("past_key_values", "present")] for name in past}
    return {n: feeds[n] for n in step.inputs}


def full_forward(model: torch.nn.Module, length: int, vocab: int):
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))

    def run():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return run


def main() -> None:
    from slimgraph.generate import _graph_step

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# Generation with a key/value cache: time per new token at past length 16 and 512",
        "",
        f"Measured by bench/kv_cache.py on {cpu_name()}, torch {torch.__version__}: random-init Llama-architecture "
        f"models from configs, batch 1, one thread, {args.repeats} interleaved repetitions, medians. The step graph "
        "is `optimize(model, \"dce\", example_inputs=(input_ids,), kv_cache=True)`; a step is one new token "
        "against a cache filled by a prompt of the past length. 'No cache' is the eager model rerunning the whole "
        "sequence for that token (what a graph without past_key_values does).",
        "",
    ]
    for title, model in models():
        model.eval()
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        result = slimgraph.optimize(model, "dce", example_inputs=(ids,), kv_cache=True)
        built = time.perf_counter() - start
        steps = {backend: _graph_step(result.graph, backend) for backend in ("onnxruntime", "torch")}
        runs = {}
        for backend, step in steps.items():
            for past in PASTS:
                feeds = step_feeds(step, past, vocab)
                runs[(backend, past)] = (lambda s=step, f=feeds: s.run(f))
        for past in PASTS:
            runs[("no cache", past)] = full_forward(model, past + 1, vocab)
        times: dict = {key: [] for key in runs}
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for key, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - start) * 1e3)
        median = {key: statistics.median(t) for key, t in times.items()}
        params = sum(p.numel() for p in model.parameters())
        lines += [f"## {title}", "", f"{params / 1e6:.2f}M parameters; optimize with kv_cache=True took {built:.1f} s.",
                  "", "| runtime | ms per token, past 16 | ms per token, past 512 | 512 / 16 |", "|---|---:|---:|---:|"]
        for backend in ("onnxruntime", "torch", "no cache"):
            short, long = median[(backend, 16)], median[(backend, 512)]
            label = {"torch": "emitted PyTorch module", "no cache": "no cache (eager, whole sequence)"}.get(
                backend, backend)
            lines.append(f"| {label} | {short:.3f} | {long:.3f} | {long / short:.2f} |")
        lines.append("")
        print("\n".join(lines[-8:]), flush=True)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
