"""ONNX's element-wise math, reductions, sorting, gathers and scatters and resampling import as
canonical IR ops that compute what onnxruntime computes on the file; attribute combinations with no
exact IR form stay opaque (and still run)."""

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.ir import run

F, D, I64, I32 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32
RNG = np.random.default_rng(0)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _model(op, inputs, attrs=None, inits=(), opset=17, out_type=F):
    """One ``op`` node on ``inputs`` [(name, type, shape, data)] and then ``inits``; ``out_type``: the
    output's element type, or a list of them (one an output)."""
    types = out_type if isinstance(out_type, list) else [out_type]
    node = helper.make_node(op, [name for name, *_ in inputs] + [t.name for t in inits],
                            [f"y{i}" for i in range(len(types))], **(attrs or {}))
    graph = helper.make_graph([node], "m", [helper.make_tensor_value_info(n, t, s) for n, t, s, _ in inputs],
                              [helper.make_tensor_value_info(f"y{i}", t, None) for i, t in enumerate(types)],
                              list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _data(shape, kind=np.float32, low=None, high=None):
    if np.issubdtype(kind, np.integer):
        return RNG.integers(low if low is not None else -5, high if high is not None else 6, shape).astype(kind)
    if low is not None:
        return RNG.uniform(low, high, shape).astype(kind)
    return RNG.standard_normal(shape).astype(kind)


def _check(model, feeds, ops, atol=1e-6):
    """No opaque node, the IR ops ``ops`` among the nodes, the interpreter equal to onnxruntime."""
    tensors = [torch.from_numpy(f) for f in feeds]
    graph = slimgraph.import_model(model, tensors)
    found = [n.op for n in graph.nodes]
    assert "opaque" not in found and set(ops) <= set(found), found
    want = run_onnxruntime(model, tensors)
    for got, expected in zip(run(graph, tensors), want):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5)
    return graph


UNARY = {"Sin": None, "Cos": None, "Tan": (-1.2, 1.2), "Asin": (-0.9, 0.9), "Acos": (-0.9, 0.9), "Atan": None,
         "Sinh": None, "Cosh": None, "Asinh": None, "Acosh": (1.1, 3.0), "Atanh": (-0.9, 0.9), "Floor": None,
         "Ceil": None, "Round": None, "Sign": None, "Reciprocal": (0.5, 2.0), "Softsign": None}


@pytest.mark.parametrize("op", list(UNARY))
def test_unary_math(op):
    low, high = UNARY[op] or (None, None)
    x = _data((2, 3, 4), low=low, high=high)
    if op == "Round":
        x = np.concatenate([x, np.array([[[0.5, 1.5, 2.5, -0.5]] * 3], np.float32)])  # halves to even
    model = _model(op, [("x", F, list(x.shape), x)], out_type=F)
    _check(model, [x], [op.lower()])


@pytest.mark.parametrize("fmod,kind", [(1, np.float32), (1, np.int64), (0, np.int64), (0, np.int32)])
def test_mod(fmod, kind):
    ty = {np.float32: F, np.int64: I64, np.int32: I32}[kind]
    a = _data((3, 4), kind, -20, 20) if kind != np.float32 else _data((3, 4)) * 5
    b = _data((3, 4), kind, 1, 6) * np.where(RNG.random((3, 4)) < 0.5, -1, 1).astype(kind)
    model = _model("Mod", [("a", ty, [3, 4], a), ("b", ty, [3, 4], b)], {"fmod": fmod}, out_type=ty)
    _check(model, [a, b], ["fmod" if fmod else "remainder"])


def test_integer_div_truncates():
    a, b = _data((3, 4), np.int64, -20, 20), _data((3, 4), np.int64, 1, 6) * -1
    graph = _check(_model("Div", [("a", I64, [3, 4], a), ("b", I64, [3, 4], b)], out_type=I64), [a, b], ["div"])
    assert graph.nodes[0].attrs == {"rounding_mode": "trunc"}


