"""Fusion into a runtime's kernels: ``fuse{target=onnxruntime}``.

Attention, as every frontend leaves it (q, k, v split into heads by reshape + permute, then
softmax(q @ k^T * scale + bias) @ v and the heads merged back), becomes one
``multi_head_attention`` node: onnxruntime's com.microsoft MultiHeadAttention kernel, which the
transformers optimizer does not fuse on exported encoders. Canonical ``attention`` nodes (from
nn.MultiheadAttention) become the same node.

The head split and merge are recognised by what they compute, not by their spelling: a chain of
reshapes and permutes is run on a probe tensor and must equal the split (``x.unflatten(-1,
(heads, dim)).transpose(1, 2)``) or the merge, so any order of views that the exporters produce
matches.

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
from slimgraph.ir.ops import run_reference
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.cleanup import eliminate_dead_code

TARGETS = ("onnxruntime",)
FUSIONS = ("attention", "skip_layer_norm")
KERNEL_DTYPES = (DType.float32, DType.float16)  # what onnxruntime's MultiHeadAttention and SkipLayerNorm take
_VIEWS = ("reshape", "permute", "flatten")


def _views_back(value: Value, limit: int = 4) -> list[Node]:
    """The single-use reshape/permute nodes that produce ``value``, nearest last (may be empty)."""
    chain: list[Node] = []
    while value.producer is not None and value.producer.op in _VIEWS and len(chain) < limit:
        chain.insert(0, value.producer)
        value = value.producer.inputs[0]
        if len(value.uses) != 1:
            break
    return chain


def _run_chain(chain: list[Node], x: torch.Tensor) -> torch.Tensor | None:
    try:
        for node in chain:
            (x,) = run_reference(node, [x])
        return x
    except Exception:  # a view that does not apply to the probe: not the map we look for
        return None


def _probe(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)


def split_source(value: Value, transposed: bool = False) -> Value | None:
    """The [batch, seq, heads * dim] value that ``value`` ([batch, heads, seq, dim], or with
    ``transposed`` [batch, heads, dim, seq], as k^T is written at once) splits into heads."""
    if value.rank != 4:
        return None
    batch, heads, seq, dim = value.shape if not transposed else (*value.shape[:2], value.shape[3], value.shape[2])
    chain = _views_back(value)
    for start in range(len(chain)):
        source = chain[start].inputs[0]
        if source.rank != 3 or source.shape != (batch, seq, heads * dim):
            continue
        probe = _probe(source.shape)
        got = _run_chain(chain[start:], probe)
        heads_split = probe.unflatten(-1, (heads, dim))
        want = heads_split.permute(0, 2, 3, 1) if transposed else heads_split.transpose(1, 2)
        if got is not None and torch.equal(got, want):
            return source
    return None


def merge_target(value: Value) -> Value | None:
    """The [batch, seq, heads * dim] value that merges ``value``'s heads ([batch, heads, seq, dim])."""
    if value.rank != 4:
        return None
    batch, heads, seq, dim = value.shape
    probe = _probe(value.shape)
    chain: list[Node] = []
    current = value
    while len(current.uses) == 1 and current.uses[0].node.op in _VIEWS and len(chain) < 4:
        chain.append(current.uses[0].node)
        current = chain[-1].outputs[0]
        if current.rank == 3 and current.shape == (batch, seq, heads * dim):
            got = _run_chain(chain, probe)
            if got is not None and torch.equal(got, probe.transpose(1, 2).flatten(-2)):
                return current
    return None


def _scalar(value: Value) -> float | None:
    if value.is_constant and value.const_value.numel() == 1:
        return float(value.const_value)
    return None


@dataclass
class AttentionMatch:
    q: Value
    k: Value
    v: Value
    bias: Value | None
    scale: float
    heads: int
    output: Value  # the merged [batch, seq, heads * dim] value the fused node replaces
    scores_floored: bool = False  # floor-softmax clamped the scores (exact to drop in a fused kernel)


def unfloored(scores: Value) -> Value:
    """The softmax input before floor-softmax clamped it (max(x, amax(x) - margin)): exact to drop
    where the softmax becomes one fused kernel's."""
    clamp = scores.producer
    if clamp is None or clamp.op != "maximum" or len(scores.uses) != 1:
        return scores
    x, floor = clamp.inputs
    sub = floor.producer
    row_max = sub.inputs[0].producer if sub is not None and sub.op == "sub" else None
    if row_max is None or row_max.op != "amax" or row_max.inputs[0] is not x or len(x.uses) != 2:
        return scores
    return x


