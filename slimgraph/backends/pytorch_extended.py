"""PyTorch source for the wider op surface: math functions, comparisons, reductions, indexing and
resampling, each one torch call. Registered into ``pytorch.EMITTERS`` on import."""

from __future__ import annotations

from slimgraph.backends.pytorch import _HELPERS, EMITTERS, _lit, emitter

for _name in ("sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "ceil",
              "floor", "round", "trunc", "sign", "reciprocal", "expm1", "log1p", "log2", "log10", "isnan", "isinf",
              "logical_not", "bitwise_not"):
    EMITTERS[_name] = (lambda name: lambda ctx, node, a: f"torch.{name}({a[0]})")(_name)
for _name in ("softsign", "mish", "logsigmoid", "softplus", "selu"):
    EMITTERS[_name] = (lambda name: lambda ctx, node, a: f"F.{name}({a[0]})")(_name)
for _name in ("eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "bitwise_and",
              "bitwise_or", "bitwise_xor", "fmod", "remainder", "atan2"):
    EMITTERS[_name] = (lambda name: lambda ctx, node, a: (
        f"torch.{name}({ctx.tensor(node.inputs[0])}, {ctx.tensor(node.inputs[1])})"))(_name)


def _keep(node) -> str:
    return f"keepdim={bool(node.attrs.get('keepdim', False))}"


EMITTERS["where"] = lambda ctx, node, a: (
    f"torch.where({a[0]}, {ctx.tensor(node.inputs[1])}, {ctx.tensor(node.inputs[2])})")
EMITTERS["amax"] = lambda ctx, node, a: f"torch.amax({a[0]}, {_lit(node.attrs['axes'])}, {_keep(node)})"
EMITTERS["amin"] = lambda ctx, node, a: f"torch.amin({a[0]}, {_lit(node.attrs['axes'])}, {_keep(node)})"
EMITTERS["var"] = lambda ctx, node, a: (
    f"torch.var({a[0]}, {_lit(node.attrs['axes'])}, correction={node.attrs.get('correction', 1)!r}, {_keep(node)})")
EMITTERS["argmax"] = lambda ctx, node, a: f"torch.argmax({a[0]}, {node.attrs['axes'][0]}, {_keep(node)})"
EMITTERS["argmin"] = lambda ctx, node, a: f"torch.argmin({a[0]}, {node.attrs['axes'][0]}, {_keep(node)})"
EMITTERS["cumsum"] = lambda ctx, node, a: f"torch.cumsum({a[0]}, {node.attrs['axis']})"
EMITTERS["flip"] = lambda ctx, node, a: f"torch.flip({a[0]}, {_lit(node.attrs['dims'])})"
EMITTERS["tile"] = lambda ctx, node, a: f"{a[0]}.repeat({_lit(node.attrs['repeats'])})"
EMITTERS["embedding"] = lambda ctx, node, a: f"F.embedding({a[1]}, {a[0]})"
EMITTERS["gather_elements"] = lambda ctx, node, a: f"torch.gather({a[0]}, {node.attrs['axis']}, {a[1]}.long())"
EMITTERS["diagonal"] = lambda ctx, node, a: (
    f"torch.diagonal({a[0]}, {node.attrs.get('offset', 0)}, {node.attrs['dim1']}, {node.attrs['dim2']})")
EMITTERS["topk"] = lambda ctx, node, a: (
    f"torch.topk({a[0]}, {node.attrs['k']}, {node.attrs['axis']}, {bool(node.attrs.get('largest', True))})")
EMITTERS["sort"] = lambda ctx, node, a: (
    f"torch.sort({a[0]}, dim={node.attrs['axis']}, descending={bool(node.attrs.get('descending', False))}, "
    f"stable=True)")
EMITTERS["grid_sample"] = lambda ctx, node, a: (
    f"F.grid_sample({a[0]}, {a[1]}, {node.attrs['mode']!r}, {node.attrs['padding_mode']!r}, "
    f"{bool(node.attrs['align_corners'])})")


@emitter("prod", "any")
def emit_reduce_by_axis(ctx, node, a):
    expr, keep = a[0], bool(node.attrs.get("keepdim", False))
    rank = node.inputs[0].rank
    for axis in sorted((d % rank for d in node.attrs["axes"]), reverse=True):
        expr = f"torch.{node.op}({expr}, {axis}, keepdim={keep})"
    return expr


def _index_expr(a0: str, axes: list[int], indices: list[str], rank: int) -> str:
    axes = [a % rank for a in axes]
    parts = [":"] * (max(axes) + 1)
    for axis, idx in zip(axes, indices):
        parts[axis] = f"{idx}.long()"
    return f"{a0}[{', '.join(parts)}]"


EMITTERS["take"] = lambda ctx, node, a: _index_expr(a[0], [node.attrs["axis"]], [a[1]], node.inputs[0].rank)
EMITTERS["index"] = lambda ctx, node, a: _index_expr(a[0], node.attrs["axes"], [a[i] for i in range(1, len(a))],
                                                     node.inputs[0].rank)


