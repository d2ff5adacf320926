"""Pipeline strings: ``"dce,fold-bn,prune{ratio=0.5,ignore=[fc,conv1]}"`` -> Pass objects."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from slimgraph.errors import PassError
from slimgraph.passes.base import Pass, make_pass

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")

# Named pipelines for one target, as Optimum's O1-O4 are: each expands to the passes that measured
# fastest there (bench/transformers.py, bench/winograd.py) and skips what did not pay, whatever the
# model (a pass that finds nothing to do on it changes nothing). A preset combines with other
# passes in one pipeline string: "onnxruntime-fp32,prune{ratio=0.3}".
PRESETS: dict[str, tuple[str, str]] = {
    "onnxruntime-fp32": (
        "fold-bn,canonicalize",
        "exact fp32 for onnxruntime's CPU provider: BatchNorm folded, constants folded, identities and "
        "dead code gone. Its session optimizer fuses BiasGelu and MatMul chains itself; the fused kernels of "
        "`fuse` (MultiHeadAttention, SkipLayerNormalization) and Winograd measured slower there, so they stay out"),
}


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
            if options:
                raise PassError(f"preset {name!r} takes no options (it expands to {PRESETS[name][0]!r})")
            passes.extend(parse_pipeline(PRESETS[name][0]))
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
