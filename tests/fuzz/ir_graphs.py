"""Random IR graphs drawn from the op registry (``ir 17`` is RandomGraph(17)): the third kind of net
the properties of properties.py run on, beside nets.py's torch modules. Each graph is a DAG built
node by node: an op drawn from the registry, operands drawn from the values made so far (the same
value twice too), attributes from the op's sampler, and the node kept only where shape inference
accepts it and its outputs are finite and bounded on two sets of inputs (the example and the other
batch the checks run at).

Which ops: every registered op whose reference runs with no attributes on same-shaped operands is
drawn generically (unary and binary, broadcasting); the others have a sampler below. An op added to
the registry is therefore drawn at once or fails test_every_registered_op_is_drawn until it gets a
sampler or a reason in NOT_DRAWN.

Ops whose result jumps with its input (floor, comparisons, argmax, sort, quantize, casts to
integers) would make any tolerance meaningless on values that differ in the last bit between
backends. So the graph has a second input, ``g``, of distinct multiples of 0.25 (exact in float16
too), and such ops only read *exact* values: ones every backend computes bit for bit, tracked on the
data (integers, booleans, and floats on that grid that came from exact values by ops that round
correctly). Ordering ops read only exact values without ties.

Each value is also computed as float16 would (every value rounded to 16 bits, but for what the fp16
pass keeps float32 by contract): a node whose output that leaves more than 1e-2 off is a residue of
rounding, a cancellation of larger terms that no float16 computation keeps, and is not drawn.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch

from slimgraph.ir import Graph, Value
from slimgraph.ir.dtypes import DType
from slimgraph.ir.ops import registered_ops, run_reference
from slimgraph.ir.symbolic import SymDim

DEBUG = False
LIMIT = 1e3  # largest magnitude a float value may reach on the sample inputs
GRID = 0.25

# ops whose output jumps where its input crosses a point: they read exact values only
JUMPY = {"floor", "ceil", "round", "trunc", "sign", "fmod", "remainder", "argmax", "argmin", "sort", "topk",
         "quantize_linear", "fake_quant", "isnan", "isinf"}
# ops whose angle fp16 keeps in float32 where its rounding would show (RandomGraph._angle_kept), drawn
# on an inexact angle only where its float32 rounding does not move them (RandomGraph._stable)
ANGLES = {"tan", "sin", "cos"}
# ops whose onnxruntime kernel is accurate to an absolute bound, not to float32's relative one: its Sigmoid
# (MLAS) is 5e-8 off at sigmoid(-15) = 3e-7, 17%. The float64 value of RandomGraph._wide carries the bound
# (silu is x * Sigmoid(x): |x| times it), so a node that amplifies it (a prod of tail values) is not drawn
ABSOLUTE_ERROR = {"sigmoid": lambda x: torch.full_like(x, 2**-24), "silu": lambda x: x.abs() * 2**-24}
# ops that give every backend the same bits on exact inputs (movement, selection, correctly rounded arithmetic)
KEEPS_EXACT = JUMPY | {
    "identity", "dropout", "stochastic_depth", "neg", "abs", "relu", "add", "sub", "mul", "maximum", "minimum",
    "clip", "where", "amax", "amin", "max_pool", "sum", "cumsum", "cast", "reshape", "permute", "flatten",
    "squeeze", "unsqueeze", "expand", "expand_batch", "tile", "flip", "roll", "slice", "select", "gather", "take",
    "gather_elements", "index", "concat", "split", "pad", "diagonal", "embedding", "dequantize_linear", "arange",
    "full", "sizes", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor",
    "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "any", "prod", "index_put", "scatter",
}

# registered ops the generator does not draw, and why
NOT_DRAWN = {
    "dynamic_quant_matmul": "made by quantize{activations=dynamic} from a linear; its per-tensor uint8 rounding of "
                            "a float activation is checked by the int8 property and tests/passes/test_quantize*",
    "skip_layer_norm": "made by fuse{target=onnxruntime} (an onnxruntime kernel): the exact property runs fuse",
    "multi_head_attention": "made by fuse{target=onnxruntime} from attention: the exact property runs fuse",
    "matmul_nbits": "made by quantize{weights=int4|int8} from a linear (packed block-wise weights); checked in every "
                    "backend by tests/passes/test_weight_only.py",
}


@dataclass
class Entry:
    """A value of the graph and its data at the example inputs and at the other inputs."""
    value: Value
    data: tuple[torch.Tensor, torch.Tensor]
    exact: bool = False  # every backend computes it bit for bit
    low: tuple[torch.Tensor, torch.Tensor] | None = None  # the data as float16 computes it (None: data rounded)
    wide: tuple[torch.Tensor, torch.Tensor] | None = None  # the data as float64 computes it (None: data widened)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def rank(self) -> int:
        return len(self.value.shape)

    @property
    def is_float(self) -> bool:
        return self.value.dtype.torch.is_floating_point

    @property
    def batched(self) -> bool:
        """Its leading dim is the graph's symbolic batch."""
        sym = self.value.sym
        return bool(sym) and sym[0] is not None

    def distinct(self, axis: int) -> bool:
        """Exact with no two equal elements along axis, on both data sets: ordering ops may read it."""
        return self.exact and self.rank > 0 and all(
            bool((d.sort(axis).values.diff(dim=axis) != 0).all()) for d in self.data)


class Rejected(Exception):
    """The drawn node does not fit: try another."""


Sample = Callable[["RandomGraph"], tuple[str, list, dict] | None]


