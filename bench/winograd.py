"""3x3 stride-1 convs: direct vs Winograd F(2x2,3x3) vs F(4x4,3x3) in onnxruntime and torch, one thread.

Writes bench/results/winograd.md and (re)writes the cost table the `winograd{tile=auto}` pass
reads, slimgraph/passes/winograd_cost.json, with one set of measurements per backend
(onnxruntime, the pass's default target, and torch). Usage:

    python bench/winograd.py [--repeats 15] [--budget 4] [--max-macs 2e9] [--ort-margin 1.3] [--torch-margin 1.2]
                             [--no-table] [--no-models]

Each variant is what a user gets: a one-conv torch module (conv + ReLU, as every 3x3 conv of
resnet18 and vgg11 is used: onnxruntime fuses the ReLU into a direct conv, not into the
Winograd form's last op) imported by slimgraph, with or
without `winograd{tile=2|4}` forced, emitted by to_onnx() and run in onnxruntime's CPU
provider (intra_op_num_threads=1, default graph optimizations), and emitted by to_torch()
(torch.set_num_threads(1); direct = nn.Conv2d, i.e. oneDNN). Batch 1, square maps, C = K plus
the K = 2C layers of vgg11. Repetitions are interleaved (each one runs all six backend x variant
combinations once, in rotating order), so a noisy neighbour slows all alike; the tables report
medians. Each call is timed by the thread's CPU clock (one thread, and onnxruntime runs on the
calling thread at intra_op_num_threads=1: time other processes take on this 2-core machine is
not counted) and by the wall clock; the cost table uses CPU time. A Winograd tile wins a shape
only if it beats the direct conv by its backend's margin.

Then whole resnet18 and vgg11 (batch 1, 224x224, random init): `fold-bn` against
`fold-bn,winograd` (auto, reading the table just written) and `fold-bn,winograd{tile=4}`, in
onnxruntime (the auto pass's default target) and in torch (with `winograd{target=torch}`).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

import slimgraph
from slimgraph.ir import DType, Graph, run
from slimgraph.passes.winograd import (
    COST_TABLE,
    POINTS,
    TARGETS,
    choose_tile,
    load_cost_table,
    rewrite_conv,
    skip_reason,
)

CHANNELS = [32, 64, 128, 256, 512]
SIZES = [7, 14, 28, 56, 112]
WIDENING = [(64, 128, 112), (128, 256, 56), (256, 512, 28)]  # vgg11's C -> 2C layers: (C, K, H)
VARIANTS = ("direct", "f2", "f4")
BACKENDS = {"onnxruntime": "ort", "torch": "torch"}  # cost-table key -> short column name
# F(4x4,3x3) point sets whose fp32 error the table compares (∞ is always added)
POINT_SETS = {
    "0,±1,1/2,-2 (default)": POINTS[4],
    "0,±1,±1/2": (0, 1, -1, Fraction(1, 2), Fraction(-1, 2)),
    "0,±1,±2": (0, 1, -1, 2, -2),
}
ERROR_SHAPES = [(32, 112), (64, 56), (128, 28), (256, 14), (512, 7)]
MODELS = ("resnet18", "vgg11")
RELAXED = 1.05  # a margin the model tables compare against the shipped one


# ============================================================================ runners
def ort_runner(graph: Graph, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    """A call that runs the emitted ONNX model in onnxruntime's CPU provider on one thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(slimgraph.to_onnx(graph).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feeds)[0]


