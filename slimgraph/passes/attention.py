"""Attention as one node: the matcher of written-out attention, ``attention-form``, and the write-out.

Attention, as every frontend leaves it (q, k, v split into heads by reshape + permute, then
softmax(q @ k^T * scale + mask) @ v and the heads merged back), is matched by ``match_attention``:
``attention-form`` makes it one ``attention`` node (prune sees heads; a graph written to ONNX,
where attention is those ops, comes back as it was), ``fuse`` one onnxruntime kernel.

The head split and merge are recognised by what they compute, not by their spelling: a chain of
reshapes and permutes is run on a probe tensor and must equal the split (``x.unflatten(-1,
(heads, dim)).transpose(1, 2)``) or the merge, so any order of views that the exporters produce
matches. The scale may multiply or divide the scores (``/ sqrt(dim)``); a mask is added to the
scaled scores, as torch's scaled_dot_product_attention adds its attn_mask, and a boolean mask
``where(keep, 0, -inf)`` (how the torch frontend and the ONNX backend write torch's boolean
attn_mask) is read back as the boolean keep-mask itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimgraph.ir import DType, Graph, Node, Value
from slimgraph.ir.ops import run_reference
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.forms import remove_dead_region

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
    bias: Value | None  # what is added to the scaled scores
    scale: float
    heads: int
    output: Value  # the merged [batch, seq, heads * dim] value the fused node replaces
    scores_floored: bool = False  # floor-softmax clamped the scores (exact to drop in a fused kernel)
    keep: Value | None = None  # the boolean mask where the bias is where(keep, 0, -inf)

    @property
    def mask(self) -> Value | None:
        """The mask as the attention op takes it: the boolean keep-mask where there is one, else the bias."""
        return self.keep if self.keep is not None else self.bias


def keep_mask(bias: Value) -> Value | None:
    """``keep`` where ``bias`` is where(keep, 0, -inf) of a boolean keep: torch's boolean attn_mask."""
    node = bias.producer
    if node is None or node.op != "where" or node.inputs[0].dtype != DType.bool:
        return None
    attend, masked = (_scalar(v) for v in node.inputs[1:])
    if attend != 0.0 or masked != float("-inf") or node.inputs[0].rank > bias.rank:
        return None
    return node.inputs[0]


def broadcasts(shape: tuple, target: tuple) -> bool:
    """Whether a mask of ``shape`` broadcasts to ``target`` (as torch and ONNX broadcast)."""
    return len(shape) <= len(target) and all(d in (1, t) for d, t in zip(reversed(shape), reversed(target)))


def unfloored(scores: Value, also_read_by: Node | None = None) -> Value:
    """The softmax input before floor-softmax clamped it (max(x, amax(x) - margin)): exact to drop
    where the softmax becomes one fused kernel's. ``also_read_by``: a node of the attention that
    may read x too (the safe rows' amax)."""
    clamp = scores.producer
    if clamp is None or clamp.op != "maximum" or len(scores.uses) != 1 + (
            also_read_by is not None and also_read_by.inputs[0] is scores):
        return scores
    x, floor = clamp.inputs
    sub = floor.producer
    row_max = sub.inputs[0].producer if sub is not None and sub.op == "sub" else None
    if row_max is None or row_max.op != "amax" or row_max.inputs[0] is not x or len(x.uses) != 2 + (
            also_read_by is not None and also_read_by.inputs[0] is x):
        return scores
    return x


def _is_product(value: Value) -> bool:
    """Whether ``value`` is a rank-4 matmul, or one scaled by a number (the scores' side of the mask's add)."""
    node = value.producer
    if node is not None and node.op in ("mul", "div") and value.rank == 4:
        numbers = [i for i in (0, 1) if _scalar(node.inputs[i]) is not None and (node.op == "mul" or i == 1)]
        node = node.inputs[1 - numbers[0]].producer if numbers else None
    return node is not None and node.op == "matmul" and value.rank == 4