class RandomGraph:
    """A random graph, reproduced by its seed. ``graph`` is the IR; ``example(batch, seed)`` its inputs."""

    def __init__(self, seed: int, nodes: int | None = None, ops: list[str] | None = None) -> None:
        self.seed = seed
        self.ops = sorted(ops or drawable_ops())
        self.rng = rng = random.Random(seed)
        self.dtype = torch.float64 if rng.random() < 0.15 else torch.float32
        self.symbolic = rng.random() < 0.5
        self.batches = (2, 3 if self.symbolic else 2)
        rank = rng.choice((2, 3, 3, 4, 4, 4))
        inner = {2: [rng.choice((6, 8, 12))], 3: [rng.choice((3, 4, 5)), rng.choice((4, 6, 8))],
                 4: [rng.choice((2, 3, 4)), rng.choice((3, 5, 6)), rng.choice((4, 6))]}[rank]
        self.inner = tuple(inner)
        self.graph = Graph(f"random_{seed}")
        self.pool: list[Entry] = []
        self.drawn: list[str] = []  # the ops of the nodes kept, in order
        sym = ("batch",) + (None,) * len(inner) if self.symbolic else None
        dt = DType.from_torch(self.dtype)
        examples = [self.example(b, s) for b, s in zip(self.batches, (0, 1))]
        for i, name in enumerate(("x", "g")):
            value = self.graph.add_input(name, (self.batches[0], *inner), dt, sym=sym)
            self.pool.append(Entry(value, (examples[0][i], examples[1][i]), exact=name == "g"))
        target = nodes or rng.randint(6, 28)
        for _ in range(target * 12):
            if len(self.drawn) >= target:
                break
            self._grow()
        leaves = [e.value for e in self.pool if not e.value.uses and e.value.producer is not None]
        self.graph.set_outputs(leaves or [self.pool[-1].value])
        self.graph.verify()

    # ------------------------------------------------------------------ inputs
    @property
    def input_names(self) -> list[str]:
        return ["x", "g"]

    @property
    def dynamic_dims(self) -> dict | None:
        return {"x": {0: "batch"}, "g": {0: "batch"}} if self.symbolic else None

    def example(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """x ~ N(0, 1); g: distinct multiples of 0.25 of magnitude at most 125, in random order."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + seed)
        x = torch.randn(batch, *self.inner, generator=gen, dtype=self.dtype)
        n = x.numel()
        levels = torch.randperm(min(n * 4, 1000), generator=gen)[:n].to(self.dtype)
        g = (levels - levels.max().div(2).floor()) * GRID
        return x, g.reshape(x.shape)

    # ------------------------------------------------------------------ drawing
    def pick(self, *, exact: bool = False, floating: bool | None = True, rank: tuple[int, int] = (0, 9),
             where: Callable[[Entry], bool] | None = None) -> Entry:
        """A value made so far, unused ones first; Rejected when none fits."""
        fits = [e for e in self.pool if (not exact or e.exact) and (floating is None or e.is_float == floating)
                and rank[0] <= e.rank <= rank[1] and (where is None or where(e))]
        if not fits:
            raise Rejected("no operand fits")
        weights = [1 if e.value.uses else 4 for e in fits]
        return self.rng.choices(fits, weights)[0]

    def const(self, shape: tuple[int, ...], kind: str = "normal", dtype: torch.dtype | None = None,
              low: int = 0, high: int = 4) -> Value:
        gen = torch.Generator().manual_seed(self.rng.randrange(2**31))
        dtype = dtype or self.dtype
        if kind == "int":
            t = torch.randint(low, high, shape, generator=gen).to(dtype)
        elif kind == "grid":  # exact values
            t = (torch.randint(-8, 9, shape, generator=gen) * GRID).to(dtype)
        elif kind == "positive":
            t = (torch.rand(shape, generator=gen) + 0.5).to(dtype)
        else:
            t = (torch.randn(shape, generator=gen) / math.sqrt(max(shape[-1] if shape else 1, 1))).to(dtype)
        value = self.graph.add_constant(f"c{len(self.graph.constants)}", t)
        self._new_constants.append(value)
        return value

    def size(self, entry: Entry, axis: int) -> int | SymDim | str:
        """A size for an attribute: the batch symbol where the dim is the symbolic batch."""
        return SymDim(sympy.Symbol("batch"), entry.shape[0]) if axis == 0 and entry.batched else entry.shape[axis]

    def axis(self, entry: Entry, lo: int = 1, indexed: bool = False) -> int:
        """An axis of entry, past the batch, sometimes written negative; ``indexed``: one an index is
        drawn along, so not empty (a diagonal past the edge: randint(1, 0) raised, ir 8000318)."""
        if entry.rank <= lo:
            raise Rejected("no axis past the batch")
        a = self.rng.randrange(lo, entry.rank)
        negative = self.rng.random() < 0.3
        if indexed and not entry.shape[a]:
            raise Rejected("an index along an empty axis")
        return a - entry.rank if negative else a

    def _grow(self) -> None:
        op = self.rng.choice(self.ops)
        self._new_constants: list[Value] = []
        before = len(self.graph.nodes)
        try:
            drawn = SAMPLERS.get(op, generic_sample)(self, op)
            if drawn is None:
                raise Rejected("nothing to draw")
            self._add(*drawn)
            self.drawn.append(op)
        except Rejected as exc:
            if DEBUG:
                print(f"{op}: {exc}")
            for node in reversed(self.graph.nodes[before:]):
                self.graph.remove_node(node)
            self.pool = [e for e in self.pool if e.value.producer is None or e.value.producer.graph is self.graph]
            for value in self._new_constants:
                if not value.uses:
                    self.graph.remove_constant(value)

    def node(self, op: str, inputs: list, attrs: dict | None = None) -> Entry:
        """Add one node (a sampler's helper node too); Rejected where it does not fit."""
        return self._add(op, inputs, attrs or {})[0]

    def _add(self, op: str, inputs: list, attrs: dict) -> list[Entry]:
        values = [i.value if isinstance(i, Entry) else i for i in inputs]
        try:
            node = self.graph.create_node(op, values, attrs)
        except Exception as exc:
            raise Rejected(str(exc)) from exc
        outs: list[list[torch.Tensor]] = [[], []]
        for k in range(2):
            feeds = [None if v is None else self._data(v)[k] for v in values]
            try:
                results = run_reference(node, feeds, {"batch": self.batches[k]})
            except Exception as exc:
                self.graph.remove_node(node)
                raise Rejected(str(exc)) from exc
            outs[k] = list(results)
        entries = []
        exact_in = all(v is None or self._entry(v) is None or self._entry(v).exact for v in values)
        for i, value in enumerate(node.outputs):
            data = (outs[0][i], outs[1][i])
            if any(tuple(d.shape[1:]) != tuple(value.shape[1:]) for d in data) or not all(
                    _bounded(d) for d in data):
                self.graph.remove_node(node)
                raise Rejected(f"{op}: unbounded or misshapen output")
            exact = op in KEEPS_EXACT and exact_in and all(_on_grid(d) for d in data)
            entries.append(Entry(value, data, exact))
        if not self._wide(node, values, entries):
            self.graph.remove_node(node)
            raise Rejected(f"{op}: its float32 value is over 1e-5 of its peak off its float64 value")
        if not self._low(node, values, outs, entries):
            self.graph.remove_node(node)
            raise Rejected(f"{op}: computed from its inputs as float16 holds them, it is off by over 1e-2")
        if op in JUMPY and not exact_in:
            self.graph.remove_node(node)
            raise Rejected(f"{op} reads an inexact value")
        if _sensitive(op, attrs) and not exact_in and not self._stable(node, values, outs):
            self.graph.remove_node(node)
            raise Rejected(f"{op} reads values where 16-bit rounding moves it")
        if op in ANGLES and not exact_in and not self._stable(node, values, outs, round16=False, step=2**-14):
            self.graph.remove_node(node)
            raise Rejected(f"{op} amplifies its input's float32 rounding past the checks' bound")
        if op == "grid_sample" and attrs.get("mode") == "nearest" and not exact_in and self._near_an_edge(node):
            self.graph.remove_node(node)
            raise Rejected("nearest grid_sample of a coordinate near a pixel's edge")
        if op == "group_norm" and _group_norm_cancels(node, values, [self._data(v) for v in values], outs):
            self.graph.remove_node(node)
            raise Rejected("group_norm of a group nearly constant beside its mean: torch's kernel cancels")
        self.pool.extend(entries)
        return entries

    def _stable(self, node, values: list, outs: list, round16: bool = True, step: float = 2**-8) -> bool:
        """Whether the node's outputs stay put (within 1e-2 of their scale) where its inexact float
        inputs are rounded to float16 and moved by 2^-8 either way: what fp16 and another backend's
        last bits do to them. The angle of a tan / sin / cos, which fp16 keeps float32, is moved by
        ``step`` = 2^-14 of its peak instead (not per element: a sum's rounding scales with its
        terms): staying within 1e-2 there bounds the amplification by 164, so an angle 4 float32
        bits off (conv and matmul round by summation order) leaves the output within 8e-5 of its
        peak, inside the checks' 1e-4 (ir 3000326, 4000332: tan near a pole, 2e-3 off)."""
        for k in range(2):
            for way in (0, 1, -1):
                feeds = []
                for v in values:
                    entry = None if v is None else self._entry(v)
                    data = None if v is None else self._data(v)[k]
                    if entry is not None and not entry.exact and data.is_floating_point():
                        if round16:
                            data = data.to(torch.float16).to(data.dtype) * (1 + way * step)
                        elif data.numel():
                            data = data + way * step * data.abs().max()
                    feeds.append(data)
                moved = run_reference(node, feeds, {"batch": self.batches[k]})
                for y, want in zip(moved, outs[k]):
                    # no floor: the checks weigh a tiny output against its own peak, and a var that
                    # is all rounding is 1e-15, not 0
                    if want.is_floating_point() and want.numel() and float((y - want).abs().max()) > \
                            1e-2 * float(want.abs().max()):
                        return False
        return True

    def _near_an_edge(self, node) -> bool:
        """Whether a nearest grid_sample reads a coordinate within 2^-5 px of a pixel's edge (or 4 times
        its float16 rounding there), where another backend's float16 grid, rounded at other points
        than the float16 model's, reads the next pixel (ir 8000212: 9e-2 off in onnxruntime's fp16;
        scaling the grid, as _stable does, barely moves a coordinate near 0)."""
        x, grid = node.inputs
        align = node.attrs.get("align_corners", False)
        sizes = torch.tensor([x.shape[3], x.shape[2]], dtype=torch.float64)  # grid[..., 0] is the width's

        def pixels(g: torch.Tensor) -> torch.Tensor:
            g = g.double()
            return (g + 1) / 2 * (sizes - 1) if align else ((g + 1) * sizes - 1) / 2

        for data, low in zip(self._data(grid), self._low_data(grid)):
            u = pixels(data)
            margin = max(2**-5, 4 * float((pixels(low) - u).abs().max())) if u.numel() else 0.0
            if u.numel() and float(((u - u.floor()) - 0.5).abs().min()) < margin:
                return True
        return False

    def _wide(self, node, values: list, entries: list[Entry]) -> bool:
        """Set the entries' data as float64 computes them, from their inputs' float64 values (off by
        ABSOLUTE_ERROR's bound where onnxruntime's kernel holds no better). Whether the float32 data
        stay within 1e-5 of their peak of that: where not, float32 rounding (or that bound) is
        amplified (a cancellation inside the node, a pole or a selection of small values downstream
        of it) to a tenth of the checks' 1e-4, and another backend's float32, rounding elsewhere, may
        pass it (ir 3002454: gelu of -4 is x * (1 + erf) with erf one ulp of 1 off -1, 6e-5 of the
        row minima's peak; ir 3002606: tan of a prod of lrn values, near a pole; ir 7001198: a prod of
        silu values of -12, from onnxruntime's Sigmoid 5e-2 off)."""
        wides: list[tuple[torch.Tensor, ...]] = []
        for k in range(2):
            feeds = [None if v is None else self._wide_data(v)[k] for v in values]
            try:
                wide = run_reference(node, feeds, {"batch": self.batches[k]})
            except Exception:  # no float64 kernel (quantization ops): the shadow restarts at the data
                return True
            if node.op in ABSOLUTE_ERROR:
                wide = (wide[0] + ABSOLUTE_ERROR[node.op](feeds[0]),)
            wides.append(wide)
        for i, entry in enumerate(entries):
            wide = (wides[0][i], wides[1][i])
            if entry.exact or any(w.dtype != torch.float64 or w.shape != d.shape for w, d in zip(wide, entry.data)):
                continue
            entry.wide = wide
            for d, w in zip(entry.data, wide):
                if d.dtype == torch.float32 and w.numel() and not float((d.double() - w).abs().max()) <= \
                        1e-5 * float(w.abs().max()):
                    return False
        return True

    def _wide_data(self, value: Value) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._entry(value)
        if entry is not None and entry.wide is not None:
            return entry.wide
        return tuple(d.double() if d.is_floating_point() else d for d in self._data(value))

    def _low(self, node, values: list, outs: list, entries: list[Entry]) -> bool:
        """Set the entries' data as float16 computes it: the node run on its inputs as 16 bits hold
        them, its outputs rounded to 16 bits (but for what fp16 keeps float32: the angle of a tan, of
        a sin / cos where _angle_kept, values past float16's normal range). Whether they stay finite
        and within 1e-2 of their peak: where not, the output is a residue of rounding that no float16
        computation of the graph keeps, whatever fp16 does. The node divides by, squashes or takes the
        angle of a cancellation of larger terms: 1 / 4e-3 left of O(1) terms, softsign of conv_transpose terms
        near 560 that cancel, atan2 of a mean of tanhs that are +-1 in 16 bits."""
        lows: list[list[torch.Tensor]] = [[], []]
        kept = self._angle_kept(node, values, outs)
        for k in range(2):
            if kept:
                lows[k] = outs[k]
            else:
                feeds = [None if v is None else self._low_data(v)[k] for v in values]
                lows[k] = list(run_reference(node, feeds, {"batch": self.batches[k]}))
        for i, entry in enumerate(entries):
            entry.low = (_round16(lows[0][i], entry.data[0]), _round16(lows[1][i], entry.data[0]))
            for y, want in zip(entry.low, entry.data):
                if want.is_floating_point() and want.numel() and not float((y - want).abs().max()) <= \
                        1e-2 * float(want.abs().max()):  # NaN too (acosh of 1 + 1e-4); no floor, as _stable
                    return False
        return True

    def _angle_kept(self, node, values: list, outs: list) -> bool:
        """Whether fp16 keeps the node's angle float32, as slimgraph.passes.precision decides on the
        example inputs: a tan's always, a sin / cos's where it is past 8 times their output's peak
        (ir 5000495: cos(4.7093) = -0.0031 of peak 0.99 is computed from a float16 angle, and the
        reciprocal of it is 2x off)."""
        if node.op == "tan":
            return True
        if node.op not in ANGLES or values[0].dtype != DType.float32:  # fp16 retypes float32 values only
            return False
        angle, out = self._data(values[0])[0], outs[0][0]
        return angle.numel() > 0 and float(angle.abs().max()) > 8 * (float(out.abs().max()) if out.numel() else 1.0)

    def _low_data(self, value: Value) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._entry(value)
        if entry is not None and entry.low is not None:
            return entry.low
        data = self._data(value)
        return tuple(_round16(d, data[0]) for d in data)

    def _entry(self, value: Value) -> Entry | None:
        return next((e for e in self.pool if e.value is value), None)

    def _data(self, value: Value) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._entry(value)
        if entry is not None:
            return entry.data
        return value.const_value, value.const_value


def _sensitive(op: str, attrs: dict) -> bool:
    """Ops drawn on inexact values (unlike JUMPY's) that jump where an input crosses a point, or amplify
    its rounding without bound: atan2 across its branch cut and at (0, 0), where a tiny value flushed to
    zero in float16 gives 0 for pi / 4; nearest grid sampling where a coordinate crosses a pixel's edge;
    layer and group norm and var of rows that are nearly constant (their spread is all rounding: torch's
    float32 atan2 gives pi / 4 one bit lower in its SIMD body than in its scalar tail, so a row of
    atan2(t, t) spans both at some batch sizes, and its var is 1e-15 where onnxruntime's is 0). Each is
    kept only where 16-bit rounding of its inputs does not move it (RandomGraph._stable)."""
    nearest = op == "grid_sample" and attrs.get("mode") == "nearest"
    return op in ("atan2", "layer_norm", "group_norm", "var") or nearest


def _group_norm_cancels(node, values: list, data: list, outs: list) -> bool:
    """Whether torch's float32 group_norm loses its output to its own rounding, on exact inputs too.
    Its CPU kernel computes x * (gamma * rstd) + (beta - mean * gamma * rstd): two terms of size
    |mean| * rstd * |gamma| that cancel, a float32 ulp of that size off (onnxruntime subtracts the
    mean first; float64 graphs are held to float32's bound too). Where a group is nearly constant
    beside its mean (copies of one value: spread 0, rstd 1 / sqrt(eps)) that ulp passes the checks'
    1e-4 of the peak; drawn only where it stays under 1e-5 (ir 3001204: two copies of 14.25 gave
    14.25 / sqrt(1e-5) = 4506, so the bias came back 5.6e-5 off, and 2.2e-4 off as the ONNX file's
    group_norm, mul, add)."""
    groups, eps = node.attrs["num_groups"], node.attrs["eps"]
    for k in range(2):
        x, y = data[0][k].double(), outs[k][0]
        if not x.numel():
            continue
        grouped = x.reshape(x.shape[0], groups, -1)
        rstd = (grouped.var(-1, unbiased=False) + eps).rsqrt()
        weighted = len(values) > 1 and values[1] is not None
        gamma = data[1][k].double().abs() if weighted else torch.ones(x.shape[1], dtype=torch.float64)
        size = grouped.mean(-1).abs() * rstd * gamma.reshape(groups, -1).amax(-1)
        if 2.0**-23 * float(size.max()) > 1e-5 * float(y.abs().max()):
            return True
    return False


def _round16(t: torch.Tensor, example: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 tensor as fp16 holds it: rounded to float16 unless the value's peak at the example
    inputs (``example``, where fp16 decides; t itself without) is past float16's normal range or 0 <
    peak < its smallest normal (fp16 keeps such values float32); other dtypes as they are. A value
    that is 0 at the example inputs and 1.7e-7 at the others is float16 there (ir 11000386)."""
    example = t if example is None else example
    if t.dtype != torch.float32 or not t.numel() or not example.numel():
        return t
    peak, f16 = float(example.abs().max()), torch.finfo(torch.float16)
    return t.to(torch.float16).to(t.dtype) if not 0 < peak < f16.tiny and peak <= f16.max / 2 else t


def _bounded(t: torch.Tensor) -> bool:
    if not t.dtype.is_floating_point:
        return t.dtype == torch.bool or int(t.abs().max()) < 2**20 if t.numel() else True
    return bool(torch.isfinite(t).all()) and (t.numel() == 0 or float(t.abs().max()) <= LIMIT)


def _on_grid(t: torch.Tensor) -> bool:
    if not t.dtype.is_floating_point:
        return True
    return t.numel() == 0 or bool(((t / GRID).remainder(1) == 0).all() and t.abs().max() < 256)


# ---------------------------------------------------------------------------- generic ops
@functools.cache
def generic_ops() -> dict[str, int]:
    """Registered ops whose reference takes no attributes and keeps its operands' shape: op -> arity
    (1 or 2; 2 broadcasting). Found by running each on sample data, so new ops join by themselves."""
    found = {}
    probes = [torch.rand(2, 3) * 0.8 + 0.1, torch.arange(6).reshape(2, 3), torch.rand(2, 3) > 0.5]
    for name, opdef in registered_ops().items():
        if name in SAMPLERS or name in NOT_DRAWN or opdef.num_inputs[0] not in (1, 2):
            continue
        arity = opdef.num_inputs[0]
        for p in probes:
            try:
                y = opdef.reference([p] * arity, {})
            except Exception:
                continue
            if isinstance(y, torch.Tensor) and y.shape == p.shape:
                found[name] = arity
                break
    return found


def drawable_ops() -> set[str]:
    return set(generic_ops()) | set(SAMPLERS)


@functools.cache
def _domain(op: str) -> int:
    """Where a unary op is finite: 0 everywhere, 1 on (0, 1), 2 on (1, 2) (log, acos, acosh)."""
    reference = registered_ops()[op].reference
    sample = torch.linspace(-4, 4, 81)
    for way, xs in enumerate((sample, torch.sigmoid(sample), torch.sigmoid(sample) + 1)):
        if torch.isfinite(reference([xs], {})).all():
            return way
    return 0


def _adapt(b: RandomGraph, entry: Entry, way: int) -> Entry:
    """entry brought into an op's domain by sigmoid(tanh(entry)) (and + 1)."""
    if way == 0:
        return entry
    entry = b.node("sigmoid", [b.node("tanh", [entry])])  # within (0.26, 0.74): no backend rounds it to 0
    return entry if way == 1 else b.node("add", [entry, b.const((), "int", low=1, high=2)])


def generic_sample(b: RandomGraph, op: str):
    arity = generic_ops()[op]
    jumpy = op in JUMPY or op.startswith(("logical_", "bitwise_")) or op in {"eq", "ne", "lt", "le", "gt", "ge"}
    floating = None if op.startswith(("logical_", "bitwise_")) else True
    x = b.pick(exact=jumpy, floating=floating, where=(lambda e: not e.is_float) if op.startswith("bitwise_") else None)
    if arity == 1:
        return op, [x if jumpy or not x.is_float else _adapt(b, x, _domain(op))], {}
    kind = b.rng.random()
    if kind < 0.2:
        y = x  # the same value twice: x + x, x * x
    elif kind < 0.6:
        y = b.pick(exact=jumpy, floating=floating,
                   where=lambda e: e.shape == x.shape and e.value.dtype == x.value.dtype)
    else:  # a constant that broadcasts: scalar, per-channel or a trailing row
        shape = b.rng.choice([(), (x.shape[-1],) if x.rank else (), (x.shape[1], *[1] * (x.rank - 2)) if x.rank >= 2
                              else ()])
        y = b.const(shape, "grid" if jumpy or x.exact else b.rng.choice(("normal", "positive")),
                    dtype=x.value.dtype.torch)
    if op == "pow":  # small exponents keep powers bounded and real
        y = b.const((), "int", low=1, high=4, dtype=x.value.dtype.torch)
    return op, ([x, y] if b.rng.random() < 0.7 else [y, x]), {}


# ---------------------------------------------------------------------------- samplers
def _x(b: RandomGraph, rank=(1, 9), **kw) -> Entry:
    return b.pick(rank=rank, **kw)


def _reduce(b, op):
    x = _x(b, exact=op in JUMPY or op == "any", floating=None if op == "any" else True)
    axes = sorted({b.axis(x) % x.rank: None for _ in range(b.rng.randint(1, 2))})  # distinct dims
    attrs = {"axes": axes[:1] if op in ("argmax", "argmin") else axes, "keepdim": b.rng.random() < 0.5}
    if op in ("argmax", "argmin") and not x.distinct(axes[0] % x.rank):
        raise Rejected("ties")
    if op == "var":
        attrs["correction"] = b.rng.choice((0, 1))
    return op, [x], attrs


def _axis_op(b, op):
    x = _x(b)
    return op, [x], {"axis": b.axis(x, 0 if b.rng.random() < 0.2 else 1)}


def _ordering(b, op):
    x = _x(b, exact=True)
    axis = b.axis(x, indexed=op == "topk")
    if not x.distinct(axis % x.rank):
        raise Rejected("ties")
    if op == "sort":
        return op, [x], {"axis": axis, "descending": b.rng.random() < 0.5}
    return op, [x], {"axis": axis, "k": b.rng.randint(1, x.shape[axis]), "largest": b.rng.random() < 0.7}


def _conv(b, op):
    x = _x(b, rank=(3, 4))
    c, nd = x.shape[1], x.rank - 2
    groups = b.rng.choice([g for g in (1, 1, 2, 3, c) if c % g == 0])
    out = groups * b.rng.randint(1, 3) if groups > 1 else b.rng.randint(2, 8)
    k = b.rng.choice((1, 2, 3))
    if op == "conv":
        w = b.const((out, c // groups, *[k] * nd))
        attrs = {"stride": [b.rng.choice((1, 1, 2))] * nd, "pads": [b.rng.randint(0, k // 2)] * 2 * nd,
                 "dilation": [b.rng.choice((1, 1, 2))] * nd, "groups": groups}
    else:
        w = b.const((c, out // groups if groups > 1 else out, *[k] * nd))
        s = b.rng.choice((1, 2))
        attrs = {"stride": [s] * nd, "padding": [b.rng.randint(0, k // 2)] * nd,
                 "output_padding": [b.rng.randint(0, s - 1)] * nd, "groups": groups, "dilation": [1] * nd}
    bias = [b.const((w.shape[0] if op == "conv" else w.shape[1] * groups,))] if b.rng.random() < 0.6 else []
    return op, [x, w, *bias], attrs


def _pool(b, op):
    x = _x(b, rank=(3, 4))
    nd, k = x.rank - 2, b.rng.choice((2, 3))
    s = b.rng.choice((1, 2, k))
    attrs = {"kernel": [k] * nd, "stride": [s] * nd, "pads": [b.rng.randint(0, k // 2)] * 2 * nd,
             "ceil_mode": b.rng.random() < 0.3}
    if op == "avg_pool":
        attrs["count_include_pad"] = b.rng.random() < 0.5
    return op, [x], attrs


def _adaptive(b, op):
    x = _x(b, rank=(3, 4))
    return op, [x], {"output_size": [b.rng.choice((1, 2, 3))] * (x.rank - 2)}


def _norm(b, op):
    x = _x(b, rank=(2, 4))
    c = x.shape[1]
    if op == "batch_norm":
        return op, [x, b.const((c,), "positive"), b.const((c,)), b.const((c,)), b.const((c,), "positive")], \
            {"eps": 1e-5}
    if op == "layer_norm":
        k = b.rng.randint(1, x.rank - 1)
        shape = list(x.shape[x.rank - k:])
        return op, [x, b.const(tuple(shape), "positive"), b.const(tuple(shape))], {"normalized_shape": shape,
                                                                                   "eps": 1e-5}
    if op == "group_norm":
        size = math.prod(x.shape[1:]) // c  # a group of one element is (x - mean) / sqrt(eps): all rounding
        groups = [g for g in (1, 2, 3, c) if c % g == 0 and c // g * size > 1]
        if not groups:
            raise Rejected("every group would hold one element")
        groups = b.rng.choice(groups)
        return op, [x, b.const((c,), "positive"), b.const((c,))], {"num_groups": groups, "eps": 1e-5}
    return op, [x], {"size": b.rng.choice((2, 3)), "alpha": 1e-4, "beta": 0.75, "k": 1.0}  # lrn


def _linear(b, op):
    x = _x(b, rank=(2, 4))
    k, n = x.shape[-1], b.rng.randint(2, 10)
    if op == "linear":
        return op, [x, b.const((n, k)), *([b.const((n,))] if b.rng.random() < 0.7 else [])], {}
    if b.rng.random() < 0.5:  # x @ W
        return op, [x, b.const((k, n))], {}
    if x.rank < 3:
        raise Rejected("no batched matrix")
    perm = list(range(x.rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return op, [x, b.node("permute", [x], {"perm": perm})], {}  # x @ x^T


def _attention(b, op):
    x = _x(b, rank=(3, 3), where=lambda e: e.shape[-1] >= 2)
    heads = b.rng.choice([h for h in (1, 2, 3, 4) if x.shape[-1] % h == 0])
    dim = heads * b.rng.choice((1, 2, 4))
    q, k, v = (b.node("linear", [x, b.const((dim, x.shape[-1]))]) for _ in range(3))
    return op, [q, k, v], {"num_heads": heads, "scale": (dim // heads) ** -0.5}


def _dropout(b, op):
    attrs = {"p": b.rng.choice((0.0, 0.1, 0.5))}
    if op == "stochastic_depth":
        attrs["mode"] = b.rng.choice(("row", "batch"))
    return op, [_x(b)], attrs


def _cast(b, op):
    x = _x(b, floating=None)
    choices = ["float32", "float64"] + (["int64", "int32", "bool"] if x.exact else [])
    return op, [x], {"dtype": b.rng.choice(choices)}


def _unary_attr(b, op):
    x = _x(b)
    attrs = {"clip": lambda: b.rng.choice(({"min": -1.0, "max": 1.0}, {"min": 0.0}, {"max": 0.5})),
             "leaky_relu": lambda: {"negative_slope": b.rng.choice((0.01, 0.2))},
             "elu": lambda: {"alpha": b.rng.choice((1.0, 0.5))},
             "gelu": lambda: {"approximate": b.rng.choice(("none", "tanh"))}}[op]()
    return op, [x], attrs


def _div(b, op):
    x = _x(b)
    if b.rng.random() < 0.5:
        return op, [x, b.const((), "positive")], {}
    x = _x(b, exact=True)
    return op, [x, b.const((), "int", low=1, high=4)], {"rounding_mode": b.rng.choice(("trunc", "floor"))}


def _where(b, op):
    cond = b.pick(exact=True, floating=False, where=lambda e: e.value.dtype.torch == torch.bool)
    x = b.pick(where=lambda e: e.shape == cond.shape)
    y = b.pick(where=lambda e: e.shape == x.shape and e.value.dtype == x.value.dtype) if b.rng.random() < 0.5 \
        else b.const((), "grid", dtype=x.value.dtype.torch)
    return op, [cond, x, y], {}


def _prelu(b, op):
    x = _x(b, rank=(2, 4))
    return op, [x, b.const((x.shape[1], *[1] * (x.rank - 2)), "positive")], {}


def _reshape(b, op):
    x = _x(b, rank=(2, 4))
    rest = x.shape[1:]
    n = math.prod(rest)
    splits = [d for d in range(2, n) if n % d == 0]
    inner = [b.rng.choice(splits), -1] if splits and b.rng.random() < 0.6 else [n]
    return op, [x], {"shape": [b.size(x, 0), *inner]}


def _permute(b, op):
    x = _x(b, rank=(2, 4))
    tail = list(range(1, x.rank))
    b.rng.shuffle(tail)
    return op, [x], {"perm": [0, *tail]}


def _flatten(b, op):
    x = _x(b, rank=(2, 4))
    start = b.rng.randrange(1, x.rank)
    return op, [x], {"start": start, "end": b.rng.randrange(start, x.rank)}


def _squeeze(b, op):
    if op == "unsqueeze":
        x = _x(b, rank=(1, 4))
        return op, [x], {"axes": [b.rng.randint(1, x.rank)]}
    x = _x(b, rank=(2, 5), where=lambda e: 1 in e.shape[1:])
    return op, [x], {"axes": [1 + x.shape[1:].index(1)]}


def _expand(b, op):
    x = _x(b, rank=(2, 4), where=lambda e: 1 in e.shape[1:])
    axis = 1 + x.shape[1:].index(1)
    if op == "expand":
        shape = [-1] * x.rank
        shape[axis] = b.rng.randint(2, 4)
        return op, [x], {"shape": shape}
    row = b.const(x.shape[1:])  # a constant broadcast to the batch of x (class tokens)
    return op, [row, x], {"shape": ["N", *x.shape[1:]]}


def _tile(b, op):
    x = _x(b, rank=(2, 4))
    return op, [x], {"repeats": [1] + [b.rng.choice((1, 2)) for _ in range(x.rank - 1)]}


def _flip_roll(b, op):
    x = _x(b, rank=(2, 4))
    dims = sorted({b.axis(x) % x.rank for _ in range(b.rng.randint(1, 2))})
    if op == "flip":
        return op, [x], {"dims": dims}
    return op, [x], {"dims": dims, "shifts": [b.rng.randint(-3, 3) for _ in dims]}


def _slice(b, op):
    x = _x(b, rank=(2, 4), where=lambda e: max(e.shape[1:]) > 1)
    axis = b.rng.choice([a for a in range(1, x.rank) if x.shape[a] > 1])
    n = x.shape[axis]
    start = b.rng.randrange(0, n - 1)
    end = b.rng.choice((n, start + 1 + b.rng.randrange(n - start)))
    return op, [x], {"axes": [axis], "starts": [start], "ends": [end], "steps": [b.rng.choice((1, 1, 2))]}


def _select(b, op):
    x = _x(b, rank=(2, 4))
    axis = b.axis(x, indexed=True)
    return op, [x], {"axis": axis, "index": b.rng.randrange(-x.shape[axis], x.shape[axis])}


def _split(b, op):
    x = _x(b, rank=(2, 4), where=lambda e: max(e.shape[1:]) > 1)
    axis = b.rng.choice([a for a in range(1, x.rank) if x.shape[a] > 1])
    first = b.rng.randint(1, x.shape[axis] - 1)
    return op, [x], {"axis": axis, "sizes": [first, x.shape[axis] - first]}


def _concat(b, op):
    x = _x(b, rank=(1, 4))
    axis = b.axis(x)
    others = [e for e in b.pool if e.rank == x.rank and e.value.dtype == x.value.dtype and all(
        p == q for i, (p, q) in enumerate(zip(e.shape, x.shape)) if i != axis % x.rank)]
    parts = [x] + [b.rng.choice(others) for _ in range(b.rng.randint(1, 2))]  # x itself may come again
    return op, parts, {"axis": axis}


def _pad(b, op):
    x = _x(b, rank=(3, 4))
    mode = b.rng.choice(("constant", "constant", "reflect", "replicate"))
    pads = [b.rng.randint(0, 1) for _ in range(2 * (x.rank - 2))]
    attrs = {"pads": pads, "mode": mode}
    if mode == "constant":
        attrs["value"] = b.rng.choice((0.0, 0.5))
    return op, [x], attrs


def _gather(b, op):
    x = _x(b, rank=(2, 4))
    axis = b.axis(x, indexed=True)
    n = x.shape[axis]
    if op == "gather":
        return op, [x], {"axis": axis, "indices": [b.rng.randrange(n) for _ in range(b.rng.randint(1, n + 1))]}
    if op == "take":
        return op, [x, b.const((b.rng.randint(1, 3),), "int", torch.int64, -n, n)], {"axis": axis}
    if op == "index":
        return op, [x, b.const((b.rng.randint(1, 4),), "int", torch.int64, 0, n)], {"axes": [axis % x.rank]}
    shape = list(x.shape)  # gather_elements / scatter: an index as big as x but for the batch
    if x.batched:
        raise Rejected("an index constant cannot follow a symbolic batch")
    index = b.const(tuple(shape), "int", torch.int64, 0, n)
    if op == "gather_elements":
        return op, [x, index], {"axis": axis}
    if op == "scatter":  # distinct targets per row keep "none" deterministic
        index = b.graph.add_constant(f"c{len(b.graph.constants)}", torch.arange(n).flip(0).reshape(
            [n if a == axis % x.rank else 1 for a in range(x.rank)]).expand(shape).contiguous())
        b._new_constants.append(index)
        return op, [x, index, x], {"axis": axis, "reduce": b.rng.choice(("none", "sum", "amax", "amin"))}
    raise Rejected(op)


def _index_put(b, op):
    x = _x(b, rank=(2, 4))
    axis = b.axis(x, indexed=True) % x.rank
    n = x.shape[axis]
    idx = b.graph.add_constant(f"c{len(b.graph.constants)}", torch.randperm(n)[:b.rng.randint(1, n)])
    b._new_constants.append(idx)
    shape = [idx.shape[0] if a == axis else d for a, d in enumerate(x.shape)][axis:]
    return op, [x, b.const(tuple(shape)), idx], {"axes": [axis], "accumulate": b.rng.random() < 0.5}


def _diagonal(b, op):
    x = _x(b, rank=(3, 4))
    d1, d2 = b.rng.sample(range(1, x.rank), 2)
    return op, [x], {"dim1": d1, "dim2": d2, "offset": b.rng.choice((0, 0, 1, -1))}


def _resize(b, op):
    x = _x(b, rank=(3, 4))
    mode = b.rng.choice(("nearest", "linear") if x.rank == 3 else ("nearest", "linear", "cubic"))
    attrs = {"mode": mode, "size": [d * b.rng.choice((1, 2)) for d in x.shape[2:]]}
    if mode != "nearest":
        attrs["align_corners"] = b.rng.random() < 0.5
    return op, [x], attrs


def _grid_sample(b, op):
    x = _x(b, rank=(4, 4))
    src = _x(b, rank=(4, 4), where=lambda e: e.shape[1] >= 2 and e.batched == x.batched)
    grid = b.node("tanh", [b.node("permute", [b.node("slice", [src], {"axes": [1], "starts": [0], "ends": [2],
                                                                      "steps": [1]})], {"perm": [0, 2, 3, 1]})])
    return op, [x, grid], {"mode": b.rng.choice(("bilinear", "nearest")),
                           "padding_mode": b.rng.choice(("zeros", "border")), "align_corners": b.rng.random() < 0.5}


def _embedding(b, op):
    ids_from = _x(b, exact=True, rank=(1, 3))
    vocab = b.rng.randint(3, 9)
    ids = b.node("remainder", [b.node("cast", [ids_from], {"dtype": "int64"}), b.const((), "int", torch.int64,
                                                                                        vocab, vocab + 1)])
    return op, [b.const((vocab, b.rng.randint(2, 8)), "grid"), ids], {}


def _quant(b, op):
    x = _x(b, exact=op != "dequantize_linear", floating=op != "dequantize_linear",
           where=(lambda e: e.value.dtype.torch == torch.int8) if op == "dequantize_linear" else None)
    scale = b.graph.add_constant(f"c{len(b.graph.constants)}", torch.tensor(b.rng.choice((0.25, 0.5, 1.0))))
    b._new_constants.append(scale)  # a power of two: exact values quantize exactly
    return op, [x, scale, b.const((), "int", torch.int8, -3, 3)], {}


def _made(b, op):
    """arange / full / sizes: tensors made from sizes alone."""
    x = _x(b, rank=(1, 4))
    n = x.shape[-1]
    if op == "arange":
        step = b.rng.choice((1, 2))
        return op, [], {"start": 0, "end": n * step, "step": step, "dtype": str(x.value.dtype.torch).split(".")[1]}
    if op == "full":
        return op, [], {"shape": [n], "value": b.rng.choice((0.5, -1.25)), "dtype": str(x.value.dtype.torch)[6:]}
    return op, [], {"values": [b.size(x, 0), *x.shape[1:]], "shape": [x.rank]}


SAMPLERS: dict[str, Sample] = {
    **dict.fromkeys(("mean", "sum", "amax", "amin", "prod", "any", "var", "argmax", "argmin"), _reduce),
    **dict.fromkeys(("softmax", "log_softmax", "cumsum"), _axis_op),
    **dict.fromkeys(("sort", "topk"), _ordering),
    **dict.fromkeys(("conv", "conv_transpose"), _conv),
    **dict.fromkeys(("max_pool", "avg_pool"), _pool),
    **dict.fromkeys(("adaptive_avg_pool", "adaptive_max_pool"), _adaptive),
    **dict.fromkeys(("batch_norm", "layer_norm", "group_norm", "lrn"), _norm),
    **dict.fromkeys(("linear", "matmul"), _linear),
    **dict.fromkeys(("clip", "leaky_relu", "elu", "gelu"), _unary_attr),
    **dict.fromkeys(("squeeze", "unsqueeze"), _squeeze),
    **dict.fromkeys(("expand", "expand_batch"), _expand),
    **dict.fromkeys(("flip", "roll"), _flip_roll),
    **dict.fromkeys(("gather", "take", "index", "gather_elements", "scatter"), _gather),
    **dict.fromkeys(("quantize_linear", "dequantize_linear", "fake_quant"), _quant),
    **dict.fromkeys(("arange", "full", "sizes"), _made),
    **dict.fromkeys(("dropout", "stochastic_depth"), _dropout),
    "attention": _attention, "cast": _cast, "div": _div, "where": _where, "prelu": _prelu, "reshape": _reshape,
    "permute": _permute, "flatten": _flatten, "tile": _tile, "slice": _slice, "select": _select, "split": _split,
    "concat": _concat, "pad": _pad, "index_put": _index_put, "diagonal": _diagonal, "resize": _resize,
    "grid_sample": _grid_sample, "embedding": _embedding,
}


class GraphModel(torch.nn.Module):
    """A RandomGraph as the net the properties compare against: the interpreter on its graph."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.random = RandomGraph(seed)
        self.graph = self.random.graph.clone()  # never handed to a pass
        self.dtype, self.symbolic = self.random.dtype, self.random.symbolic
        self.input_names, self.dynamic_dims = self.random.input_names, self.random.dynamic_dims

    def example(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.random.example(batch, seed)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from slimgraph.ir import run

        return tuple(run(self.graph, [x, g]))
