"""Pipeline strings: ``"dce,fold-bn,prune{ratio=0.5,ignore=[fc,conv1]}"`` -> Pass objects."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from slimgraph.errors import PassError
from slimgraph.ir import Graph, get_op
from slimgraph.ir.ops import OPAQUE
from slimgraph.passes.base import Pass, PassContext, PassResult, make_pass

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")

@dataclass(frozen=True)
class Preset:
    """A named pipeline for one target, as Optimum's O1-O4 are, in the form that measured fastest
    there for CNNs (most MACs in convs) and for transformers (most in linears and matmuls):
    bench/transformers.py, bench/quantize.py, bench/winograd.py. A pass that finds nothing to do on
    a model changes nothing, so a preset suits any model of its kind."""

    cnn: str
    transformer: str
    description: str

    def expansion(self, graph: Graph) -> str:
        return self.cnn if model_kind(graph) == "cnn" else self.transformer


PRESETS: dict[str, Preset] = {
    "onnxruntime-fp32": Preset(
        "fold-bn,canonicalize,floor-softmax", "fold-bn,canonicalize,floor-softmax",
        "exact fp32 for onnxruntime's CPU provider: BatchNorm folded, constants folded, identities and dead code "
        "gone, masked softmax inputs floored (no denormal exps). Its session optimizer fuses BiasGelu and MatMul "
        "chains itself; the fused kernels of `fuse` (MultiHeadAttention, SkipLayerNormalization) and Winograd "
        "measured slower there, so they stay out"),
    "onnxruntime-int8": Preset(
        "fold-bn,canonicalize,floor-softmax,quantize,fold-int8",
        "fold-bn,canonicalize,floor-softmax,smooth,quantize{activations=dynamic,skip=[auto],float_budget=0.2}",
        "int8 for onnxruntime's CPU provider, calibrated on calibration_data. CNNs: static QDQ (per-channel "
        "weights, calibrated uint8 activations) that onnxruntime runs as QLinearConv. Transformers: SmoothQuant "
        "(alpha searched end to end), then int8 weights with activations quantized at run time "
        "(DynamicQuantizeMatMul), the linears whose int8 moves the output most (up to a fifth of the MACs) "
        "kept float"),
}


def model_kind(graph: Graph) -> Literal["cnn", "transformer"]:
    """cnn where convs hold most of the MACs, else transformer (linears and matmuls)."""
    macs = {"conv": 0, "other": 0}
    for node in graph.nodes:
        opdef = get_op(node.op) if node.op != OPAQUE else None
        if opdef is not None and opdef.macs is not None and node.op in ("conv", "linear", "matmul"):
            macs["conv" if node.op == "conv" else "other"] += opdef.macs(node)
    return "cnn" if macs["conv"] >= macs["other"] and macs["conv"] > 0 else "transformer"


@dataclass
class PresetPass(Pass):
    """A preset whose passes depend on the model: the pass manager expands it on the graph it runs."""

    preset: str = ""

    def __post_init__(self) -> None:
        self.name = self.preset

    def expand(self, graph: Graph) -> list[Pass]:
        return parse_pipeline(PRESETS[self.preset].expansion(graph))

    def needs_calibration(self) -> bool:
        preset = PRESETS[self.preset]
        return any(p.needs_calibration() for p in parse_pipeline(f"{preset.cnn},{preset.transformer}"))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise PassError(f"preset {self.preset!r} expands on the model; run it with optimize() or a PassManager")

    def __str__(self) -> str:
        return self.preset


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside braces and brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise PassError(f"pipeline {text!r}: unbalanced {ch!r} at position {i}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise PassError(f"pipeline {text!r}: unbalanced braces")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _parse_value(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_parse_value(v) for v in _split_top(inner)] if inner else []
    return text.strip("'\"")


def parse_pipeline(text: str) -> list[Pass]:
    passes = []
    for item in _split_top(text):
        if not item:
            raise PassError(f"pipeline {text!r}: empty pass name")
        name, options = item, {}
        if "{" in item:
            if not item.endswith("}"):
                raise PassError(f"pipeline item {item!r}: options must end with '}}'")
            name, body = item[: item.index("{")].strip(), item[item.index("{") + 1 : -1]
            for pair in _split_top(body) if body.strip() else []:
                if "=" not in pair:
                    raise PassError(f"pass {name!r}: option {pair!r} is not key=value")
                key, value = pair.split("=", 1)
                options[key.strip()] = _parse_value(value)
        if not _NAME.match(name):
            raise PassError(f"pipeline {text!r}: {name!r} is not a pass name")
        if name in PRESETS:
            preset = PRESETS[name]
            if options:
                raise PassError(f"preset {name!r} takes no options (it expands to {preset.transformer!r})")
            cnn = parse_pipeline(preset.cnn)
            if preset.cnn == preset.transformer:
                passes.extend(cnn)
            else:  # both forms checked now, one chosen on the model
                parse_pipeline(preset.transformer)
                passes.append(PresetPass(name))
            continue
        passes.append(make_pass(name, options))
    return passes


def to_passes(passes: str | Sequence[str | Pass] | Pass) -> list[Pass]:
    """Normalize what users give ``optimize``: a pipeline string, or a list of names and passes."""
    if isinstance(passes, Pass):
        return [passes]
    if isinstance(passes, str):
        return parse_pipeline(passes)
    out: list[Pass] = []
    for item in passes:
        if isinstance(item, Pass):
            out.append(item)
        elif isinstance(item, type) and issubclass(item, Pass):
            out.append(item())
        elif isinstance(item, str):
            out.extend(parse_pipeline(item))
        else:
            raise PassError(f"cannot use {item!r} as a pass (give a name, a pipeline string or a Pass)")
    return out