def safe_rows(softmax: Node) -> Node | None:
    """The where() after ``softmax`` that zeroes the rows whose scores are all -inf, as torch's
    attention does (a query that attends to nothing gets 0, not softmax's NaN):
    where(amax(scores) == -inf, 0, softmax(scores)); None where there is none."""
    out = softmax.outputs[0]
    if len(out.uses) != 1 or out.uses[0].node.op != "where" or out.uses[0].index != 2:
        return None
    where = out.uses[0].node
    dead, zero = where.inputs[0].producer, where.inputs[1]
    if dead is None or dead.op != "eq" or _scalar(zero) != 0.0 or len(where.inputs[0].uses) != 1:
        return None
    peak = dead.inputs[0].producer
    scores = softmax.inputs[0]
    clamp = scores.producer if scores.producer is not None and scores.producer.op == "maximum" else None
    if _scalar(dead.inputs[1]) != float("-inf") or peak is None or peak.op != "amax" or len(dead.inputs[0].uses) != 1 \
            or not (peak.inputs[0] is scores or clamp is not None and peak.inputs[0] is clamp.inputs[0]):
        return None  # (floor-softmax's clamp leaves the row's -inf as they were: either reads the same rows)
    rank = softmax.inputs[0].rank
    if [a % rank for a in peak.attrs["axes"]] != [rank - 1] or not peak.attrs.get("keepdim"):
        return None
    return where


def match_attention(softmax: Node) -> AttentionMatch | str:
    """The written-out attention around ``softmax``, or why it is not one."""
    safe = safe_rows(softmax)  # the attention op's rows that attend to nothing are 0 too
    peak = safe.inputs[0].producer.inputs[0].producer if safe is not None else None
    scores = unfloored(softmax.inputs[0], peak)
    floored = scores is not softmax.inputs[0]
    readers = 2 if floored else 1  # the floor's amax and maximum read it twice
    readers += peak is not None and peak.inputs[0] is scores
    if softmax.attrs["axis"] % scores.rank != scores.rank - 1 or scores.rank != 4:
        return "softmax not over the last dim of [batch, heads, seq, seq]"
    out = softmax.outputs[0] if safe is None else safe.outputs[0]
    if len(out.uses) != 1 or out.uses[0].node.op != "matmul" or out.uses[0].index != 0:
        return "softmax is not read by one matmul with v"
    context = out.uses[0].node
    bias = None
    node = scores.producer
    if node is not None and node.op == "add" and len(scores.uses) == readers:
        sides = [i for i in (0, 1) if _is_product(node.inputs[i])]
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
    elif node is not None and node.op == "div" and len(scores.uses) == 1:  # q @ k^T / sqrt(dim)
        divisor = _scalar(node.inputs[1])
        if not divisor:
            return "the scores are divided by a tensor or 0, not a number"
        scale, scores = 1.0 / divisor, node.inputs[0]
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
    if bias is not None and not broadcasts(tuple(bias.shape), tuple(scores.shape)):
        return f"the mask {bias.type_str()} does not broadcast to the scores {scores.type_str()}"
    keep = keep_mask(bias) if bias is not None else None
    return AttentionMatch(*sources, bias, scale, heads, merged, floored, keep)



