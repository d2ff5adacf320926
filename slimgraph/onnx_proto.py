"""ONNX protobuf helpers that both the ONNX frontend and the ONNX backend need."""

from __future__ import annotations

import onnx

KV_CACHE_METADATA = "slimgraph.kv_cache"  # metadata_props key of a decoder step: its end and pad tokens


def outer_names(node: onnx.NodeProto) -> list[str]:
    """Tensor names used inside ``node``'s graph attributes but defined outside them."""
    names = []
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            defined = {i.name for i in sub.input} | {t.name for t in sub.initializer} | {""}
            defined |= {t.values.name for t in sub.sparse_initializer}
            for inner in sub.node:
                names += [n for n in list(inner.input) + outer_names(inner) if n not in defined]
                defined.update(inner.output)
    return names
