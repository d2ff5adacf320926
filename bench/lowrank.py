"""Dense vs low-rank factored linear layers in torch, one thread: where does factoring pay?

Writes bench/results/lowrank.md. Usage: python bench/lowrank.py [--repeats 15]

A layer y = W x + b (W: m x n) against its factors y = B (A x) + b (A: r x n, B: m x r), the
two F.linear calls the lowrank pass emits, at batch 1 and 64 and ranks from min(m, n)/16 up.
Each repetition times every variant once in a rotating order (interleaved), and the tables
report medians.

Cache: a 768x768 weight (2.4 MB) stays in this CPU's L3 between calls, but in a whole model
the other layers' weights evict it, so each layer is read from memory. "cold" timings read a
buffer twice the size of L3 before each call to reproduce that; "warm" timings repeat the call
with everything cached, where thin factors can look faster than their size says.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]  # (out, in) = (m, n)
RANK_FRACTIONS = [Fraction(k, 16) for k in (1, 2, 4, 6, 8, 10, 12, 14, 16)]  # of min(m, n)
BATCHES = [1, 64]


def l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 32 << 20


def time_call(fn, flush: torch.Tensor | None) -> float:
    """Seconds for one call; with ``flush``, after evicting the caches, else after a warm-up call."""
    if flush is None:
        fn()
    else:  # read (not write) it, so no dirty lines are written back during the timed call
        flush.sum()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def break_even(ranks: list[int], factored: list[float], dense: float) -> str:
    """The rank where the factored time crosses the dense time (linear interpolation)."""
    if factored[0] >= dense:
        return f"< {ranks[0]}"
    for (r0, t0), (r1, t1) in zip(zip(ranks, factored), zip(ranks[1:], factored[1:])):
        if t1 >= dense:
            return f"{r0 + (dense - t0) / (t1 - t0) * (r1 - r0):.0f}"
    return f"> {ranks[-1]}"


def bench_shape(m: int, n: int, batch: int, repeats: int, flush: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(m, n, generator=gen), torch.randn(m, generator=gen)
    x = torch.randn(batch, n, generator=gen)
    ranks = sorted({max(1, int(f * min(m, n))) for f in RANK_FRACTIONS})
    factors = {r: (torch.randn(r, n, generator=gen), torch.randn(m, r, generator=gen)) for r in ranks}
    variants = {"dense": lambda: F.linear(x, w, b)}
    for r, (a, bb) in factors.items():
        variants[r] = lambda a=a, bb=bb: F.linear(F.linear(x, a), bb, b)
    names = list(variants)
    times: dict[str, dict] = {"warm": {k: [] for k in names}, "cold": {k: [] for k in names}}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for key in order:
            times["cold"][key].append(time_call(variants[key], flush))
            times["warm"][key].append(time_call(variants[key], None))
    med = {state: {k: statistics.median(v) * 1e3 for k, v in t.items()} for state, t in times.items()}
    return {"ranks": ranks, "ms": med}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowrank.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    l3 = l3_bytes()
    flush = torch.ones(2 * l3 // 4)
    load_before = os.getloadavg()[0]
    results = {}
    for m, n in SHAPES:
        for batch in BATCHES:
            bench_shape(m, n, batch, 1, flush)  # warm-up: allocator, kernels
            results[(m, n, batch)] = bench_shape(m, n, batch, args.repeats, flush)
            print(f"{m}x{n} batch {batch} done", flush=True)
    load_after = os.getloadavg()[0]

    fractions = ", ".join(str(f) for f in RANK_FRACTIONS)
    lines = [
        "# lowrank: dense vs factored linear layers in torch, one thread",
        "",
        f"torch {torch.__version__}, `torch.set_num_threads(1)`, {args.repeats} interleaved repetitions, "
        f"medians. L3 {l3 >> 20} MiB; **cold** = a {2 * l3 >> 20} MiB buffer read before every call "
        "(a layer inside a whole model, whose weights come from memory), **warm** = the same call repeated "
        "(weights up to L3 size stay cached). Shape is W's m x n = out x in; the factored layer is "
        "`F.linear(F.linear(x, A), B, b)` with A r x n, B m x r, as the lowrank pass emits it. "
        f"Ranks r = {fractions} of min(m, n). Load average (1 min) {load_before:.1f} before, "
        f"{load_after:.1f} after (other work shared this 2-core machine).",
        "",
        "## Break-even rank: largest r at which the factored layer is still faster",
        "",
        "| W (out x in) | batch | theory mn/(m+n) | measured, cold | measured, warm |",
        "|---|---:|---:|---:|---:|",
    ]
    for (m, n, batch), res in results.items():
        ranks, ms = res["ranks"], res["ms"]
        cells = [break_even(ranks, [ms[s][r] for r in ranks], ms[s]["dense"]) for s in ("cold", "warm")]
        lines.append(f"| {m}x{n} | {batch} | {m * n / (m + n):.0f} | {cells[0]} | {cells[1]} |")
    for state in ("cold", "warm"):
        lines += [
            "",
            f"## Latency ({state}): dense ms, then dense / factored time per rank (> 1: factoring pays)",
            "",
            "| W (out x in) | batch | dense ms | " + " | ".join(f"r={f}" for f in RANK_FRACTIONS) + " |",
            "|---|---:|---:|" + "---:|" * len(RANK_FRACTIONS),
        ]
        for (m, n, batch), res in results.items():
            ms = res["ms"][state]
            cells = [f"{ms['dense'] / ms[r]:.2f} ({r})" for r in res["ranks"]]
            lines.append(f"| {m}x{n} | {batch} | {ms['dense']:.3f} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
