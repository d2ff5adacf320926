"""Channel pruning, slimgraph vs Torch-Pruning, on the same torchvision models at the same setting.

Writes bench/results/prune.md. Usage: python bench/prune.py [--models resnet18 ...] [--repeats 3]
[--latency-repeats 15]. Needs the optional extra ``bench`` (torch-pruning).

Setting, for both tools: random init (no weights are downloaded), eval mode, one 1x3x224x224 input,
ratio 0.5 per group (uniform, not global), L2 magnitude importance, the classifier kept whole.

* slimgraph: ``import_model`` + ``analyze`` + ``plan_pruning(ratio=0.5, criterion="l2")`` +
  ``apply_plan`` (what ``prune{ratio=0.5,criterion=l2}`` runs, without optimize()'s verification).
  The classifier's output is a graph output, whose shape is never changed.
* Torch-Pruning: ``MetaPruner(model, x, GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
  ignored_layers=[last nn.Linear])`` (the graph building) + ``pruner.step()``.

Every timing is at one thread (``torch.set_num_threads(1)``; onnxruntime intra/inter-op 1). Pruning
times: after an untimed warm-up of both tools on a tiny CNN, each repetition runs both tools once
in alternating order (a fresh copy of the model each time), medians reported. Latency: original,
slimgraph-pruned and Torch-Pruning-pruned models, in torch and in onnxruntime, timed in a rotating
order in every repetition; medians of ms, and of per-repetition ratios.
Params and conv + linear MACs of all three torch modules are counted by the same forward hooks
(slimgraph's ``to_torch`` emits plain nn.Conv2d/nn.Linear modules); Torch-Pruning's own
``tp.utils.count_ops_and_params`` and slimgraph's ``graph_stats`` are reported beside them.
A failure of either tool on a model is recorded in the table, not raised.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch_pruning as tp
import torchvision

import slimgraph
from slimgraph.api import to_onnx, to_torch
from slimgraph.ir.stats import graph_stats
from slimgraph.passes.channels import analyze
from slimgraph.passes.prune import apply_plan, plan_pruning

MODELS = ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0", "regnet_x_400mf",
          "shufflenet_v2_x1_0", "googlenet", "convnext_tiny"]
RATIO = 0.5
NOTES = [
    "- The classifier: Torch-Pruning is told to ignore the final nn.Linear; in slimgraph the classifier's "
    "output is a graph output, whose channels are frozen (the `... is a graph output` line above), and "
    "its input channels follow the pruned features in both tools.",
    "- googlenet: in eval mode its two auxiliary classifiers are not run. slimgraph's graph (and so its "
    "emitted module) does not contain them; Torch-Pruning keeps them in the module unpruned (never traced). "
    "Hence params sg 0.15 vs tp 0.64 for the same MACs: not a pruning difference. With random init its "
    "outputs are dominated by the classifier bias, so its agreement check above says little.",
    "- convnext_tiny: both tools prune the channels a LayerNorm normalizes (slimgraph's "
    "`prune{normalized=prune}`; its default `normalized=freeze` keeps them, because removing one changes "
    "the mean and variance of the others, so the pruned model is no longer the zeroed original; frozen, "
    "only the MLP hidden channels go and MACs are 0.53).",
    "- shufflenet_v2_x1_0: Torch-Pruning's graph building crashes (its channel-shuffle index mapping). "
    "slimgraph prunes it exactly: a channel shuffle needs channel i of each half removed together, and the "
    "blocks' pass-through halves carry those pairs on, so a stage's stream channels form classes that grow "
    "block by block (51 classes of 116 channels after the first block, 2 after the fourth); the stream "
    "goes by whole classes.",
    "- The `torch emit` column is slimgraph's torch emitter without any pruning, against the original "
    "module: about 1.0 since the generated `forward` drops each intermediate after its last use (as "
    "torch.fx's code does); before that fix it kept every intermediate alive and ran 1.5x slower on "
    "densenet121, which showed in the `torch sg` figures.",
    "- The machine is shared (see the load average): single figures, especially onnxruntime on "
    "densenet121, move by 10-30 % from run to run; the ratios are the quantities to read.",
]


def short_error(exc: BaseException) -> str:
    """One table-cell line: the exception type, its message, and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    message = " ".join(str(exc).split())[:160].replace("|", "/")
    return f"{type(exc).__name__}: {message}{where}"