@pytest.mark.parametrize("op,opset,axes,keep", [
    ("ReduceMax", 17, [1], 1), ("ReduceMin", 17, [-1, 0], 0), ("ReduceProd", 17, None, 1),
    ("ReduceMax", 18, [2], 0), ("ReduceMin", 18, None, 1), ("ReduceProd", 18, [0, 2], 1),
    ("ReduceSum", 13, [1], 1)])
def test_reductions_take_axes_as_attribute_or_input(op, opset, axes, keep):
    x = _data((2, 3, 4), low=0.5, high=1.5)
    inits, attrs = [], {"keepdims": keep}
    if axes is not None and (opset >= 18 or op == "ReduceSum"):
        inits = [_const("axes", np.array(axes, np.int64))]
    elif axes is not None:
        attrs["axes"] = axes
    model = _model(op, [("x", F, [2, 3, 4], x)], attrs, inits, opset=opset, out_type=F)
    _check(model, [x], [{"ReduceMax": "amax", "ReduceMin": "amin", "ReduceProd": "prod", "ReduceSum": "sum"}[op]])


def test_integer_sums_keep_their_type():
    x = _data((2, 3), np.int32)
    model = _model("ReduceSum", [("x", I32, [2, 3], x)], {"keepdims": 0}, [_const("axes", np.array([1]))],
                   out_type=I32)
    _check(model, [x], ["sum", "cast"])


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_argmax(op):
    x = RNG.permutation(24).reshape(2, 3, 4).astype(np.float32)
    _check(_model(op, [("x", F, [2, 3, 4], x)], {"axis": -1, "keepdims": 0}, out_type=I64), [x], [op.lower()])


@pytest.mark.parametrize("k,largest", [(2, 1), (3, 0), (5, 1), (5, 0)])
def test_topk_and_a_full_sort(k, largest):
    x = RNG.permutation(30).reshape(2, 3, 5).astype(np.float32)
    model = _model("TopK", [("x", F, [2, 3, 5], x)], {"axis": -1, "largest": largest},
                   [_const("k", np.array([k], np.int64))], out_type=[F, I64])
    _check(model, [x], ["sort" if k == 5 else "topk"])


def test_cumsum():
    x = _data((2, 5))
    _check(_model("CumSum", [("x", F, [2, 5], x)], inits=[_const("axis", np.array(1))], out_type=F), [x],
           ["cumsum"])


@pytest.mark.parametrize("constant", [True, False])
def test_gather_elements_wraps_negative_indices(constant):
    x = _data((3, 4))
    index = RNG.integers(-4, 4, (3, 2)).astype(np.int64)
    if constant:
        model, feeds = _model("GatherElements", [("x", F, [3, 4], x)], {"axis": 1}, [_const("i", index)],
                              out_type=F), [x]
    else:
        model, feeds = _model("GatherElements", [("x", F, [3, 4], x), ("i", I64, [3, 2], index)], {"axis": 1},
                              out_type=F), [x, index]
    _check(model, feeds, ["gather_elements"])


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_elements(reduction):
    x, updates = _data((3, 4)), _data((3, 2))
    index = np.array([[0, -1], [2, 1], [-4, 3]], np.int64)  # distinct per row: "none" is deterministic
    opset = 18 if reduction in ("max", "min") else 16
    model = _model("ScatterElements", [("x", F, [3, 4], x), ("u", F, [3, 2], updates)],
                   {"axis": 1, "reduction": reduction}, [_const("i", index)], opset=opset, out_type=F)
    # ONNX takes data, indices, updates: put the constant in the middle
    model.graph.node[0].input[:] = ["x", "i", "u"]
    _check(model, [x, updates], ["scatter"])


@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_nd(reduction):
    x, updates = _data((4, 3, 2)), _data((2, 3, 2))
    model = _model("ScatterND", [("x", F, [4, 3, 2], x), ("u", F, [2, 3, 2], updates)], {"reduction": reduction},
                   [_const("i", np.array([[1], [-1]], np.int64))], opset=16, out_type=F)
    model.graph.node[0].input[:] = ["x", "i", "u"]
    _check(model, [x, updates], ["index_put"])