def torch_runner(graph: Graph, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    module = slimgraph.to_torch(graph)
    return lambda: module(*inputs)


def check_outputs(runners: dict[str, Callable[[], Any]], reference: torch.Tensor, tol: float) -> None:
    """Every variant computes the same function: a benchmark of a wrong graph measures nothing."""
    for name, call in runners.items():
        y = torch.as_tensor(np.asarray(call()))
        err = float((y - reference).abs().max() / reference.abs().max())
        if not err < tol:
            raise RuntimeError(f"{name}: relative error {err:.2e} against the original model")


def time_interleaved(runners: dict[str, Callable[[], Any]], min_reps: int, budget_s: float) -> dict[str, Any]:
    """Median CPU and wall ms per runner; ``min_reps`` rotations, more while ``budget_s`` allows."""
    names = list(runners)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        one_round = 0.0
        for n in names:  # warm-up: allocators, oneDNN and MLAS caches, first-run paths
            runners[n]()
            t0 = time.perf_counter()
            runners[n]()
            one_round += time.perf_counter() - t0
        reps = max(min_reps, min(4 * min_reps, int(budget_s / one_round)))
        for rep in range(reps):
            k = rep % len(names)
            for n in names[k:] + names[:k]:
                w0, c0 = time.perf_counter(), time.thread_time()
                runners[n]()
                cpu[n].append(time.thread_time() - c0)
                wall[n].append(time.perf_counter() - w0)
    return {"cpu": {n: 1000 * statistics.median(v) for n, v in cpu.items()},
            "wall": {n: 1000 * statistics.median(v) for n, v in wall.items()}, "reps": reps}


# ============================================================================ layers
def conv_module(c: int, k: int, seed: int = 0) -> torch.nn.Conv2d:
    """One 3x3 'same' conv with bias, He-initialized so outputs keep the input's scale."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c, k, 3, padding=1)
    with torch.no_grad():
        conv.weight.normal_(0, (2 / (9 * c)) ** 0.5)
        conv.bias.normal_(0, 0.1)
    return conv.eval()


def time_layer(c: int, k: int, h: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """Direct / F(2) / F(4) for one layer, built with slimgraph, in both backends, interleaved."""
    module = torch.nn.Sequential(conv_module(c, k), torch.nn.ReLU()).eval()
    x = (torch.randn(1, c, h, h),)
    graphs = {"direct": slimgraph.import_model(module, x)}
    for m in (2, 4):
        graphs[f"f{m}"] = slimgraph.optimize(module, f"winograd{{tile={m}}}", example_inputs=x, verify=False).graph
    runners = {}
    for variant, graph in graphs.items():
        runners[f"ort {variant}"] = ort_runner(graph, x)
        runners[f"torch {variant}"] = torch_runner(graph, x)
    with torch.no_grad():
        check_outputs(runners, module(*x), 1e-5)
    return time_interleaved(runners, repeats, budget_s)


def layer_row(c: int, k: int, h: int, timed: dict[str, Any], short: str, margin: float) -> tuple[str, dict]:
    """One backend's markdown row and cost-table entry for a timed layer."""
    t, wall = ({v: timed[kind][f"{short} {v}"] for v in VARIANTS} for kind in ("cpu", "wall"))
    r2, r4 = t["direct"] / t["f2"], t["direct"] / t["f4"]
    best = "direct"
    if max(r2, r4) >= margin:
        best = "f2" if r2 > r4 else "f4"
    entry = {"C": c, "K": k, "H": h, "W": h, **{f"{v}_ms": round(t[v], 4) for v in VARIANTS}, "best": best}
    macs = c * k * 9 * h * h
    row = (f"| {c} | {k} | {h}x{h} | {macs / 1e6:.1f} | {t['direct']:.3f} | {t['f2']:.3f} | {t['f4']:.3f} | "
           f"{r2:.2f} | {r4:.2f} | {best} | {wall['direct'] / wall['f2']:.2f} | {wall['direct'] / wall['f4']:.2f} | "
           f"{wall['direct'] / t['direct']:.2f} |")
    return row, entry


# ============================================================================ whole models
def shape_key(node) -> tuple[int, int, int, int]:
    x, w = node.inputs[0], node.inputs[1]
    return x.shape[1], w.shape[0], x.shape[2], x.shape[3]


def rewrite_where(graph: Graph, backend: str, margin: float,
                  keys: set[tuple[int, int, int, int]] | None = None) -> tuple[Graph, dict]:
    """``graph`` with `winograd` (auto) as it would be if ``backend``'s margin were ``margin``,
    only on layers whose (C, K, H, W) is in ``keys`` (all if None); and {key: (tile, count)}."""
    table = copy.deepcopy(load_cost_table())
    for e in table["backends"][backend]["entries"]:
        speedups = {v: e["direct_ms"] / e[f"{v}_ms"] for v in ("f2", "f4")}
        fastest = max(speedups, key=speedups.get)
        e["best"] = fastest if speedups[fastest] >= margin else "direct"
    g, done = graph.clone(), {}
    for node in [n for n in g.nodes if n.op == "conv" and skip_reason(n) is None]:
        key = shape_key(node)
        tile = choose_tile(*key, table, backend)[0] if keys is None or key in keys else None
        if tile is not None:
            rewrite_conv(g, node, tile)
            done[key] = (tile, done.get(key, (tile, 0))[1] + 1)
    return g, done


def tile_counts(done: dict) -> tuple[int, int]:
    """(F(2) layers, F(4) layers) from rewrite_where's {key: (tile, count)}."""
    return tuple(sum(count for t, count in done.values() if t == tile) for tile in (2, 4))


def layer_kind_rows(repeats: int, budget_s: float) -> dict[str, list[str]]:
    """resnet18 with one kind of layer (C, K, H, W) at a time on its fastest tile alone (no margin)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = (torch.randn(1, 3, 224, 224),)
    base = slimgraph.optimize(model, "fold-bn", example_inputs=x, verify=False).graph
    keys = sorted({shape_key(n) for n in base.nodes if n.op == "conv" and skip_reason(n) is None})
    make = {"onnxruntime": ort_runner, "torch": torch_runner}
    runners, done = {}, {}
    for backend in BACKENDS:
        runners[f"{backend} fold-bn"] = make[backend](base, x)
        for key in keys:
            graph, done[backend, key] = rewrite_where(base, backend, 1.0, {key})
            if done[backend, key]:
                runners[f"{backend} {key}"] = make[backend](graph, x)
    timed = time_interleaved(runners, repeats, budget_s)["cpu"]
    table = load_cost_table()["backends"]
    rows: dict[str, list[str]] = {b: [] for b in BACKENDS}
    for (backend, key), kind in done.items():
        if not kind:
            continue
        tile, count = kind[key]
        e = next(e for e in table[backend]["entries"] if (e["C"], e["K"], e["H"], e["W"]) == key)
        rows[backend].append(f"| {key[0]} | {key[1]} | {key[2]}x{key[3]} | {count} | F({tile}) | "
                             f"{e['direct_ms'] / e[f'f{tile}_ms']:.2f} | "
                             f"{timed[f'{backend} fold-bn'] / timed[f'{backend} {key}']:.3f} |")
        print(backend, rows[backend][-1], flush=True)
    return rows


def model_rows(repeats: int, budget_s: float) -> dict[str, list[str]]:
    """fold-bn vs fold-bn,winograd (auto, and at the relaxed margin) vs tile=4, per backend, interleaved."""
    import torchvision

    load_cost_table.cache_clear()  # read the table this run wrote
    pipelines = {
        "onnxruntime": ["fold-bn", "fold-bn,winograd", "fold-bn,winograd{tile=4}"],
        "torch": ["fold-bn", "fold-bn,winograd{target=torch}", "fold-bn,winograd{tile=4}"],
    }
    rows: dict[str, list[str]] = {b: [] for b in pipelines}
    for name in MODELS:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = (torch.randn(1, 3, 224, 224),)
        unique = dict.fromkeys(p for names in pipelines.values() for p in names)  # vgg11 takes seconds each
        results = {p: slimgraph.optimize(model, p, example_inputs=x, verify=False) for p in unique}
        graphs, chosen, label = {}, {}, f"relaxed: auto at margin {RELAXED}"
        for backend, names in pipelines.items():
            for pipeline in names:
                graphs[backend, pipeline] = results[pipeline].graph
                if "winograd" in pipeline:
                    stats = results[pipeline].trace[-1].pass_stats
                    chosen[backend, pipeline] = stats["f2"], stats["f4"]
            graphs[backend, label], done = rewrite_where(graphs[backend, "fold-bn"], backend, RELAXED)
            chosen[backend, label] = tile_counts(done)
        make = {"onnxruntime": ort_runner, "torch": torch_runner}
        runners = {f"{b} {p}": make[b](g, x) for (b, p), g in graphs.items()}
        with torch.no_grad():
            check_outputs(runners, model(*x), 1e-4)
        timed = time_interleaved(runners, repeats, budget_s)
        convs = sum(n.op == "conv" for n in graphs["torch", "fold-bn"].nodes)
        for backend, (base, *others) in pipelines.items():
            t0 = timed["cpu"][f"{backend} {base}"]
            for pipeline in [*others, label]:
                t = timed["cpu"][f"{backend} {pipeline}"]
                f2, f4 = chosen[backend, pipeline]
                same = "" if f2 + f4 else " (the `fold-bn` graph)"
                rows[backend].append(f"| {name} | `{pipeline}` | {f2} F(2), {f4} F(4) of {convs} convs{same} | "
                                     f"{t0:.1f} | {t:.1f} | {t0 / t:.2f} | {timed['reps']} |")
                print(backend, rows[backend][-1], flush=True)
    return rows


# ============================================================================ fp32 error
def conv_graph(c: int, h: int, seed: int) -> Graph:
    conv = conv_module(c, c, seed)
    g = Graph("conv3x3")
    x = g.add_input("x", (1, c, h, h), DType.float32)
    w, b = g.add_constant("w", conv.weight.detach()), g.add_constant("b", conv.bias.detach())
    attrs = {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1}
    g.set_outputs([g.create_node("conv", [x, w, b], attrs, name="conv").output])
    return g


def winograd_graph(graph: Graph, m: int, points=None) -> Graph:
    g = graph.clone()
    rewrite_conv(g, g.find_node("conv"), m, points)
    return g


def layer_errors(c: int, h: int) -> dict[str, tuple[float, float]]:
    """(max, rms) error relative to a float64 conv, for direct, F(2) and each F(4) point set."""
    graph = conv_graph(c, h, seed=1)
    x = torch.randn(1, c, h, h, generator=torch.Generator().manual_seed(2))
    w, b = graph.constants["w"].const_value, graph.constants["b"].const_value
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)

    def err(y: torch.Tensor) -> tuple[float, float]:
        d = y.double() - ref
        return float(d.abs().max() / ref.abs().max()), float(d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())

    out = {"direct": err(run(graph, [x])[0]), "F(2x2,3x3)": err(run(winograd_graph(graph, 2), [x])[0])}
    for name, pts in POINT_SETS.items():
        out[f"F(4x4,3x3) {name}"] = err(run(winograd_graph(graph, 4, pts), [x])[0])
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_table(backends: dict[str, dict[str, Any]], about: str, rule: str) -> None:
    """The cost table, one entry per line: it stays small and its diffs stay readable."""
    parts = [json.dumps({"about": about, "rule": rule, "default": TARGETS[0]}, indent=1, ensure_ascii=False)[:-2]
             + ',\n "backends": {']
    for i, (backend, b) in enumerate(backends.items()):
        head = json.dumps({"about": b["about"], "margin": b["margin"]}, ensure_ascii=False)[:-1]
        parts.append(f'  "{backend}": {head}, "entries": [\n'
                     + ",\n".join("   " + json.dumps(e) for e in b["entries"])
                     + "\n  ]}" + ("," if i < len(backends) - 1 else ""))
    text = "\n".join(parts) + "\n }\n}\n"
    assert json.loads(text)["backends"] == backends
    COST_TABLE.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15, help="minimum interleaved repetitions per shape")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per shape for extra repetitions")
    parser.add_argument("--max-macs", type=float, default=2e9, help="skip shapes with more MACs (run time)")
    # A layer alone flatters Winograd: in a whole model its larger intermediates and transformed
    # weights cost more (caches, allocator page faults), and in onnxruntime it also breaks the
    # chain of NCHWc convs (a layout reorder on each side) and the conv+add+relu fusions. With
    # margin 1.05 torch put resnet18's four 64@56 layers on F(4) (1.10x alone) and the model ran
    # 3-10% slower; in onnxruntime the same four layers (1.19-1.24x alone) made it 4% slower.
    parser.add_argument("--ort-margin", type=float, default=1.3, help="speed-up a tile needs in onnxruntime")
    parser.add_argument("--torch-margin", type=float, default=1.2, help="speed-up a tile needs in torch")
    parser.add_argument("--no-table", action="store_true", help="do not rewrite the cost table")
    parser.add_argument("--no-models", action="store_true", help="skip the whole-model timings")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "winograd.md"))
    args = parser.parse_args()
    margins = {"onnxruntime": args.ort_margin, "torch": args.torch_margin}
    torch.set_num_threads(1)
    start = time.perf_counter()

    shapes = [(c, c, h) for c in CHANNELS for h in SIZES] + WIDENING
    shapes = [(c, k, h) for c, k, h in shapes if c * k * 9 * h * h <= args.max_macs]
    rows: dict[str, list[str]] = {b: [] for b in BACKENDS}
    entries: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    reps = []
    for c, k, h in shapes:
        timed = time_layer(c, k, h, args.repeats, args.budget)
        reps.append(timed["reps"])
        for backend, short in BACKENDS.items():
            row, entry = layer_row(c, k, h, timed, short, margins[backend])
            rows[backend].append(row)
            entries[backend].append(entry)
            print(f"{short:5s} {row}", flush=True)
    timing_s = time.perf_counter() - start

    error_rows = []
    for c, h in ERROR_SHAPES:
        errs = layer_errors(c, h)
        for name, (mx, rms) in errs.items():
            error_rows.append(f"| {c} | {h}x{h} | {name} | {mx:.2e} | {rms:.2e} | {rms / errs['direct'][1]:.2f} |")

    machine = f"{cpu_name()}, onnxruntime {ort.__version__}, torch {torch.__version__}, 1 thread"
    about = (f"Measured by bench/winograd.py on {machine}: a one-conv torch module imported by slimgraph, "
             f"direct vs the winograd pass forced to tile 2 and 4. Batch 1, square maps, C = K and vgg11's "
             f"C -> 2C layers; medians of interleaved repetitions of the thread's CPU time, ms.")
    rule = (f"Per backend: the fastest of direct/f2/f4, where a tile must beat direct by the backend's margin. "
            f"Shapes between measured points take the nearest point in log2 space over (C, K, H, W); equally "
            f"near points that disagree mean direct. `winograd` follows {TARGETS[0]} unless given target=.")
    backend_about = {
        "onnxruntime": "onnxruntime: to_onnx(), CPU provider (MLAS), intra_op_num_threads=1, default optimizations",
        "torch": "torch: to_torch(), torch.set_num_threads(1); direct = nn.Conv2d (oneDNN)",
    }
    if not args.no_table:
        write_table({b: {"about": backend_about[b], "margin": margins[b], "entries": entries[b]} for b in BACKENDS},
                    about, rule)
    models = {} if args.no_models else model_rows(args.repeats, 3 * args.budget)
    kinds = {} if args.no_models else layer_kind_rows(2 * args.repeats, 3 * args.budget)
    total_s = time.perf_counter() - start

    header = ["| C | K | HxW | MMACs | direct ms | F(2) ms | F(4) ms | direct/F(2) | direct/F(4) | best "
              "| wall direct/F(2) | wall direct/F(4) | wall/cpu |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    model_header = ["| model | pipeline | rewritten | fold-bn ms | with pass ms | speed-up | reps |",
                    "|---|---|---|---:|---:|---:|---:|"]
    lines = [
        "# Winograd 3x3 convolution: direct vs F(2x2,3x3) vs F(4x4,3x3)",
        "",
        about,
        "",
        "Times are CPU milliseconds (medians); ratios are direct time / Winograd time (above 1: Winograd",
        "is faster). The wall columns give the same ratios by wall clock, and `wall/cpu` how much longer",
        "the direct conv took by the wall clock (above 1: other processes shared the machine; ratios",
        f"near the margin then move by ±0.1 between runs). Shapes over {args.max_macs:.0e} MACs are not run;",
        f"{min(reps)}-{max(reps)} interleaved repetitions per shape (all six columns of both tables in one loop).",
        "",
        f"`best` is what the cost table records. {rule} Margins: onnxruntime {args.ort_margin}, torch",
        f"{args.torch_margin}. A layer alone flatters Winograd: in a whole model its larger intermediates and",
        "transformed weights (16/9 and 36/9 of the original) cost more (caches, allocator page faults),",
        "and in onnxruntime it also breaks the chain of NCHWc-layout convs (a reorder on each side) and",
        "the conv+add+relu fusions of a residual block. That fixed cost per activation weighs most on",
        f"small layers: the `relaxed` rows below show what a margin of {RELAXED} would do.",
        "",
        f"## {backend_about['onnxruntime']}",
        "",
        *header, *rows["onnxruntime"],
        "",
        f"## {backend_about['torch']}",
        "",
        *header, *rows["torch"],
        "",
        f"Layer timing took {timing_s:.0f} s, the whole bench {total_s:.0f} s.",
        "",
        "The ONNX form's depth-to-space is two transposes that each move one axis, not one 6-D",
        "transpose: onnxruntime's profiler put the 6-D Transpose at 0.78 of 3.0 ms for F(4) at C=K=64",
        "on 56x56 (the two 3-D ones: 0.08 ms); with it F(4) ran at 0.72-0.86x the direct conv there.",
        "",
    ]
    if models:
        lines += [
            "## Whole models",
            "",
            "Batch 1, 224x224, random init, one thread, CPU-time medians of interleaved repetitions (every",
            "row of both tables for one model in one loop). Speed-up = `fold-bn` alone / the pipeline;",
            "`winograd` is auto, following the cost table above for its backend. Rows whose graphs are",
            "identical (auto rewriting nothing) show the noise: a few percent either way.",
            "",
            "### onnxruntime",
            "",
            *model_header, *models["onnxruntime"],
            "",
            "### torch",
            "",
            *model_header, *models["torch"],
            "",
            "### One kind of layer at a time in resnet18",
            "",
            "Why the margins: each row rewrites only resnet18's layers of one shape, on the tile that is",
            "fastest for that shape alone (no margin), and compares the whole model with `fold-bn` alone",
            "(interleaved, CPU-time medians). `alone` is the layer table's speed-up for that shape.",
            "",
            "| C | K | HxW | layers | tile | alone | in resnet18 |",
            "|---:|---:|---|---:|---|---:|---:|",
        ]
        for backend in BACKENDS:
            lines += [f"| **{backend}** | | | | | | |", *kinds[backend]]
        lines.append("")
    lines += [
        "## fp32 error against a float64 conv",
        "",
        "One random layer per shape (He-initialized weights, N(0,1) input, batch 1, padding 1). max: max |err| /",
        "max |ref|; rms: rms(err) / rms(ref); the last column is rms relative to the direct fp32 conv's.",
        "",
        "| C=K | HxW | algorithm | max rel | rms rel | rms / direct |",
        "|---:|---|---|---:|---:|---:|",
        *error_rows,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}" + ("" if args.no_table else f" and {COST_TABLE}"))


if __name__ == "__main__":
    main()