@emitter("index_put")
def emit_index_put(ctx, node, a):
    axes = node.attrs["axes"]
    slots = ["None"] * (max(axes) + 1)
    for axis, i in zip(axes, range(2, len(a))):
        slots[axis] = f"{a[i]}.long()"
    values = a[1] if node.inputs[1].dtype == node.inputs[0].dtype else f"{a[1]}.to({a[0]}.dtype)"
    return (f"torch.ops.aten.index_put.default({a[0]}, [{', '.join(slots)}], {values}, "
            f"{bool(node.attrs.get('accumulate', False))})")


@emitter("scatter")
def emit_scatter(ctx, node, a):
    reduce, axis = node.attrs.get("reduce", "none"), node.attrs["axis"]
    if reduce == "none":
        return f"torch.scatter({a[0]}, {axis}, {a[1]}.long(), {a[2]})"
    return f"torch.scatter_reduce({a[0]}, {axis}, {a[1]}.long(), {a[2]}, {reduce!r}, include_self=True)"


@emitter("conv_transpose")
def emit_conv_transpose(ctx, node, a):
    at = node.attrs
    nd = node.inputs[1].rank - 2
    bias = a[2] if len(node.inputs) > 2 and node.inputs[2] is not None else "None"
    return (f"F.conv_transpose{nd}d({a[0]}, {a[1]}, {bias}, {_lit(at['stride'])}, {_lit(at['padding'])}, "
            f"{_lit(at['output_padding'])}, {at['groups']}, {_lit(at['dilation'])})")


_MODES = {"nearest": "nearest", "cubic": "bicubic"}


@emitter("resize")
def emit_resize(ctx, node, a):
    at = node.attrs
    nd = node.inputs[0].rank - 2
    mode = _MODES.get(at["mode"]) or {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
    align = f", align_corners={bool(at.get('align_corners'))}" if at["mode"] != "nearest" else ""
    if at.get("scales"):
        return f"F.interpolate({a[0]}, scale_factor={_lit(list(at['scales']))}, mode={mode!r}{align})"
    return f"F.interpolate({a[0]}, size={_lit(list(at['size']))}, mode={mode!r}{align})"


@emitter("div")
def emit_div(ctx, node, a):
    mode = node.attrs.get("rounding_mode")
    return f"torch.div({a[0]}, {a[1]}, rounding_mode={mode!r})" if mode else f"{a[0]} / {a[1]}"


EMITTERS["arange"] = lambda ctx, node, a: (
    f"torch.arange({_lit(node.attrs['start'])}, {_lit(node.attrs['end'])}, {_lit(node.attrs['step'])}, "
    f"dtype=torch.{node.attrs['dtype']})")
EMITTERS["full"] = lambda ctx, node, a: (
    f"torch.full({_lit(list(node.attrs['shape']))}, {_lit(node.attrs['value'])}, dtype=torch.{node.attrs['dtype']})")
EMITTERS["sizes"] = lambda ctx, node, a: (
    f"torch.tensor({_lit(list(node.attrs['values']))}, dtype=torch.int64).reshape({_lit(list(node.attrs['shape']))})")


@emitter("prelu")
def emit_prelu(ctx, node, a):
    x, slope = node.inputs
    if slope.rank == 1 and x.rank > 1:  # per channel (axis 1) or one slope: nn.PReLU's
        # the IR promotes (a float64 x with a float32 slope), F.prelu refuses mixed types
        out = node.outputs[0].dtype
        data, name = (arg if v.dtype == out else f"{arg}.to({out.torch})" for v, arg in zip(node.inputs, a))
        return f"F.prelu({data}, {name})"
    return f"torch.where({a[0]} >= 0, {a[0]}, {a[0]} * {a[1]})"


# weight-only quantization: the module's state dict holds the packed uint8 weights, unpacked per call
_HELPERS["matmul_nbits"] = '''
def matmul_nbits(x, w, scales, zero_points, bits, block_size, k, bias=None):
    """x @ W.T (+ bias), W unpacked at run time from uint8 w [N, blocks, block_size * bits / 8] (4-bit:
    two values a byte, the first in the low bits), scales [N, blocks] and zero points packed as w:
    W[n, i] = (q[n, i] - zero_point[n, i // block_size]) * scale[n, i // block_size]."""
    n, blocks = scales.shape
    if bits == 4:
        w = torch.stack((w & 15, w >> 4), -1).flatten(-2)
        zero_points = torch.stack((zero_points & 15, zero_points >> 4), -1).flatten(-2)
    q = w.reshape(n, blocks, block_size).float() - zero_points[:, :blocks, None].float()
    weight = (q * scales.float()[..., None]).reshape(n, blocks * block_size)[:, :k].to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
'''


@emitter("matmul_nbits")
def emit_matmul_nbits(ctx, node, a):
    ctx.uses_helpers.add("matmul_nbits")
    bias = f", {a[4]}" if len(node.inputs) > 4 else ""
    at = node.attrs
    return f"matmul_nbits({a[0]}, {a[1]}, {a[2]}, {a[3]}, {at['bits']}, {at['block_size']}, {at['K']}{bias})"