@pytest.mark.parametrize("starts,ends,steps", [([-1], [-(2**62)], [-1]), ([4], [0], [-2]), ([-2, 0], [-5, 3], [-1, 2])])
def test_negative_step_slices_are_flips(starts, ends, steps):
    x = _data((2, 6, 5))
    inits = [_const(n, np.array(v, np.int64)) for n, v in
             [("s", starts), ("e", ends), ("a", [1, 2][:len(starts)]), ("st", steps)]]
    _check(_model("Slice", [("x", F, [2, 6, 5], x)], inits=inits, out_type=F), [x], ["flip"])


def test_instance_norm_is_group_norm_with_a_group_per_channel():
    x = _data((2, 3, 4, 5))
    inits = [_const("scale", _data((3,))), _const("bias", _data((3,)))]
    graph = _check(_model("InstanceNormalization", [("x", F, [2, 3, 4, 5], x)], {"epsilon": 1e-3}, inits,
                          out_type=F), [x], ["group_norm"], atol=1e-5)
    assert graph.nodes[0].attrs == {"num_groups": 3, "eps": pytest.approx(1e-3)}


RESIZE = [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, "sizes"),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, "scales"),
    ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, "sizes"),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, "sizes"),
    ({"mode": "cubic", "coordinate_transformation_mode": "pytorch_half_pixel", "cubic_coeff_a": -0.75}, "scales"),
]


@pytest.mark.parametrize("attrs,given", RESIZE)
def test_resize(attrs, given):
    x = _data((1, 2, 3, 4))
    scales = np.array([1, 1, 2, 1.5], np.float32)
    target = _const("sizes", np.array([1, 2, 5, 7], np.int64)) if given == "sizes" else _const("scales", scales)
    model = _model("Resize", [("x", F, [1, 2, 3, 4], x)], attrs, [target], out_type=F)
    model.graph.node[0].input[:] = ["x", "", *(["", "sizes"] if given == "sizes" else ["scales"])]
    _check(model, [x], ["resize"], atol=1e-5)


@pytest.mark.parametrize("mode,opset", [("bilinear", 16), ("nearest", 16), ("bicubic", 16), ("linear", 20)])
def test_grid_sample(mode, opset):
    x, grid = _data((1, 2, 4, 5)), np.tanh(_data((1, 3, 3, 2))) * 1.1
    model = _model("GridSample", [("x", F, [1, 2, 4, 5], x), ("grid", F, [1, 3, 3, 2], grid)],
                   {"mode": mode, "padding_mode": "border", "align_corners": 1}, opset=opset, out_type=F)
    _check(model, [x, grid], ["grid_sample"], atol=1e-5)


# attribute combinations with no exact IR form: the node stays opaque and runs as the file says (an
# even LRN window, which onnxruntime refuses, in onnx's reference evaluator)
OPAQUE = {
    "an even LRN window (ONNX's centre is torch's shifted by one)": ("LRN", {"size": 2}, []),
    "CumSum in reverse": ("CumSum", {"reverse": 1}, [_const("axis", np.array(1))]),
    "ArgMax of the last maximum": ("ArgMax", {"axis": 1, "select_last_index": 1}, []),
    "Resize with round_prefer_floor nearest": ("Resize", {"mode": "nearest"}, [
        _const("roi", np.zeros(0, np.float32)), _const("scales", np.array([1, 1, 2, 2], np.float32))]),
}


@pytest.mark.parametrize("why", list(OPAQUE))
def test_forms_without_an_ir_op_stay_opaque(why):
    op, attrs, inits = OPAQUE[why]
    x = np.round(_data((1, 4, 3, 3)))
    model = _model(op, [("x", F, [1, 4, 3, 3], x)], attrs, inits, out_type=I64 if op == "ArgMax" else F)
    tensors = [torch.from_numpy(x)]
    graph = slimgraph.import_model(model, tensors)
    assert [n.op for n in graph.nodes] == ["opaque"]
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    torch.testing.assert_close(run(graph, tensors)[0], torch.from_numpy(want.copy()))
