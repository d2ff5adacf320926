"""Fusion into a runtime's kernels: ``fuse{target=onnxruntime}``.

Attention, as every frontend leaves it (q, k, v split into heads by reshape + permute, then
softmax(q @ k^T * scale + mask) @ v and the heads merged back; matched as attention.py says), and
canonical ``attention`` nodes (from nn.MultiheadAttention, or attention-form) become one
``multi_head_attention`` node: onnxruntime's com.microsoft MultiHeadAttention kernel, which the
transformers optimizer does not fuse on exported encoders. A mask goes in as the kernel's
``attention_bias`` input (onnxruntime 1.32 takes it on the CPU provider, -inf included), which
must be [batch or 1, heads or 1, seq_q, seq_k] and float: a boolean keep-mask becomes
where(keep, 0, -inf), a mask of lower rank is unsqueezed and one broadcast over the queries
(a padding mask [batch, 1, 1, seq_k]) expanded to seq_q. A mask that does not broadcast so is
left unfused, and the stats say why.

A residual add feeding a LayerNorm becomes ``skip_layer_norm`` (SkipLayerNormalization), taking in
the bias of a linear on either side of the sum; its second output, the sum, feeds the next residual
of pre-LN models. onnxruntime's session optimizer does not make this fusion on the graphs slimgraph
writes (measured on MiniLM: 13 LayerNormalization left). Bias + GELU it does fuse (BiasGelu, 6 of
6), so that one is left to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimgraph.errors import PassError
from slimgraph.ir import DType, Graph, Node, Value
from slimgraph.passes.attention import AttentionMatch, broadcasts, match_attention
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.cleanup import eliminate_dead_code

TARGETS = ("onnxruntime",)
FUSIONS = ("attention", "skip_layer_norm")
KERNEL_DTYPES = (DType.float32, DType.float16)  # what onnxruntime's MultiHeadAttention and SkipLayerNorm take
@register_pass
@dataclass
class Fuse(Pass):
    name = "fuse"
    description = ("rewrite subgraphs into one runtime's fused kernels (target=onnxruntime: MultiHeadAttention, "
                   "SkipLayerNormalization)")
    target: str = "onnxruntime"
    ops: list[str] = field(default_factory=lambda: list(FUSIONS))

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise PassError(f"fuse: target {self.target!r} is not one of {', '.join(TARGETS)}")
        unknown = [op for op in self.ops if op not in FUSIONS]
        if unknown:
            raise PassError(f"fuse: ops {unknown} are not among {', '.join(FUSIONS)}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        fused, skip_fused, skipped = 0, 0, {}
        for node in list(graph.nodes):
            if node.graph is None:
                continue
            attention, skip_norm = "attention" in self.ops, "skip_layer_norm" in self.ops
            if node.op in ("attention", "softmax", "layer_norm") and node.inputs[0].dtype not in KERNEL_DTYPES:
                skipped[node.name] = f"onnxruntime's kernels take float32 or float16, not {node.inputs[0].dtype}"
                continue
            if attention and node.op == "attention" and node.inputs[0].rank == 3 and not node.attrs.get("dropout"):
                why = self._replace_node(graph, node)
                if why is not None:
                    skipped[node.name] = why
                    continue
                fused += 1
            elif skip_norm and node.op == "layer_norm" and self._fuse_skip_layer_norm(graph, node):
                skip_fused += 1
            elif attention and node.op == "softmax":
                found = match_attention(node)
                if not isinstance(found, str) and found.q.dtype not in KERNEL_DTYPES:
                    found = f"onnxruntime's MultiHeadAttention takes float32 or float16, not {found.q.dtype}"
                if not isinstance(found, str):
                    found = self._replace(graph, found)
                if isinstance(found, str):
                    skipped[node.name] = found
                    continue
                fused += 1
        if fused or skip_fused:
            eliminate_dead_code(graph)
        stats = {"attention_fused": fused, "skip_layer_norm_fused": skip_fused}
        if skipped:
            stats["not_attention"] = skipped
        return PassResult(fused + skip_fused > 0, stats)

    @staticmethod
    def _fuse_skip_layer_norm(graph: Graph, norm: Node) -> bool:
        """layer_norm(a + b) over the last dim of [batch, seq, hidden], with constant gamma and beta,
        into skip_layer_norm; a linear's bias on one side of the sum goes into the kernel too."""
        total = norm.inputs[0]
        add = total.producer
        if (add is None or add.op != "add" or len(norm.attrs["normalized_shape"]) != 1 or len(norm.inputs) != 3
                or not all(v is not None and v.is_constant for v in norm.inputs[1:]) or total.rank != 3):
            return False
        x, skip = add.inputs
        if x.shape != total.shape or skip.shape != total.shape or x.dtype != skip.dtype:
            return False  # a broadcast add is not a residual
        inputs = [x, skip, norm.inputs[1], norm.inputs[2]]
        for side in (0, 1):  # the sum's bias from a linear that only feeds it
            linear = inputs[side].producer
            if (linear is not None and linear.op == "linear" and len(linear.inputs) == 3 and len(inputs[side].uses) == 1
                    and linear.inputs[2] is not None and linear.inputs[2].is_constant):
                bare = graph.create_node("linear", linear.inputs[:2], dict(linear.attrs), name=f"{linear.name}_nobias",
                                         before=linear, meta=dict(linear.meta))
                graph.replace_all_uses_with(linear.outputs[0], bare.outputs[0])
                inputs[side], bias = bare.outputs[0], linear.inputs[2]
                inputs.append(bias)
                break
        fused = graph.create_node("skip_layer_norm", inputs, {"eps": norm.attrs["eps"]}, name=f"{norm.name}_skip",
                                  after=add, meta={"origin": "fuse"})
        graph.replace_all_uses_with(norm.outputs[0], fused.outputs[0])
        graph.replace_all_uses_with(total, fused.outputs[1])  # the next residual reads the sum
        return True

    @staticmethod
    def _replace_node(graph: Graph, node: Node) -> str | None:
        """An attention node as multi_head_attention, or why not."""
        q, k, v = node.inputs[:3]
        heads = node.attrs["num_heads"]
        inputs = [q, k, v]
        if len(node.inputs) > 3:
            bias = attention_bias(graph, node.inputs[3], q, k, heads, node, node.name)
            if isinstance(bias, str):
                return bias
            inputs.append(bias)
        new = graph.create_node("multi_head_attention", inputs, {"num_heads": heads, "scale": node.attrs["scale"]},
                                name=node.name, before=node, meta=dict(node.meta))
        graph.replace_all_uses_with(node.outputs[0], new.outputs[0])
        return None

    @staticmethod
    def _replace(graph: Graph, m: AttentionMatch) -> str | None:
        """The written-out attention of ``m`` as multi_head_attention, or why not."""
        anchor = m.output.producer
        bias = None
        if m.bias is not None:
            bias = attention_bias(graph, m.bias, m.q, m.k, m.heads, anchor, anchor.name)
            if isinstance(bias, str):
                return bias
        inputs = [m.q, m.k, m.v] + ([bias] if bias is not None else [])
        new = graph.create_node("multi_head_attention", inputs, {"num_heads": m.heads, "scale": m.scale},
                                name=f"{anchor.name}_mha", before=anchor, meta={"origin": "fuse"})
        graph.replace_all_uses_with(m.output, new.outputs[0])
        return None


