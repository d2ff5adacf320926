"""Post-training int8 quantization: ``quantize`` inserts calibrated fake-quant, ``fold-int8`` makes
it int8 for deployment.

``quantize`` puts a ``fake_quant`` node (quantize then dequantize, in float) on each tensor it
quantizes. Weights are per-channel symmetric int8 (axis 0 of conv and linear weights);
activations per tensor, uint8 asymmetric (x86's fast U8S8 kernels) or int8 symmetric. Where the
fake-quant goes depends on the runtime that will fuse it into integer kernels (``target``):

  ort  onnxruntime's CPU provider fuses units DQ -> Conv/Gemm/MatMul -> Q, so every conv input
       and output is quantized; the output after the ReLU or clip that follows it (onnxruntime
       folds those into the quantizer's saturation). Adds, muls, concats and average pools are
       quantized on all inputs and the output (QLinearAdd, QLinearConcat, ...). Max pools and
       data movers (reshape, flatten, ...) share their input's parameters, so onnxruntime drops
       their Q/DQ and runs them on int8. A linear/matmul output that feeds nothing quantized
       stays float: QGemm writes float, one rounding fewer on the logits.
  trt  TensorRT's explicit-quantization rules: the inputs of conv, linear and matmul, and the
       residual input of adds; int8 symmetric; outputs are not quantized.

Weights use the full int8 range, or 7 bits where the target CPU's integer kernels would saturate
(``cpu``, see slimgraph/cpu.py and ``weight_range``), and are rounded by GPTQ (gptq.py: each
layer's rounding error compensated on its calibration inputs) or to nearest (``rounding``).

Calibration (see calibration.py) runs on the float graph before any edit, so a bad batch leaves
the graph as it was. ``fold-int8`` then stores weights as int8 constants with their scales
(DQ of an int8 constant), biases as int32 in steps of input scale x weight scale (what
QLinearConv expects), activations as explicit quantize_linear -> dequantize_linear, and drops
requantizations that change nothing (DQ -> Q with equal parameters).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

import torch

from slimgraph.cpu import ISAS, integer_isa, saturates_pairs
from slimgraph.errors import PassError
from slimgraph.ir import DType, Graph, Node, Value, get_op, run
from slimgraph.ir.opdefs.quant import quantize_ref
from slimgraph.passes import gptq, weight_only
from slimgraph.passes.base import Pass, PassContext, PassResult, register_pass
from slimgraph.passes.calibration import METHODS, activation_params, check_batches, observe, weight_params
from slimgraph.passes.cleanup import eliminate_dead_code

Target = Literal["ort", "trt"]
Activations = Literal["auto", "uint8", "int8", "dynamic", "none"]
Calibration = Literal["minmax", "percentile", "entropy", "mse"]
Cpu = Literal["auto", "vnni", "avx512", "avx2", "arm"]
Rounding = Literal["gptq", "nearest", "awq"]

# ops onnxruntime runs on int8 as they are when their input and output share parameters
_PASSTHROUGH = {"max_pool", "reshape", "flatten", "permute", "squeeze", "unsqueeze", "slice", "gather", "select",
                "expand", "identity", "dropout", "stochastic_depth"}
_WEIGHTED = ("conv", "linear", "matmul")
_QUANT_OPS = ("fake_quant", "quantize_linear", "dequantize_linear")


# ---------------------------------------------------------------------------- placement
@dataclass
class Placement:
    """What ``quantize`` will quantize; decided from the graph alone, before calibration."""

    activations: list[Value] = field(default_factory=list)  # in graph order
    tied: dict[int, Value] = field(default_factory=dict)  # id(value) -> value whose parameters it shares
    bounds: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)  # clip/ReLU bounds
    weights: list[tuple[Node, int, int | None]] = field(default_factory=list)  # (node, input, axis)
    ops: list[Node] = field(default_factory=list)  # the nodes that become integer kernels


def _is_activation(v: Value | None) -> bool:
    return v is not None and not v.is_constant and v.dtype is not None and v.dtype.is_float


def _is_float_constant(v: Value | None) -> bool:
    return v is not None and v.is_constant and v.const_value.is_floating_point()


class _Placer:
    def __init__(self, graph: Graph, target: str, skip: tuple[str, ...]) -> None:
        self.graph, self.target, self.skip = graph, target, skip
        self.p = Placement()
        self.wanted: dict[int, Value] = {}

    def skipped(self, node: Node) -> bool:
        return any(node.op == pat or fnmatch.fnmatchcase(node.name, pat) for pat in self.skip)

    def want(self, v: Value) -> None:
        self.wanted.setdefault(id(v), v)

    def weighted(self, node: Node) -> list[Value] | None:
        """The activation inputs of a conv/linear/matmul it can quantize (recording its weights)."""
        x, w = node.inputs[0], node.inputs[1]
        if node.op == "matmul":  # both operands may be activations (attention) or one constant
            operands = [x, w]
            if not all(_is_activation(v) or _is_float_constant(v) for v in operands) or \
                    not any(_is_activation(v) for v in operands):
                return None
            self.p.weights += [(node, i, None) for i, v in enumerate(operands) if v.is_constant]
            return [v for v in operands if _is_activation(v)]
        if not _is_activation(x) or not _is_float_constant(w):
            return None  # computed weights (no per-channel int8 form): keep the layer float
        self.p.weights.append((node, 1, 0))  # a linear on [B, L, E] too: the ONNX backend transposes the int8 weight
        return [x]

    def anchor(self, v: Value) -> tuple[Value, tuple[float | None, float | None]]:
        """Follow a ReLU/clip chain that only this value feeds: the output is quantized after it."""
        lo: float | None = None
        hi: float | None = None
        while len(v.uses) == 1 and all(o is not v for o in self.graph.outputs):
            user = v.uses[0].node
            if user.op not in ("relu", "clip") or self.skipped(user):
                break
            a, b = (0.0, None) if user.op == "relu" else (user.attrs.get("min"), user.attrs.get("max"))
            lo = a if lo is None else (lo if a is None else max(lo, a))
            hi = b if hi is None else (hi if b is None else min(hi, b))
            v = user.output
        return v, (lo, hi)

    def place(self) -> Placement:
        forced: list[tuple[Value, tuple]] = []
        optional: list[tuple[Value, tuple]] = []
        for node in self.graph.nodes:
            if self.skipped(node):
                continue
            inputs = None
            if node.op in _WEIGHTED:
                inputs = self.weighted(node)
            elif node.op in ("add", "mul", "concat") and all(_is_activation(v) for v in node.inputs):
                inputs = list(node.inputs)
                if self.target == "trt":
                    inputs = self.residual_inputs(node) if node.op == "add" else []
            elif node.op in ("avg_pool", "adaptive_avg_pool") and self.target == "ort":
                inputs = [node.inputs[0]] if _is_activation(node.inputs[0]) else None
            if inputs is None or (self.target == "trt" and not inputs):
                continue
            self.p.ops.append(node)
            for v in inputs:
                self.want(v)
            if self.target == "ort":
                out = self.anchor(node.outputs[0])
                (optional if node.op in ("linear", "matmul") else forced).append(out)
        for v, bounds in forced + [o for o in optional if self.reaches_wanted(o[0])]:
            self.want(v)
            self.p.bounds[id(v)] = bounds
        self.tie_passthrough()
        self.p.activations = self.in_graph_order(self.wanted.values())
        return self.p

    def in_graph_order(self, values) -> list[Value]:
        order = {id(v): i for i, v in enumerate(self.graph.values())}
        return sorted(values, key=lambda v: order[id(v)])

    def residual_inputs(self, add: Node) -> list[Value]:
        """TensorRT fuses an add into the conv that makes one input; the other (the skip
        connection) must arrive int8. Two conv-made inputs: the second is the residual."""
        made_by_layer = [v.producer is not None and v.producer.op in _WEIGHTED for v in add.inputs]
        residual = [v for v, made in zip(add.inputs, made_by_layer) if not made]
        return residual or [add.inputs[1]]

    def reaches_wanted(self, v: Value) -> bool:
        """Does a quantized input consume v, directly or through data movers?"""
        if id(v) in self.wanted:
            return True
        return any(u.node.op in _PASSTHROUGH and u.index == 0 and not self.skipped(u.node)
                   and self.reaches_wanted(u.node.outputs[0]) for u in v.uses)

    def tie_passthrough(self) -> None:
        """A quantized value that a chain of data movers makes from another quantized value shares
        its parameters, and the chain's inner values are quantized too (onnxruntime then drops
        every Q/DQ along it)."""
        for v in self.in_graph_order(self.wanted.values()):  # upstream first: a root is never tied later
            chain, u = [], v
            while u.producer is not None and u.producer.op in _PASSTHROUGH and not self.skipped(u.producer) \
                    and _is_activation(u.producer.inputs[0]):
                chain.append(u)
                u = u.producer.inputs[0]
                if id(u) in self.wanted:
                    root = self.p.tied.get(id(u), u)
                    for c in chain:
                        self.want(c)
                        self.p.tied[id(c)] = root
                    break


def place(graph: Graph, target: str = "ort", skip: tuple[str, ...] = ()) -> Placement:
    """Where ``quantize`` puts fake-quant for ``target`` (for inspection and tests)."""
    return _Placer(graph, target, tuple(skip)).place()


# ---------------------------------------------------------------------------- weight range
@dataclass(frozen=True)
class WeightRange:
    """The int8 range ``quantize`` gives weights, for which CPU, and why."""

    qmax: int  # weights are in [-qmax, qmax]: 127 (8 bits) or 64 (7 bits, onnxruntime's reduce_range)
    cpu: str  # the integer instruction set it was chosen for ("gpu" for TensorRT)
    reason: str

    @property
    def bits(self) -> int:
        return 8 if self.qmax > 64 else 7


def weight_range(target: str, cpu: str = "auto") -> WeightRange:
    """Full-range int8 weights where the integer kernels sum exactly, 7-bit ones where onnxruntime's
    u8s8 kernels add pairs of products into a saturating int16 (x86 without VNNI).

    There, uint8 weights (u8u8 kernels) would avoid the saturation too, with one bit more; measured
    with onnxruntime's own quantizer (bench/results/quantize.md) they ran 1.36x (resnet18) and 1.44x
    (mobilenet_v2) slower than 7-bit u8s8, about as slow as fp32 on mobilenet_v2, while GPTQ rounding
    gives 7-bit weights the accuracy back: 7 bits is the better trade for a deployment format."""
    if target == "trt":
        return WeightRange(127, "gpu", "TensorRT's int8 kernels sum in int32: full-range int8 weights")
    isa = integer_isa() if cpu == "auto" else cpu
    if saturates_pairs(isa):
        return WeightRange(64, isa, f"{isa}: onnxruntime's u8s8 kernels add pairs of uint8 x int8 products into a "
                           "saturating int16 (VPMADDUBSW); 7-bit weights in [-64, 64] cannot saturate "
                           "(255 * 64 * 2 = 32640) and run faster than u8u8")
    exact = {"vnni": "VPDPBUSD adds u8 x s8 products into int32", "arm": "dot products add into int32"}[isa]
    return WeightRange(127, isa, f"{isa}: {exact} exactly: full-range int8 weights")


# ---------------------------------------------------------------------------- sensitivity
SENSITIVITY_BATCHES = 8  # enough to rank layers; each layer costs one graph run per batch


def _sensitivities(graph: Graph, replaced: list[tuple[Node, Node]], batches: list) -> dict[str, float]:
    """Each layer's effect on the graph's first output when it alone is quantized: the relative
    error, averaged over the batches. The quantized node is swapped in and out in place."""
    reference = [run(graph, list(b))[0] for b in batches]
    result = {}
    for node, new in replaced:
        graph.replace_all_uses_with(node.outputs[0], new.outputs[0])
        errors = [float((run(graph, list(b))[0] - y).norm() / y.norm().clamp_min(1e-12))
                  for b, y in zip(batches, reference)]
        graph.replace_all_uses_with(new.outputs[0], node.outputs[0])
        result[node.name] = sum(errors) / len(errors)
    return result


# ---------------------------------------------------------------------------- the passes
def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PassError(f"pass 'quantize' option {name!r}: {value!r} is not one of {', '.join(choices)}")


@register_pass
@dataclass
class Quantize(Pass):
    """Calibrated fake-quant: per-channel int8 weights, per-tensor activations, placed for ``target``.

    Options: target (ort|trt), activations (auto|uint8|int8; auto = uint8 for ort, int8 for trt),
    cpu (auto|vnni|avx512|avx2|arm: the integer instruction set the model will run on, for
    target ort; auto = this machine's, or $SLIMGRAPH_CPU; avx2 and avx512 get 7-bit weights),
    rounding (gptq|nearest: weights rounded by GPTQ on the calibration data where a layer allows,
    see gptq.py, or each to its nearest level),
    calibration (minmax|percentile|entropy|mse), percentile, bins (histogram methods),
    skip (node names, fnmatch patterns, or op types kept in float; with activations=dynamic,
    ``auto`` keeps in float the layers whose quantization alone moves the output most, measured on
    the calibration data, as long as they fit in ``float_budget``, a fraction of the linears'
    MACs), progress (a bar per batch). Needs ``optimize(..., calibration_data=...)``, except
    activations=dynamic (int8 weights, each activation quantized over its own range at run time:
    onnxruntime's DynamicQuantizeMatMul), where calibration only refines rounding and ``auto``.
    Weight-only (see weight_only.py): weights (int8|int4) with group_size (a power of 2 >= 16,
    default 128) and activations=none quantize linears and constant-weight matmuls block-wise
    along their inputs (onnxruntime's MatMulNBits), activations float; GPTQ-rounded per group
    where calibration_data is given (rounding=awq: AWQ's activation-aware scales, then nearest).

    Quantization-aware training, between ``quantize`` and ``fold-int8``::

        fq = optimize(model, "fold-bn,quantize", example_inputs=x, calibration_data=batches)
        module = fq.to_torch().train()      # fake-quant ops pass straight-through gradients
        ...train module...
        load_weights(fq.graph, module)      # the trained weights and scales back into the graph
        int8 = optimize(fq.graph, "fold-int8")

    Scales start at their calibrated values and are learned (LSQ, Esser et al. 2020): every scale
    is a trainable constant, an nn.Parameter of the emitted module, whose gradient comes through
    the straight-through estimate (scaled by 1 / sqrt(elements per scale * qmax)); freeze them
    with ``requires_grad_(False)``. Zero points stay fixed (so a ReLU's stays at 0 and
    onnxruntime still folds the ReLU into the quantizer). ``load_weights`` brings the trained
    scales back, and ``fold-int8`` rounds the weights to the trained grid, so the folded model
    computes what the trained module did (but for the bias, rounded to its int32 step).
    """

    name = "quantize"
    description = "insert calibrated fake-quant (int8 per-channel weights, per-tensor activations) for a target runtime"
    exact = False
    requires = ("no-batch-norm",)

    target: Target = "ort"
    activations: Activations = "auto"
    calibration: Calibration = "minmax"
    percentile: float = 99.99
    bins: int = 2048
    skip: tuple[str, ...] = ()
    float_budget: float = 0.1
    progress: bool = True
    cpu: Cpu = "auto"
    rounding: Rounding = "gptq"
    weights: str | None = None
    group_size: int | None = None  # weight-only: 128 unless given

    def __post_init__(self) -> None:
        _check_choice("target", self.target, ("ort", "trt"))
        _check_choice("cpu", self.cpu, ("auto", *ISAS))
        _check_choice("rounding", self.rounding, ("gptq", "nearest", "awq"))
        _check_choice("activations", self.activations, ("auto", "uint8", "int8", "dynamic", "none"))
        weight_only.check_options(self.weights, self.group_size, self.activations, self.rounding)
        if isinstance(self.float_budget, bool) or not isinstance(self.float_budget, (int, float)) \
                or not 0 <= self.float_budget < 1:
            raise PassError(f"pass 'quantize' option 'float_budget': {self.float_budget!r} is not in [0, 1)")
        if "auto" in self.skip and self.activations != "dynamic":
            raise PassError("pass 'quantize' option 'skip': auto is for activations=dynamic so far")
        if self.activations == "dynamic" and self.target != "ort":
            raise PassError("pass 'quantize' option 'activations': dynamic activations are onnxruntime's "
                            "DynamicQuantizeMatMul (target ort)")
        _check_choice("calibration", self.calibration, METHODS)
        if self.target == "trt" and self.activations == "uint8":
            raise PassError("pass 'quantize' option 'activations': target trt quantizes activations to int8 "
                            "(TensorRT's explicit quantization is symmetric)")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50 < self.percentile <= 100:
            raise PassError(f"pass 'quantize' option 'percentile': {self.percentile!r} is not in (50, 100]")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 512:
            raise PassError(f"pass 'quantize' option 'bins': {self.bins!r} must be an integer >= 512 "
                            "(histogram methods need many more bins than the 256 levels)")
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(str(s) for s in self.skip)

    def _run_dynamic(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Linears with constant weights become dynamic_quant_matmul: int8 weights per output channel
        (GPTQ-rounded on the calibration data where given), activations quantized at run time over
        each tensor's own range, so nothing is calibrated and no range is ever clipped."""
        wrange = weight_range(self.target, self.cpu)
        patterns = [p for p in self.skip if p != "auto"]
        layers = [n for n in graph.nodes if n.op == "linear" and n.inputs[1].is_constant and n.inputs[1].rank == 2
                  and n.inputs[0].dtype == n.inputs[1].dtype == DType.float32
                  and not any(n.op == p or fnmatch.fnmatchcase(n.name, p) for p in patterns)]
        batches = None
        if ctx.calibration_data is not None:
            batches = check_batches(graph, ctx.calibration_data, "pass 'quantize'")
        elif "auto" in self.skip:
            raise PassError("pass 'quantize' option 'skip': auto measures each layer on calibration_data; give it")
        hessians = gptq.input_hessians(graph, layers, batches) if batches and self.rounding == "gptq" else {}
        gptq_layers, sensitivity = 0, {}
        replaced = []
        for node in layers:
            weight = node.inputs[1].const_value  # [N, K]
            scale = weight_params(weight, 0, wrange.qmax)
            if id(node) in hessians:
                rounded = gptq.round_weight(weight, *hessians[id(node)], scale, -wrange.qmax, wrange.qmax)
                if rounded is not None:
                    weight, gptq_layers = rounded, gptq_layers + 1
            ints = torch.round(weight.double() / scale.double()[:, None]).clamp(-wrange.qmax, wrange.qmax)
            q = graph.add_constant(f"{node.inputs[1].name}_int8", ints.to(torch.int8).t().contiguous())
            s = graph.add_constant(f"{node.inputs[1].name}_scale", scale)
            bias = node.inputs[2:3] if len(node.inputs) > 2 and node.inputs[2] is not None else []
            new = graph.create_node("dynamic_quant_matmul", [node.inputs[0], q, s, *bias], name=node.name,
                                    before=node, meta={**node.meta, "origin": "quantize"})
            replaced.append((node, new))
        created = bool(replaced)
        if "auto" in self.skip:
            sensitivity = _sensitivities(graph, replaced, batches[:SENSITIVITY_BATCHES])
            budget = self.float_budget * sum(get_op("linear").macs(n) for n, _ in replaced)
            for node, new in sorted(replaced, key=lambda pair: -sensitivity[pair[0].name]):
                macs = get_op("linear").macs(node)
                if macs > budget:
                    break
                budget -= macs
                replaced.remove((node, new))
        for node, new in replaced:
            graph.replace_all_uses_with(node.outputs[0], new.outputs[0])
            graph.remove_node(node)
        if created:  # the int8 copies of the layers auto kept float; dead code it found stays
            eliminate_dead_code(graph)
        kept = [n.name for n in graph.nodes if n.op in _WEIGHTED]
        stats = {"quantized_ops": len(replaced), "float_layers": len(kept),
                 "activations": "dynamic (per tensor, uint8)", "cpu": wrange.cpu, "weight_bits": wrange.bits,
                 "gptq_layers": gptq_layers,
                 "notes": [f"{wrange.bits}-bit weights: {wrange.reason}",
                           f"rounding: GPTQ on {gptq_layers} of {len(layers)} weights" if hessians
                           else "rounding: nearest" + ("" if batches else " (GPTQ needs calibration_data)")]}
        if sensitivity:
            stats["sensitivity"] = dict(sorted(sensitivity.items(), key=lambda kv: -kv[1]))
            stats["kept_float_by_auto"] = sorted(set(kept) & set(sensitivity))
        return PassResult(created, stats)

    def needs_calibration(self) -> bool:
        return self.activations not in ("dynamic", "none") or "auto" in self.skip

    @property
    def activation_dtype(self) -> torch.dtype:
        if self.activations == "auto":
            return torch.uint8 if self.target == "ort" else torch.int8
        return torch.uint8 if self.activations == "uint8" else torch.int8

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        done = next((n for n in graph.nodes if n.op in _QUANT_OPS + ("dynamic_quant_matmul", "matmul_nbits")), None)
        if done is not None:
            raise PassError(f"pass 'quantize': the graph is already quantized (node {done.name} is a {done.op}); "
                            "quantize the float model")
        if self.activations == "dynamic":
            return self._run_dynamic(graph, ctx)
        if self.activations == "none":
            return weight_only.run_weight_only(graph, ctx, self.weights, self.group_size or weight_only.GROUP_SIZE,
                                               self.rounding, self.skip)
        batches = check_batches(graph, ctx.calibration_data, "pass 'quantize'")
        wrange = weight_range(self.target, self.cpu)
        dtype = self.activation_dtype
        skip, not_finite = tuple(self.skip), []
        while True:  # ops that read or write a tensor no int8 grid holds (-inf masks) stay float
            placement = place(graph, self.target, skip)
            if not placement.ops:
                return PassResult(False, {"quantized_ops": 0, "not_finite": not_finite})
            roots = [v for v in placement.activations if id(v) not in placement.tied]
            observers = observe(graph, roots, batches, self.calibration, dtype == torch.int8, self.bins,
                                self.progress)
            bad = {id(obs.value): obs for obs in observers if obs.not_finite is not None}
            if not bad:
                break
            for obs in bad.values():
                shared = [obs.value] + [v for v in placement.activations if id(placement.tied.get(id(v))) in bad]
                ops = sorted({n.name for v in shared for n in [u.node for u in v.uses] + [v.producer]
                              if n in placement.ops})
                not_finite.append(f"%{obs.value.name} holds inf on calibration batch {obs.not_finite}: "
                                  f"{', '.join(ops)} kept float")
                skip += tuple(ops)
        hessians = {} if self.rounding == "nearest" else gptq.input_hessians(
            graph, [n for n, _, axis in placement.weights if axis == 0 and len(n.inputs[1].uses) == 1], batches)
        levels = 256 if dtype == torch.uint8 else 255
        params = {}
        for obs in observers:
            lo, hi = obs.range(self.calibration, levels, self.percentile)
            params[id(obs.value)] = activation_params(lo, hi, dtype, placement.bounds.get(id(obs.value), (None, None)))

        # every decision is made and every check passed: only now is the graph edited
        constants: dict[int, tuple[Value, Value]] = {}
        for v in placement.activations:
            root = placement.tied.get(id(v), v)
            if id(root) not in constants:
                scale, zero_point = params[id(root)]
                constants[id(root)] = (  # scales are trainable: the emitted module learns them (QAT)
                    graph.add_constant(f"{root.name}_scale", torch.tensor(scale, dtype=torch.float32), trainable=True),
                    graph.add_constant(f"{root.name}_zero_point", torch.tensor(zero_point, dtype=dtype)))
            _insert_fake_quant(graph, v, *constants[id(root)])
        quantized_weights: dict[int, Value] = {}
        gptq_layers = 0
        for node, index, axis in placement.weights:
            w = node.inputs[index]
            if id(w) not in quantized_weights:
                scale = weight_params(w.const_value, axis, wrange.qmax)
                if id(node) in hessians:
                    rounded = gptq.round_weight(w.const_value, *hessians[id(node)], scale, -wrange.qmax, wrange.qmax)
                    if rounded is not None:  # on the grid: fake_quant and fold-int8 give back these integers
                        w.const_value = rounded
                        gptq_layers += 1
                s = graph.add_constant(f"{w.name}_scale", scale, trainable=True)
                z = graph.add_constant(f"{w.name}_zero_point", torch.zeros(scale.shape, dtype=torch.int8))
                attrs = {} if axis is None else {"axis": axis}
                if wrange.qmax < 127:  # a trained scale must not take the weights past it either
                    attrs.update(qmin=-wrange.qmax, qmax=wrange.qmax)
                fq = graph.create_node("fake_quant", [w, s, z], attrs, name=f"{w.name}_fq", before=node,
                                       meta={"origin": "quantize"})
                quantized_weights[id(w)] = fq.output
            node.set_input(index, quantized_weights[id(w)])
        graph.meta["quantize"] = {"target": self.target}
        kept = [n for n in graph.nodes if n.op in _WEIGHTED and n not in placement.ops]
        return PassResult(True, {"quantized_ops": len(placement.ops), "float_layers": len(kept),
                                 "activations": len(placement.activations), "weights": len(quantized_weights),
                                 "observed": len(roots), "batches": len(batches), "cpu": wrange.cpu,
                                 "weight_bits": wrange.bits, "gptq_layers": gptq_layers,
                                 "not_finite": not_finite,
                                 "notes": [f"{wrange.bits}-bit weights: {wrange.reason}",
                                           f"rounding: GPTQ on {gptq_layers} of {len(quantized_weights)} weights"
                                           if self.rounding == "gptq" else "rounding: nearest"]})


def _insert_fake_quant(graph: Graph, v: Value, scale: Value, zero_point: Value) -> None:
    """Every reader of ``v`` (graph outputs included) reads fake_quant(v) instead."""
    where = {"after": v.producer} if v.producer is not None else {"before": graph.nodes[0]}
    fq = graph.create_node("fake_quant", [v, scale, zero_point], name=f"{v.name}_fq", meta={"origin": "quantize"},
                           **where)
    for use in list(v.uses):
        if use.node is not fq:
            use.node.set_input(use.index, fq.output)
    if any(o is v for o in graph.outputs):
        graph.set_outputs([fq.output if o is v else o for o in graph.outputs])


# ---------------------------------------------------------------------------- fold-int8
INT32_MAX = 2**31 - 1


def _same(a: Value | None, b: Value | None) -> bool:
    if a is None or b is None:
        return a is b
    if a is b:
        return True
    return a.is_constant and b.is_constant and a.const_value.dtype == b.const_value.dtype \
        and a.const_value.shape == b.const_value.shape and torch.equal(a.const_value, b.const_value)


def _same_params(dq: Node, q: Node) -> bool:
    """A dequantize then a quantize that give back the very same integers."""
    zp = lambda n: n.inputs[2] if len(n.inputs) > 2 else None  # noqa: E731
    return dq.attrs.get("axis") == q.attrs.get("axis") and _same(dq.inputs[1], q.inputs[1]) \
        and _same(zp(dq), zp(q)) and dq.inputs[0].dtype == q.outputs[0].dtype


def _dequantized_from(v: Value) -> tuple[torch.Tensor, torch.Tensor | None, int | None] | None:
    """(scale, zero point, axis) of a value made by dequantize_linear with constant parameters."""
    dq = v.producer
    if dq is None or dq.op != "dequantize_linear":
        return None
    params = [p for p in dq.inputs[1:] if p is not None]
    if not all(p.is_constant for p in params):
        return None
    zero_point = params[1].const_value if len(params) > 1 else None
    return params[0].const_value, zero_point, dq.attrs.get("axis")


@register_pass
@dataclass
class FoldInt8(Pass):
    """Make a fake-quant graph int8: int8 weight constants with their scales, int32 biases,
    explicit quantize_linear -> dequantize_linear on activations, no redundant requantization.

    Biases are quantized only for onnxruntime (``quantize{target=ort}``, or graphs imported
    already quantized): TensorRT keeps them float. A linear on [B, L, E] (transformers) gets its
    int32 bias too: onnxruntime turns its MatMul + Add into QGemm where shapes are static, and
    into MatMulIntegerToFloat + Add where they are not.
    """

    name = "fold-int8"
    description = "int8 weight constants + scales, int32 biases, explicit Q/DQ, redundant requantization removed"
    exact = False  # int32 biases round to steps of input scale x weight scale

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for node in graph.nodes:  # checked before any edit
            if node.op == "fake_quant" and not node.inputs[0].is_constant and {"qmin", "qmax"} & set(node.attrs):
                raise PassError(f"pass 'fold-int8': node {node.name} narrows the range of a computed tensor (qmin "
                                f"{node.attrs.get('qmin')}, qmax {node.attrs.get('qmax')}), which QuantizeLinear "
                                "cannot express; only constant weights may have a narrowed range")
        stats = {"weights": 0, "activations": 0, "biases": 0, "float_biases": 0, "requantizations_removed": 0}
        replaced: list[Value] = []  # constants that may now be unused
        for node in graph.nodes:
            if node.op == "fake_quant":
                replaced += node.inputs
                stats["weights" if _fold_fake_quant(graph, node) else "activations"] += 1
        for node in graph.nodes:
            dq = node.inputs[0].producer if node.op == "quantize_linear" else None
            if dq is not None and dq.op == "dequantize_linear" and _same_params(dq, node):
                graph.replace_all_uses_with(node.outputs[0], dq.inputs[0])
                graph.remove_node(node)
                stats["requantizations_removed"] += 1
        if graph.meta.get("quantize", {}).get("target", "ort") == "ort":
            for node in graph.nodes:
                if node.op in ("conv", "linear") and len(node.inputs) > 2 and _is_float_constant(node.inputs[2]):
                    replaced.append(node.inputs[2])
                    key = "biases" if _quantize_bias(graph, node) else "float_biases"
                    stats[key] += 1
        for v in {id(v): v for v in replaced if v is not None and v.is_constant}.values():
            if not v.uses and graph.constants.get(v.name) is v and all(o is not v for o in graph.outputs):
                graph.remove_constant(v)
        changed = stats["weights"] + stats["activations"] + stats["biases"] + stats["requantizations_removed"] > 0
        return PassResult(changed, stats)


def _fold_fake_quant(graph: Graph, fq: Node) -> bool:
    """fake_quant(x) -> dequantize_linear(int8 constant) when x is a constant (True), else
    quantize_linear -> dequantize_linear (False)."""
    x, scale, zero_point = fq.inputs
    attrs = {k: v for k, v in fq.attrs.items() if k == "axis"}  # qmin/qmax live on in the integers
    if x.is_constant and scale.is_constant and zero_point.is_constant:
        q = quantize_ref([x.const_value, scale.const_value, zero_point.const_value], fq.attrs)
        source = graph.add_constant(f"{x.name}_q", q)
        weight = True
    else:
        source = graph.create_node("quantize_linear", [x, scale, zero_point], attrs, name=f"{x.name}_q", before=fq,
                                   meta=dict(fq.meta)).outputs[0]
        weight = False
    dq = graph.create_node("dequantize_linear", [source, scale, zero_point], attrs, name=f"{x.name}_dq",
                           before=fq, meta=dict(fq.meta))
    if dq.outputs[0].dtype != x.dtype:  # DequantizeLinear gives its scale's type: back to a float64 graph's
        dq = graph.create_node("cast", [dq.outputs[0]], {"dtype": str(x.dtype.torch).removeprefix("torch.")},
                               name=f"{x.name}_dq_cast", before=fq, meta=dict(fq.meta))
    graph.replace_all_uses_with(fq.outputs[0], dq.outputs[0])
    graph.remove_node(fq)
    return weight


def _quantize_bias(graph: Graph, node: Node) -> bool:
    """bias -> dequantize_linear(int32, x_scale * w_scale): the bias QLinearConv/QGemm add to their
    int32 accumulators. False (bias kept float) where the operands are not both dequantized
    from constant parameters, or the bias does not fit in int32."""
    x, w = _dequantized_from(node.inputs[0]), _dequantized_from(node.inputs[1])
    if x is None or w is None or x[2] is not None or w[2] not in (None, 0):
        return False  # per-tensor input, weight per output channel (or per tensor)
    if w[1] is not None and bool(w[1].any()):
        return False  # asymmetric weights: the bias has no exact int32 form
    bias = node.inputs[2]
    scale = (x[0].float() * w[0].float()).expand(bias.shape).contiguous()
    q = torch.round(bias.const_value.double() / scale.double())
    if not bool((q.abs() <= INT32_MAX).all()):
        return False
    qc = graph.add_constant(f"{bias.name}_q", q.to(torch.int32))
    sc = graph.add_constant(f"{bias.name}_scale", scale)
    dq = graph.create_node("dequantize_linear", [qc, sc], {"axis": 0}, name=f"{bias.name}_dq", before=node,
                           meta={"origin": "fold-int8"})
    node.set_input(2, dq.outputs[0])
    return True