# ---------------------------------------------------------------------------- attention-form
@register_pass
@dataclass
class AttentionForm(Pass):
    """Attention written out (q, k, v split into heads, scaled q @ k^T, an optional mask added,
    softmax, @ v, heads merged back) as one ``attention`` node, the form nn.MultiheadAttention
    imports as and the backends emit: prune then sees whole heads, and a graph written to ONNX
    (where attention is those ops) comes back as it was. A mask is kept as the node's fourth
    input: additive (the scores' dtype), or torch's boolean keep-mask where the mask is
    where(keep, 0, -inf). Softmax inputs floor-softmax clamped stay written out."""

    name = "attention-form"
    description = "written-out attention (split heads, scaled q k^T, + mask, softmax, @ v, merge) as attention"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        made = masked = 0
        for node in list(graph.nodes):
            if node.graph is None or node.op != "softmax":
                continue
            m = match_attention(node)
            if isinstance(m, str) or m.scores_floored:
                continue
            mask = m.mask
            # a mask of another dtype makes the scores its dtype (not the op's arithmetic); attn_mask is >= 2-D
            if mask is not None and (mask.dtype not in (DType.bool, m.q.dtype) or mask.rank < 2):
                continue
            anchor = m.output.producer
            scale = 1.0 / math.sqrt(m.q.shape[-1] // m.heads)
            if abs(m.scale - scale) > 1e-6 * scale:  # else the usual scale, read back from a float32 constant
                scale = m.scale
            new = graph.create_node("attention", [m.q, m.k, m.v] + ([mask] if mask is not None else []),
                                    {"dropout": 0.0, "num_heads": m.heads, "scale": scale},
                                    name=f"{anchor.name}_attention", before=anchor, meta=dict(anchor.meta))
            graph.replace_all_uses_with(m.output, new.outputs[0])
            remove_dead_region(graph, [m.output])
            if anchor.graph is None:
                graph.take_name(new, anchor)
            made, masked = made + 1, masked + (mask is not None)
        return PassResult(made > 0, {"attentions": made, "masked": masked})


# ---------------------------------------------------------------------------- written out
def write_out(graph: Graph, node: Node, origin: str) -> Node:
    """Replace an ``attention`` node by the ops it stands for, as the ONNX backend writes them
    (heads split by reshape + permute, k transposed by the same permute, scores scaled, the mask
    added, a boolean one as where(keep, 0, -inf), softmax, rows of all -inf zeroed, @ v, heads merged);
    returns the softmax.
    For passes that work on attention's softmax (floor-softmax)."""
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    heads, rank, name = node.attrs["num_heads"], q.rank, node.name
    meta = {"origin": origin}

    def add(op: str, inputs: list, attrs: dict | None = None, suffix: str = "") -> Value:
        return graph.create_node(op, inputs, attrs, name=f"{name}_{suffix or op}", before=node, meta=meta).outputs[0]

    def lead(x: Value) -> list:  # the dims before the last, as reshape writes them (N: the input's batch)
        return [x.dim(0) if x.sym and x.sym[0] is not None else "N"] + [x.dim(a) for a in range(1, x.rank - 1)]

    def split(x: Value, tag: str, perm: list[int]) -> Value:
        x = add("reshape", [x], {"shape": lead(x) + [heads, x.shape[-1] // heads]}, f"{tag}_heads")
        return add("permute", [x], {"perm": perm}, f"{tag}_heads_t")

    outer = list(range(rank - 2))
    to_heads = outer + [rank - 1, rank - 2, rank]
    qh, kt, vh = split(q, "q", to_heads), split(k, "k", outer + [rank - 1, rank, rank - 2]), split(v, "v", to_heads)
    dtype = q.dtype.torch
    scores = add("mul", [add("matmul", [qh, kt], suffix="scores"),
                         graph.add_constant(f"{name}_scale", torch.tensor(node.attrs["scale"], dtype=dtype))],
                 suffix="scaled")
    if mask is not None:
        if mask.dtype == DType.bool:
            mask = add("where", [mask, graph.add_constant(f"{name}_attend", torch.tensor(0.0, dtype=dtype)),
                                 graph.add_constant(f"{name}_masked", torch.tensor(float("-inf"), dtype=dtype))],
                       suffix="bias")
        scores = add("add", [scores, mask], suffix="masked")
    probs = add("softmax", [scores], {"axis": rank})
    weights = probs
    if mask is not None:  # rows that attend to nothing are 0, as the attention op computes them
        peak = add("amax", [scores], {"axes": [rank], "keepdim": True}, "peak")
        dead = add("eq", [peak, graph.add_constant(f"{name}_none", torch.tensor(float("-inf"), dtype=dtype))],
                   suffix="dead")
        weights = add("where", [dead, graph.add_constant(f"{name}_zero", torch.tensor(0.0, dtype=dtype)), probs],
                      suffix="weights")
    context = add("permute", [add("matmul", [weights, vh], suffix="context")], {"perm": to_heads}, "context_t")
    merged = graph.create_node("reshape", [context], {"shape": lead(q) + [v.shape[-1]]}, name=f"{name}_merged",
                               before=node, meta=meta)
    graph.replace_all_uses_with(node.outputs[0], merged.outputs[0])
    graph.remove_node(node)
    graph.take_name(merged, node)
    return probs.producer