def attention_bias(graph: Graph, mask: Value, q: Value, k: Value, heads: int, before: Node, name: str) -> Value | str:
    """``mask`` (additive, or a boolean keep-mask, broadcasting to [batch, heads, seq_q, seq_k]) as
    MultiHeadAttention's attention_bias: q's float dtype, [batch or 1, heads or 1, seq_q, seq_k];
    or why it cannot be."""
    target = (q.shape[0], heads, q.shape[1], k.shape[1])
    if not broadcasts(tuple(mask.shape), target):
        return f"the mask {mask.type_str()} does not broadcast to [batch, heads, seq_q, seq_k]"
    meta = {"origin": "fuse"}

    def add(op: str, inputs: list, attrs: dict | None, suffix: str) -> Value:
        return graph.create_node(op, inputs, attrs, name=f"{name}_{suffix}", before=before, meta=meta).outputs[0]

    dtype = q.dtype.torch
    if mask.dtype == DType.bool:
        mask = add("where", [mask, graph.add_constant(f"{name}_attend", torch.tensor(0.0, dtype=dtype)),
                             graph.add_constant(f"{name}_masked", torch.tensor(float("-inf"), dtype=dtype))],
                   None, "bias")
    elif mask.dtype != q.dtype:
        mask = add("cast", [mask], {"dtype": str(dtype).removeprefix("torch.")}, "bias_cast")
    if mask.rank < 4:
        mask = add("unsqueeze", [mask], {"axes": list(range(4 - mask.rank))}, "bias4d")
    if mask.shape[2:] != target[2:]:  # the kernel broadcasts over batch and heads only
        mask = add("expand", [mask], {"shape": [-1, -1, q.dim(1), k.dim(1)]}, "bias_expanded")
    return mask
