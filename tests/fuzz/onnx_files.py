"""Mutated ONNX files, drawn by hypothesis: byte-level damage (truncation, flipped and inserted
bytes) and protobuf-level edits that keep the file parseable but wrong (dims, element types, op
types, attributes, initializer sizes, duplicate and missing names, cycles, huge declared shapes,
external-data paths, opsets). ``check_file`` feeds one to ``optimize(path, "dce")`` and
``to_onnx``: the only allowed outcomes are a checked model or a SlimgraphError, with no file
written on failure."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from functools import lru_cache

import onnx
import torch
from hypothesis import strategies as st
from onnx import helper

import slimgraph
from slimgraph.errors import SlimgraphError
from tests.zoo.onnx_data import DATA

OP_TYPES = sorted({s.name for s in onnx.defs.get_all_schemas()}) + ["NoSuchOp", ""]
AWKWARD_INTS = [0, 1, -1, 2, 3, 7, -7, 64, 2**31 - 1, -(2**31), 2**62, 10**12]


class Disallowed(Exception):
    """An outcome outside the allowed ones."""


class Hang(BaseException):
    """Raised by an alarm; a BaseException so no `except Exception` on the way can swallow it."""


@lru_cache(maxsize=1)
def sources() -> tuple[tuple[str, bytes], ...]:
    """The files mutations start from: small light-zoo models, random nets written by slimgraph,
    random transformers written by torch.onnx.export (Shape -> Gather -> Reshape chains over
    symbolic batch and sequence), and hand-made graphs with a subgraph and an initializer."""
    from tests.fuzz.nets import RandomNet, RandomTransformer

    files = [(f"light_{n}", (DATA / "light" / f"light_{n}.onnx").read_bytes()) for n in ("squeezenet",)]
    for seed in range(4):
        net = RandomNet(seed).eval()
        graph = slimgraph.import_model(net, (net.example(),))
        files.append((f"cnn {seed}", slimgraph.to_onnx(graph, dynamic_batch=True).SerializeToString()))
    for seed in (0, 4, 9, 20):
        net = RandomTransformer(seed).eval()
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, net.example(), buffer, dynamo=False, input_names=net.input_names,
                              dynamic_axes=net.dynamic_dims)
        files.append((f"transformer {seed} (torch.onnx.export)", buffer.getvalue()))
        graph = slimgraph.import_model(net, net.example())
        files.append((f"transformer {seed}", slimgraph.to_onnx(graph, dynamic_batch=True).SerializeToString()))
    files.append(("if-subgraph", _with_subgraph().SerializeToString()))
    return tuple(files)


def _with_subgraph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 4], [0.1 * i for i in range(16)])
    branch = lambda op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["h"], ["out"])], op, [], [helper.make_tensor_value_info("out", 1, None)])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", 1, [], [0.0])),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch("Relu"), else_branch=branch("Sigmoid")),
    ]
    graph = helper.make_graph(nodes, "with_if", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ------------------------------------------------------------------------- byte-level mutations
def truncate(draw, data: bytes) -> bytes:
    return data[:draw(st.integers(0, max(len(data) - 1, 0)))]


def flip_bytes(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(out) - 1))
        out[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def insert_bytes(draw, data: bytes) -> bytes:
    i = draw(st.integers(0, len(data)))
    return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]


# ---------------------------------------------------------------------- protobuf-level mutations
def _tensor_types(model: onnx.ModelProto) -> list:
    g = model.graph
    return [v.type.tensor_type for v in [*g.input, *g.output, *g.value_info] if v.type.HasField("tensor_type")]


def set_dim(draw, model: onnx.ModelProto) -> None:
    """A dim of a declared input, output or value_info, or of an initializer."""
    shapes = [t.shape for t in _tensor_types(model) if t.HasField("shape") and t.shape.dim]
    inits = [t for t in model.graph.initializer if t.dims]
    if inits and (not shapes or draw(st.booleans())):
        t = draw(st.sampled_from(inits))
        t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.sampled_from(AWKWARD_INTS))
    elif shapes:
        dim = draw(st.sampled_from(shapes)).dim
        d = dim[draw(st.integers(0, len(dim) - 1))]
        if draw(st.booleans()):
            d.dim_value = draw(st.sampled_from(AWKWARD_INTS))
        else:
            d.dim_param = draw(st.sampled_from(["N", "seq", "", "batch*2", "?"]))


def set_dtype(draw, model: onnx.ModelProto) -> None:
    types = _tensor_types(model)
    inits = list(model.graph.initializer)
    dtype = draw(st.integers(0, 26))
    if inits and (not types or draw(st.booleans())):
        draw(st.sampled_from(inits)).data_type = dtype
    elif types:
        draw(st.sampled_from(types)).elem_type = dtype


def set_op_type(draw, model: onnx.ModelProto) -> None:
    if model.graph.node:
        node = draw(st.sampled_from(list(model.graph.node)))
        node.op_type = draw(st.sampled_from(OP_TYPES))
        if draw(st.booleans()):
            node.domain = draw(st.sampled_from(["", "com.microsoft", "ai.onnx.ml", "no.such.domain"]))


def edit_attribute(draw, model: onnx.ModelProto) -> None:
    nodes = [n for n in model.graph.node if n.attribute]
    if not nodes:
        return
    node = draw(st.sampled_from(nodes))
    attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
    how = draw(st.sampled_from(["ints", "int", "float", "drop", "retype", "bogus"]))
    if how == "ints":
        del attr.ints[:]
        attr.ints.extend(draw(st.lists(st.sampled_from(AWKWARD_INTS), max_size=6)))
    elif how == "int":
        attr.i = draw(st.sampled_from(AWKWARD_INTS))
    elif how == "float":
        attr.f = draw(st.sampled_from([0.0, -1.0, 1e30, float("nan"), float("inf")]))
    elif how == "drop":
        node.attribute.remove(attr)
    elif how == "retype":
        attr.type = draw(st.integers(0, 14))
    else:
        node.attribute.append(helper.make_attribute(draw(st.sampled_from(["axis", "perm", "bogus"])),
                                                    draw(st.sampled_from(AWKWARD_INTS))))


def resize_initializer(draw, model: onnx.ModelProto) -> None:
    inits = list(model.graph.initializer)
    if not inits:
        return
    t = draw(st.sampled_from(inits))
    how = draw(st.sampled_from(["cut", "grow", "both-fields", "clear"]))
    if how == "cut" and t.raw_data:
        t.raw_data = t.raw_data[:draw(st.integers(0, len(t.raw_data)))]
    elif how == "grow":
        t.raw_data = t.raw_data + draw(st.binary(min_size=1, max_size=64))
    elif how == "both-fields":
        t.float_data.extend([1.0, 2.0])
    else:
        t.ClearField("raw_data")
        t.ClearField("float_data")


def rename(draw, model: onnx.ModelProto) -> None:
    """Duplicate names (an output renamed to another tensor's), missing ones (an input that nothing
    produces), or a cycle (an input renamed to a later node's output)."""
    nodes = list(model.graph.node)
    if not nodes:
        return
    i = draw(st.integers(0, len(nodes) - 1))
    node = nodes[i]
    names = [o for n in nodes for o in n.output] + [t.name for t in model.graph.initializer]
    how = draw(st.sampled_from(["duplicate", "missing", "cycle", "initializer"]))
    if how == "duplicate" and node.output and names:
        node.output[0] = draw(st.sampled_from(names))
    elif how == "missing" and node.input:
        node.input[draw(st.integers(0, len(node.input) - 1))] = "no_such_tensor"
    elif how == "cycle" and node.input:
        later = [o for n in nodes[i:] for o in n.output]
        node.input[0] = draw(st.sampled_from(later))
    elif how == "initializer" and len(model.graph.initializer) > 1:
        model.graph.initializer[1].name = model.graph.initializer[0].name


def huge_shape(draw, model: onnx.ModelProto) -> None:
    if model.graph.input:
        t = model.graph.input[0].type.tensor_type
        for d in t.shape.dim:
            d.dim_value = draw(st.sampled_from([10**6, 10**9, 2**62]))


def external_data(draw, model: onnx.ModelProto) -> None:
    inits = list(model.graph.initializer)
    if not inits:
        return
    t = draw(st.sampled_from(inits))
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    location = draw(st.sampled_from(["../../../etc/passwd", "/etc/passwd", "missing.bin", "", "a/../../b.bin"]))
    entries = {"location": location}
    if draw(st.booleans()):
        entries["offset"] = str(draw(st.sampled_from(AWKWARD_INTS)))
        entries["length"] = str(draw(st.sampled_from(AWKWARD_INTS)))
    for key, value in entries.items():
        t.external_data.add(key=key, value=value)


def edit_graph(draw, model: onnx.ModelProto) -> None:
    """Remove or reorder nodes, drop outputs, or change the opset."""
    g = model.graph
    how = draw(st.sampled_from(["remove", "swap", "no-outputs", "opset"]))
    if how == "remove" and g.node:
        del g.node[draw(st.integers(0, len(g.node) - 1))]
    elif how == "swap" and len(g.node) > 1:
        i, j = draw(st.integers(0, len(g.node) - 1)), draw(st.integers(0, len(g.node) - 1))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
    elif how == "no-outputs":
        del g.output[:]
    elif model.opset_import:
        model.opset_import[0].version = draw(st.sampled_from([0, 1, 6, 11, 13, 17, 21, 99, -1]))


BYTE_MUTATIONS = [truncate, flip_bytes, insert_bytes]
PROTO_MUTATIONS = [set_dim, set_dtype, set_op_type, edit_attribute, resize_initializer, rename, huge_shape,
                   external_data, edit_graph]


@st.composite
def mutated_files(draw) -> tuple[str, bytes]:
    """(what was done, the file's bytes): 1-3 protobuf-level edits of one source, then perhaps
    byte-level damage."""
    name, data = draw(st.sampled_from(sources()))
    model = onnx.load_from_string(data)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(PROTO_MUTATIONS))
        mutation(draw, model)
        done.append(mutation.__name__)
    data = model.SerializeToString()
    if draw(st.integers(0, 3)) == 0:
        mutation = draw(st.sampled_from(BYTE_MUTATIONS))
        data = mutation(draw, data)
        done.append(mutation.__name__)
    return f"{name}: {', '.join(done)}", data


def check_file(data: bytes) -> str:
    """Optimize one file and write it back out. Returns "ok" or the SlimgraphError's class name;
    raises Disallowed for any other outcome."""
    with tempfile.TemporaryDirectory() as folder:
        path, out = os.path.join(folder, "model.onnx"), os.path.join(folder, "out.onnx")
        with open(path, "wb") as f:
            f.write(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = slimgraph.optimize(path, "dce")
                model = result.to_onnx(out)
        except SlimgraphError as exc:
            if os.path.exists(out):
                raise Disallowed(f"{type(exc).__name__} but {out} was written") from exc
            if not str(exc).strip():
                raise Disallowed(f"{type(exc).__name__} without a message") from exc
            return type(exc).__name__
        except Hang:
            raise
        except Exception as exc:
            raise Disallowed(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(model, onnx.ModelProto) or not os.path.exists(out):
            raise Disallowed("optimize and to_onnx returned without a model written")
        return "ok"