# ============================================================================ pruning
def prune_slimgraph(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    t0 = time.perf_counter()
    graph = slimgraph.import_model(model, (x,))
    t1 = time.perf_counter()
    cg = analyze(graph, normalized=True)  # LayerNorm'd channels too, as Torch-Pruning does
    t2 = time.perf_counter()
    plan = plan_pruning(graph, RATIO, "l2", cg=cg)
    apply_plan(graph, plan)
    t3 = time.perf_counter()
    return {"graph": graph, "cg": cg, "import": t1 - t0, "analysis": t2 - t1, "prune": t3 - t2, "total": t3 - t0}


def prune_torch_pruning(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    model = copy.deepcopy(model)  # pruned in place
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=RATIO, ignored_layers=[classifier])
    t1 = time.perf_counter()
    pruner.step()
    t2 = time.perf_counter()
    return {"module": model.eval(), "graph build": t1 - t0, "step": t2 - t1, "total": t2 - t0}


def time_pruning(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Both tools ``repeats`` times, alternating which goes first; medians and the last results."""
    tools: dict[str, Callable] = {"sg": prune_slimgraph, "tp": prune_torch_pruning}
    runs: dict[str, list[dict]] = {"sg": [], "tp": []}
    errors: dict[str, str] = {}
    for rep in range(repeats):
        for key in (["sg", "tp"] if rep % 2 == 0 else ["tp", "sg"]):
            if key in errors:
                continue
            try:
                runs[key].append(tools[key](model, x))
            except Exception as exc:
                errors[key] = short_error(exc)
    out: dict[str, Any] = {"errors": errors}
    for key, rs in runs.items():
        if rs and key not in errors:
            out[key] = {k: statistics.median(r[k] for r in rs) for k, v in rs[0].items() if isinstance(v, float)}
            out[key + "_last"] = rs[-1]
    return out


# ============================================================================ latency
def ort_session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def export_torch_onnx(module: torch.nn.Module, x: torch.Tensor) -> bytes:
    """torch.onnx.export with the TorchScript exporter (the default, dynamo, needs onnxscript)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    return buf.getvalue()


def torch_runner(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        with torch.inference_mode():
            return module(x).numpy()

    return run


def ort_runner(session: ort.InferenceSession, x: torch.Tensor) -> Callable[[], np.ndarray]:
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feeds)[0]


def time_latency(runners: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    """ms of every repetition per runner; every repetition runs each once, in a rotating order."""
    names = list(runners)
    for name in names:  # warm-up: allocator, kernel selection, ORT's first-run setup
        runners[name]()
        runners[name]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return {k: [t * 1e3 for t in v] for k, v in times.items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float | None:
    """Median over repetitions of a's time / b's time in the same repetition (drift in load cancels)."""
    if a not in times or b not in times:
        return None
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def conv_linear_macs(module: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs of every nn.Conv2d and nn.Linear in one forward: the same count for every module here."""
    total = 0

    def hook(layer: torch.nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, torch.nn.Conv2d):
            total += out.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            total += out.numel() * layer.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.inference_mode():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def count(module: torch.nn.Module, x: torch.Tensor, tp_counter: bool = True) -> dict[str, float]:
    out = {"params": sum(p.numel() for p in module.parameters()), "macs": conv_linear_macs(module, x)}
    if tp_counter:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["tp macs"] = tp.utils.count_ops_and_params(module, x)[0]
        except Exception:
            out["tp macs"] = None
    return out


def frozen_summary(cg: Any) -> str:
    """Output channels of conv/linear layers that slimgraph's analysis froze (left unprunable), per reason."""
    reasons: Counter[str] = Counter()
    total = 0
    for _, space in cg.seeds:
        total += space.size
        for atom in space.atoms():
            if cg.frozen(atom):
                reasons[cg.reason(atom)] += 1
    listed = "; ".join(f"{n} by {reason}" for reason, n in reasons.most_common(4))
    return f"{sum(reasons.values())} of {total}" + (f" ({listed})" if listed else "")


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


# ============================================================================ one model
def bench_model(name: str, repeats: int, latency_repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet's note on its default init
        model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    res: dict[str, Any] = {"name": name}
    pruning = time_pruning(model, x, repeats)
    res["errors"] = dict(pruning["errors"])
    res["sg_time"], res["tp_time"] = pruning.get("sg"), pruning.get("tp")

    res["base"] = count(model, x)
    torch_runners: dict[str, Callable] = {"orig": torch_runner(model, x)}
    ort_runners: dict[str, Callable] = {}
    outputs: dict[str, np.ndarray] = {}

    try:  # the originals in onnxruntime, through each tool's exporter
        ort_runners["orig (torch.onnx)"] = ort_runner(ort_session(export_torch_onnx(model, x)), x)
    except Exception as exc:
        res["errors"]["original, torch.onnx"] = short_error(exc)
    try:
        base_graph = slimgraph.import_model(model, (x,))
        ort_runners["orig (slimgraph)"] = ort_runner(ort_session(to_onnx(base_graph)), x)
        # diagnostic: slimgraph's torch emitter on the unpruned graph, against the original module
        torch_runners["orig (slimgraph)"] = torch_runner(to_torch(base_graph).eval(), x)
    except Exception as exc:
        res["errors"]["original, slimgraph"] = short_error(exc)

    if "sg" in pruning:
        graph = pruning["sg_last"]["graph"]
        own_before = graph_stats(slimgraph.import_model(model, (x,)))
        own_after = graph_stats(graph)
        res["sg_own"] = {k: own_after[k] / own_before[k] for k in ("params", "macs")}
        res["frozen"] = frozen_summary(pruning["sg_last"]["cg"])
        try:
            module = to_torch(graph).eval()
            torch_runners["sg"] = torch_runner(module, x)
            outputs["sg torch"] = torch_runners["sg"]()
            res["sg"] = count(module, x, tp_counter=False)
        except Exception as exc:
            res["errors"]["sg torch"] = short_error(exc)
        try:
            ort_runners["sg"] = ort_runner(ort_session(to_onnx(graph)), x)
            outputs["sg onnx"] = ort_runners["sg"]()
        except Exception as exc:
            res["errors"]["sg onnx"] = short_error(exc)

    if "tp" in pruning:
        module = pruning["tp_last"]["module"]
        try:
            torch_runners["tp"] = torch_runner(module, x)
            outputs["tp torch"] = torch_runners["tp"]()
            res["tp"] = count(module, x)
        except Exception as exc:
            res["errors"]["tp torch"] = short_error(exc)
        try:
            ort_runners["tp"] = ort_runner(ort_session(export_torch_onnx(module, x)), x)
            outputs["tp onnx"] = ort_runners["tp"]()
        except Exception as exc:
            res["errors"]["tp onnx"] = short_error(exc)

    # the same pruned model in both runtimes must agree (a check on the exporters, not on pruning)
    res["agree"] = {k: max_rel_diff(outputs[f"{k} onnx"], outputs[f"{k} torch"])
                    for k in ("sg", "tp") if f"{k} onnx" in outputs and f"{k} torch" in outputs}
    runners = {f"torch {k}": v for k, v in torch_runners.items()} | {f"ort {k}": v for k, v in ort_runners.items()}
    res["ms"] = time_latency(runners, latency_repeats)
    return res


# ============================================================================ report
def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def write_report(results: list[dict], args: argparse.Namespace, load: tuple[float, float], seconds: float) -> str:
    lines = [
        "# prune: slimgraph vs Torch-Pruning, ratio 0.5, L2 magnitude, one thread",
        "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch-pruning "
        f"{tp.__version__} (import name; pip reports the installed distribution), onnxruntime "
        f"{ort.__version__}. torchvision models, random init, eval mode, input 1x3x224x224. "
        f"`torch.set_num_threads(1)` throughout, onnxruntime intra/inter-op threads 1. Pruning times: "
        f"{args.repeats} repetitions alternating which tool goes first, medians. Latency: "
        f"{args.latency_repeats} repetitions, every variant once per repetition in a rotating order, medians "
        "(ratios: medians of per-repetition ratios). "
        f"Load average (1 min) {load[0]:.1f} before, {load[1]:.1f} after (a 2-core machine shared with other "
        f"work); whole run {seconds:.0f} s.",
        "",
        "Settings. slimgraph: `import_model` + `analyze` + `plan_pruning(ratio=0.5, criterion=\"l2\")` + "
        "`apply_plan` (the `prune{ratio=0.5,criterion=l2}` pass; scope uniform, per group). The classifier's "
        "output is a graph output and is never pruned. Torch-Pruning: `MetaPruner(model, x, "
        "GroupMagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[final nn.Linear])` (local, not "
        "global) then `step()`. Importance differs in detail: Torch-Pruning's group L2 also scores BatchNorm "
        "weights and normalizes per group by the mean; slimgraph averages the per-filter L2 norms of the "
        "group's conv/linear weight slices.",
        "",
        "## Analysis + pruning time (seconds, medians)",
        "",
        "slimgraph = import (torch.fx + IR) + analysis + plan/apply; Torch-Pruning = graph building "
        "(one traced forward, inside `MetaPruner(...)`) + `step()`. Last column: slimgraph total / "
        "Torch-Pruning total (< 1: slimgraph faster).",
        "",
        "| model | sg import | sg analysis | sg prune | **sg total** | sg analysis + prune | tp graph build "
        "| tp step | **tp total** | sg / tp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        sg, tpt = r.get("sg_time"), r.get("tp_time")
        sg_cells = (["FAILED"] * 5 if sg is None else
                    [fmt(sg["import"]), fmt(sg["analysis"], 3), fmt(sg["prune"]), f"**{fmt(sg['total'])}**",
                     fmt(sg["analysis"] + sg["prune"])])
        tp_cells = (["FAILED"] * 3 if tpt is None else
                    [fmt(tpt["graph build"]), fmt(tpt["step"]), f"**{fmt(tpt['total'])}**"])
        both = fmt(ratio(sg["total"], tpt["total"])) if sg and tpt else "-"
        lines.append(f"| {r['name']} | " + " | ".join(sg_cells + tp_cells) + f" | {both} |")

    lines += [
        "",
        "## Size: pruned / original",
        "",
        "Params: `sum(p.numel() for p in module.parameters())` (what `tp.utils.count_ops_and_params` counts) of "
        "the original and both pruned torch modules. MACs: every nn.Conv2d and nn.Linear, counted by the same "
        "forward hooks on all three modules (slimgraph's `to_torch` emits nn.Conv2d/nn.Linear/nn.BatchNorm2d "
        "modules). `tp.utils.count_ops_and_params`'s MACs are given for Torch-Pruning (its own counter, which also "
        "counts BatchNorm, activation and pooling modules); on slimgraph's module it would miss the activations, "
        "which are emitted as functions (`F.relu6`), so slimgraph's own count (`graph_stats`, whose params also "
        "include BatchNorm running statistics) is given for slimgraph instead.",
        "",
        "| model | params | MMACs (conv + linear) | params sg | params tp | MACs sg | MACs tp "
        "| MACs sg, graph_stats | MACs tp, tp counter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = r["base"]
        sg, tpr, own = r.get("sg"), r.get("tp"), r.get("sg_own")
        cells = [fmt(ratio(sg["params"], base["params"]), 3) if sg else "FAILED",
                 fmt(ratio(tpr["params"], base["params"]), 3) if tpr else "FAILED",
                 fmt(ratio(sg["macs"], base["macs"]), 3) if sg else "FAILED",
                 fmt(ratio(tpr["macs"], base["macs"]), 3) if tpr else "FAILED",
                 fmt(own["macs"], 3) if own else "FAILED",
                 fmt(ratio(tpr["tp macs"], base["tp macs"]), 3) if tpr else "FAILED"]
        lines.append(f"| {r['name']} | {base['params'] / 1e6:.2f} M | {base['macs'] / 1e6:.0f} | "
                     + " | ".join(cells) + " |")

    lines += [
        "",
        "## Latency, one thread: ms (medians) and pruned / original",
        "",
        "torch: the original nn.Module, slimgraph's `to_torch()` module, Torch-Pruning's pruned module; "
        "`emit` is slimgraph's `to_torch()` of the unpruned import against the original (the emitter's own "
        "cost, no pruning). onnxruntime (default graph optimizations): slimgraph's `to_onnx()` of its pruned "
        "graph against `to_onnx()` of the imported original; Torch-Pruning's pruned module through "
        "`torch.onnx.export(dynamo=False, opset 17)` against the original exported the same way (the default "
        "dynamo exporter needs onnxscript, which is not installed). `sg / tp` compares the two pruned models "
        "directly (< 1: slimgraph's is faster); MACs sg / tp (conv + linear) is beside it for the equal-MACs "
        "reading.",
        "",
        "| model | torch orig ms | torch emit | torch sg | torch tp | torch sg / tp | ort orig ms (sg / torch.onnx) "
        "| ort sg | ort tp | ort sg / tp | MACs sg / tp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ms = {k: statistics.median(v) for k, v in r["ms"].items()}

        def cell(key: str, base: str) -> str:
            if key not in ms:
                return "FAILED"
            return f"{ms[key]:.1f} ({fmt(paired_ratio(r['ms'], key, base))})"

        sg_macs = r["sg"]["macs"] if "sg" in r else None
        tp_macs = r["tp"]["macs"] if "tp" in r else None
        ort_orig = f"{fmt(ms.get('ort orig (slimgraph)'), 1)} / {fmt(ms.get('ort orig (torch.onnx)'), 1)}"
        lines.append(
            f"| {r['name']} | {fmt(ms['torch orig'], 1)} | {cell('torch orig (slimgraph)', 'torch orig')} "
            f"| {cell('torch sg', 'torch orig')} "
            f"| {cell('torch tp', 'torch orig')} | {fmt(paired_ratio(r['ms'], 'torch sg', 'torch tp'))} "
            f"| {ort_orig} | {cell('ort sg', 'ort orig (slimgraph)')} | {cell('ort tp', 'ort orig (torch.onnx)')} "
            f"| {fmt(paired_ratio(r['ms'], 'ort sg', 'ort tp'))} | {fmt(ratio(sg_macs, tp_macs))} |")
    lines += ["", "Cells: median ms (in parentheses: pruned / original of the same runtime and exporter). Every "
              "ratio in this table is the median over repetitions of the two times measured in the same "
              "repetition, not a ratio of the medians."]

    lines += ["", "## Checks and failures", ""]
    for r in results:
        agree = ", ".join(f"{k} {v:.1e}" for k, v in r["agree"].items()) or "-"
        errors = "; ".join(f"**{k}**: {v}" for k, v in r["errors"].items()) or "none"
        lines.append(f"- {r['name']}: onnxruntime vs torch output of the same pruned model, max relative "
                     f"difference: {agree}. conv/linear output channels slimgraph froze: "
                     f"{r.get('frozen', '-')}. Failures: {errors}.")
    lines += ["", "## Notes", "", *NOTES]
    return "\n".join(lines) + "\n"


def warm_up() -> None:
    """Prune a tiny CNN with both tools, untimed: one-time costs (lazy imports, torch.export setup)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    prune_slimgraph(model, x)
    prune_torch_pruning(model, x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--repeats", type=int, default=5, help="pruning-time repetitions per tool")
    parser.add_argument("--latency-repeats", type=int, default=31)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="torch_pruning")
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    warm_up()
    results = []
    for name in args.models:
        t0 = time.perf_counter()
        results.append(bench_model(name, args.repeats, args.latency_repeats))
        print(f"{name} done in {time.perf_counter() - t0:.0f} s; failures: {results[-1]['errors'] or 'none'}",
              flush=True)
    report = write_report(results, args, (load_before, os.getloadavg()[0]), time.perf_counter() - start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