def match_attention(softmax: Node) -> AttentionMatch | str:
    """The decomposed attention around ``softmax``, or why it is not one."""
    scores = unfloored(softmax.inputs[0])
    readers = 1 if scores is softmax.inputs[0] else 2  # the floor's amax and maximum read it twice
    if softmax.attrs["axis"] % scores.rank != scores.rank - 1 or scores.rank != 4:
        return "softmax not over the last dim of [batch, heads, seq, seq]"
    out = softmax.outputs[0]
    if len(out.uses) != 1 or out.uses[0].node.op != "matmul" or out.uses[0].index != 0:
        return "softmax is not read by one matmul with v"
    context = out.uses[0].node
    bias = None
    node = scores.producer
    if node is not None and node.op == "add" and len(scores.uses) == readers:
        sides = [i for i in (0, 1) if node.inputs[i].producer is not None and node.inputs[i].producer.op in (
            "mul", "matmul") and node.inputs[i].rank == 4]
        if not sides:
            return "the scores' add has no q @ k^T side"
        bias, scores = node.inputs[1 - sides[0]], node.inputs[sides[0]]
        node = scores.producer
    scale = 1.0
    if node is not None and node.op == "mul" and len(scores.uses) == 1:
        constant = [i for i in (0, 1) if _scalar(node.inputs[i]) is not None]
        if not constant:
            return "the scores are scaled by a tensor, not a number"
        scale = _scalar(node.inputs[constant[0]])
        scores = node.inputs[1 - constant[0]]
        node = scores.producer
    if node is None or node.op != "matmul" or len(scores.uses) != 1:
        return "no q @ k^T matmul"
    q4, kt = node.inputs
    v4 = context.inputs[1]
    heads = q4.shape[1]
    if kt.producer is not None and kt.producer.op == "permute" and list(kt.producer.attrs["perm"]) == [0, 1, 3, 2]:
        k = split_source(kt.producer.inputs[0])
    else:  # k split into heads and transposed by one permute (how the backends write it)
        k = split_source(kt, transposed=True)
    sources = [split_source(q4), k, split_source(v4)]
    if any(s is None for s in sources):
        return "q, k or v is not a head split of a [batch, seq, heads * dim] value"
    merged = merge_target(context.outputs[0])
    if merged is None:
        return "the context is not merged back to [batch, seq, heads * dim]"
    if bias is not None:
        batch, _, seq_q, seq_k = scores.shape
        shape = (1,) * (4 - bias.rank) + tuple(bias.shape)
        if bias.rank > 4 or shape[2:] != (seq_q, seq_k) or shape[0] not in (1, batch) or shape[1] not in (1, heads):
            return f"bias {tuple(bias.shape)} is not [batch or 1, heads or 1, {seq_q}, {seq_k}]"
    return AttentionMatch(*sources, bias, scale, heads, merged, readers == 2)


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
                new = graph.create_node("multi_head_attention", list(node.inputs),
                                        {"num_heads": node.attrs["num_heads"], "scale": node.attrs["scale"]},
                                        name=node.name, before=node, meta=dict(node.meta))
                graph.replace_all_uses_with(node.outputs[0], new.outputs[0])
                fused += 1
            elif skip_norm and node.op == "layer_norm" and self._fuse_skip_layer_norm(graph, node):
                skip_fused += 1
            elif attention and node.op == "softmax":
                found = match_attention(node)
                if not isinstance(found, str) and found.q.dtype not in KERNEL_DTYPES:
                    found = f"onnxruntime's MultiHeadAttention takes float32 or float16, not {found.q.dtype}"
                if isinstance(found, str):
                    skipped[node.name] = found
                    continue
                self._replace(graph, found)
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
    def _replace(graph: Graph, m: AttentionMatch) -> None:
        anchor = m.output.producer
        bias = m.bias
        if bias is not None and bias.rank < 4:
            bias = graph.create_node("unsqueeze", [bias], {"axes": list(range(4 - bias.rank))},
                                     name=f"{anchor.name}_bias4d", before=anchor).outputs[0]
        if bias is not None and bias.dtype != m.q.dtype:
            bias = graph.create_node("cast", [bias], {"dtype": str(m.q.dtype.torch).removeprefix("torch.")},
                                     name=f"{anchor.name}_bias_cast", before=anchor).outputs[0]
        inputs = [m.q, m.k, m.v] + ([bias] if bias is not None else [])
        new = graph.create_node("multi_head_attention", inputs, {"num_heads": m.heads, "scale": m.scale},
                                name=f"{anchor.name}_mha", before=anchor, meta={"origin": "fuse"})
        graph.replace_all_uses_with(m.output, new.outputs[0])
