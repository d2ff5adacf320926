"""fp16 / bf16 mixed precision: numerics in onnxruntime and PyTorch, cast placement, options."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto

import slimgraph
from slimgraph.backends.onnx import run_onnxruntime
from slimgraph.errors import PassError
from slimgraph.ir import OPAQUE
from slimgraph.ir.dtypes import DType
from slimgraph.ir.interpreter import run as interpret
from slimgraph.passes import PassContext, get_pass, parse_pipeline
from tests.zoo.test_roundtrip import build


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check_casts(graph) -> list:
    """Every cast reads a value that is not itself a cast's output (no chains) and no two casts
    convert the same value to the same dtype (each cast placed once); returns the casts."""
    casts = [n for n in graph.nodes if n.op == "cast"]
    keys = [(id(n.inputs[0]), n.attrs["dtype"]) for n in casts]
    assert len(keys) == len(set(keys)), "a value is cast to the same dtype twice"
    for n in casts:
        producer = n.inputs[0].producer
        assert producer is None or producer.op != "cast", f"{n.name}: cast of a cast"
    return casts


def onnx_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor in the model (after ONNX shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)  # feeds three fp32 consumers: one cast must serve them all
        return self.fc2(F.softmax(h, -1) + F.log_softmax(h, -1) + self.ln(h))


def small_graph():
    torch.manual_seed(0)
    model, x = Small().eval(), torch.randn(2, 8)
    return model, x, slimgraph.import_model(model, (x,))


# ---------------------------------------------------------------------------- the must-show
def fp16_in_onnxruntime(name: str, passes: str):
    """The model after ``passes``, its ONNX file, and that file's error in onnxruntime (at most 1e-2)."""
    model, x = build(name)
    with torch.no_grad():
        ref = model(x)
    result = slimgraph.optimize(model, passes, example_inputs=x)
    result.graph.verify()
    proto = result.to_onnx()
    err = rel_error(run_onnxruntime(proto, [x])[0], ref)
    assert err <= 1e-2, err
    return result, proto


def test_resnet18_fp16_onnxruntime():
    result, proto = fp16_in_onnxruntime("resnet18", "fold-bn,fp16")
    init = {t.name: t.data_type for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(convs) == 21
    assert all(init[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    # input stays float32 with one cast in, the output is cast back once: nothing else for a CNN
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert sum(n.op_type == "Cast" for n in proto.graph.node) == 2
    assert len(check_casts(result.graph)) == 2


@pytest.mark.heavy
def test_vit_b_16_fp16_onnxruntime():
    result, proto = fp16_in_onnxruntime("vit_b_16", "fp16")
    types = onnx_types(proto)
    fp16_inits = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert sum(onnx.numpy_helper.to_array(t).size for t in fp16_inits) > 50_000_000  # the MLP weights
    sensitive = [n for n in proto.graph.node if n.op_type in ("Softmax", "LayerNormalization")]
    assert sum(n.op_type == "Softmax" for n in sensitive) == 12
    assert sum(n.op_type == "LayerNormalization" for n in sensitive) == 25
    for n in sensitive:
        assert types[n.input[0]] == TensorProto.FLOAT, f"{n.op_type} {n.name} runs in {types[n.input[0]]}"
        assert types[n.output[0]] == TensorProto.FLOAT
    # per block: x -> fp32 for ln_1, ln_1 out -> fp16 for the q/k/v projections, their three outputs
    # -> fp32 for the attention core, its output -> fp16 for out_proj, x -> fp32 for ln_2, ln_2 out
    # -> fp16; plus the final layer norm's two, the input's and the output's
    casts = check_casts(result.graph)
    assert len(casts) == 12 * 8 + 2 + 2
    assert sum(n.op_type == "Cast" for n in proto.graph.node) == len(casts)


def test_resnet18_bf16_pytorch_backend():
    model, x = build("resnet18")
    with torch.no_grad():
        ref = model(x)
    result = slimgraph.optimize(model, "fold-bn,bf16", example_inputs=x)
    result.graph.verify()
    assert {c.dtype for c in result.graph.constants.values() if c.rank == 4} == {DType.bfloat16}
    with torch.no_grad():
        interp = interpret(result.graph, [x])[0]
        emitted = result.to_torch()(x)
    assert emitted.dtype == torch.float32
    assert rel_error(interp, ref) <= 2e-2
    assert rel_error(emitted, ref) <= 2e-2
    assert rel_error(emitted, interp) <= 1e-3


def test_to_torch_keeps_low_precision_weights():
    model, x, graph = small_graph()
    get_pass("bf16")().run(graph, PassContext())
    with torch.no_grad():
        out = slimgraph.to_torch(graph)(x)
    assert rel_error(out, model(x)) <= 2e-2


def test_bf16_small_model_interpreter():
    model, x, graph = small_graph()
    get_pass("bf16")().run(graph, PassContext())
    graph.verify()
    with torch.no_grad():
        assert rel_error(interpret(graph, [x])[0], model(x)) <= 2e-2


# ---------------------------------------------------------------------------- cast placement
def test_casts_placed_once_small_model():
    model, x, graph = small_graph()
    result = get_pass("fp16")().run(graph, PassContext())
    graph.verify()
    assert result.changed
    casts = check_casts(graph)
    # x -> f16; fc1 out -> f32 once for softmax, log_softmax and layer norm; their three
    # outputs -> f16 for the adds; the output -> f32
    assert len(casts) == 6, [n.name for n in casts]
    h_casts = [n for n in casts if n.inputs[0].producer is not None and n.inputs[0].producer.op == "linear"
               and n.attrs["dtype"] == "float32" and n.outputs[0] is not graph.outputs[0]]
    assert len(h_casts) == 1 and len(h_casts[0].output.uses) == 3
    for n in graph.nodes:
        if n.op in ("softmax", "log_softmax", "layer_norm"):
            assert all(v.dtype == DType.float32 for v in n.inputs if v is not None)
        if n.op == "linear":
            assert all(v.dtype == DType.float16 for v in n.inputs if v is not None)
    assert graph.inputs[0].dtype == DType.float32 and graph.outputs[0].dtype == DType.float32
    with torch.no_grad():
        assert rel_error(interpret(graph, [x])[0], model(x)) <= 1e-2


def test_keep_options():
    _, _, graph = small_graph()
    get_pass("fp16")(keep_first_last=True).run(graph, PassContext())
    graph.verify()
    linears = [n for n in graph.nodes if n.op == "linear"]
    assert all(v.dtype == DType.float32 for n in linears for v in n.inputs if v is not None)
    assert not any(c.dtype == DType.float16 for c in graph.constants.values())

    _, _, graph = small_graph()
    fc2 = [n for n in graph.nodes if n.op == "linear"][-1].name
    (p,) = parse_pipeline(f"fp16{{keep=[{fc2}]}}")
    p.run(graph, PassContext())
    graph.verify()
    first, last = [n for n in graph.nodes if n.op == "linear"]
    assert first.inputs[1].dtype == DType.float16 and last.inputs[1].dtype == DType.float32

    _, _, graph = small_graph()
    get_pass("fp16")(keep=["linear", "add"]).run(graph, PassContext())
    assert not any(n.op == "cast" for n in graph.nodes)  # nothing is left to lower


def test_bad_options():
    with pytest.raises(PassError, match="keep_first_last"):
        parse_pipeline("fp16{keep_first_last=maybe}")
    with pytest.raises(PassError, match="'keep'"):
        get_pass("bf16")(keep=[3])
    _, _, graph = small_graph()
    with pytest.raises(PassError, match="no_such_layer"):
        get_pass("fp16")(keep=["no_such_layer"]).run(graph, PassContext())
    assert not any(n.op == "cast" for n in graph.nodes)  # rejected before anything changed


def test_already_low_precision_is_unchanged():
    _, _, graph = small_graph()
    assert get_pass("fp16")().run(graph, PassContext()).changed
    before = str(graph)
    again = get_pass("fp16")().run(graph, PassContext())
    assert not again.changed and str(graph) == before

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).half().eval()
    graph = slimgraph.import_model(model, (torch.randn(2, 8).half(),))
    before = str(graph)
    assert not get_pass("fp16")().run(graph, PassContext()).changed
    assert str(graph) == before


def test_integers_and_opaque_untouched():
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x, idx):
            return self.fc(x) + torch.special.i0(x), idx * 2

    model, x, idx = M().eval(), torch.randn(2, 8), torch.arange(4)
    graph = slimgraph.import_model(model, (x, idx))
    get_pass("fp16")().run(graph, PassContext())
    graph.verify()
    assert graph.inputs[1].dtype == DType.int64 and graph.outputs[1].dtype == DType.int64
    for n in graph.nodes:
        if n.op == OPAQUE:
            assert all(v.dtype == DType.float32 for v in n.inputs + n.outputs)
    with torch.no_grad():
        y, j = interpret(graph, [x, idx])
        ref_y, ref_j = model(x, idx)
    assert torch.equal(j, ref_j)
    assert rel_error(y, ref_y) <= 1e-2


def test_angle_of_cos_near_its_zero_stays_float32():
    """cos of angles near pi / 2 is all near 0: the angle's 16-bit rounding (5e-4 at 1.57) is 10% of
    the output, so the angle and all it is computed from stay float32 (as sin's past 8 do)."""
    class M(torch.nn.Module):
        def __init__(self, shift: float) -> None:
            super().__init__()
            self.fc, self.shift = torch.nn.Linear(4, 4), shift

        def forward(self, x):
            return torch.cos(self.fc(x) * 1e-3 + self.shift)

    def cos_dtype(model, x):
        result = slimgraph.optimize(slimgraph.import_model(model, (x,)), "fp16", example_inputs=(x,))
        with torch.no_grad():
            (y,) = interpret(result.graph, [x])
            error = float((y - model(x)).abs().max() / model(x).abs().max())
        return next(n for n in result.graph.nodes if n.op == "cos").output.dtype, error

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    assert cos_dtype(M(1.5668).eval(), x) == (DType.float32, pytest.approx(0, abs=1e-3))
    # cos near 1 is computed in float16
    assert cos_dtype(M(0.0).eval(), x)[0] == DType.float16


@pytest.mark.parametrize("op", [torch.tan, torch.sin])
def test_angle_of_tan_and_of_sin_past_8_stays_float32(op):
    """float16 holds an angle near 100 to 0.06, which leaves tan or sin of it noise: tan's angle
    (anywhere) and sin / cos's past 8 times their output's peak stay float32, with all they are
    computed from (ir 40170, 40123; the fuzzer draws such angles only where float32's rounding
    does not move them, so a unit test holds this)."""
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return op(self.fc(x) + 100)

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(3, 4)
    result = slimgraph.optimize(slimgraph.import_model(model, (x,)), "fp16", example_inputs=(x,))
    angle = next(n for n in result.graph.nodes if n.op == op.__name__).inputs[0]
    assert angle.dtype == DType.float32 and angle.producer.inputs[0].dtype == DType.float32
    with torch.no_grad():
        (y,) = interpret(result.graph, [x])
        assert float((y - model(x)).abs().max() / model(x).abs().max()) < 1e-3


def test_an_angle_computed_through_a_node_kept_for_range_stays_float32_before_it():
    """The walk up an angle's producers stopped at a node kept float32 for range already (a product
    that passes through 1e-6, below float16's normal range): the linear before it ran in float16,
    and sin of an angle near 100 was noise."""
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.sin(self.fc(x) * 1e-6 * 1e6 + 100)

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(3, 4)
    result = slimgraph.optimize(slimgraph.import_model(model, (x,)), "fp16", example_inputs=(x,))
    linear = next(n for n in result.graph.nodes if n.op == "linear")
    assert linear.outputs[0].dtype == DType.float32
    with torch.no_grad():
        (y,) = interpret(result.graph, [x])
        assert float((y - model(x)).abs().max() / model(x).abs().max()) < 1e-3


def test_grid_sample_stays_float32():
    """grid_sample's kernel unnormalizes its grid to pixels in its input dtype: in float16, 1 + x for
    x = -2e-4 is 1, so a nearest sample at (1 - 2e-4) / 2 * 3 = 1.4997 lands on the tie at 1.5 and
    reads pixel 2, not 1. It runs in float32, on its inputs as float16 computes them."""
    class M(torch.nn.Module):
        def forward(self, img, grid):
            return F.grid_sample(img * 2, grid * 2, mode="nearest", align_corners=True)

    img, grid = torch.arange(4.0).view(1, 1, 1, 4), torch.tensor([[[[-1e-4, 0.0]]]])
    model = M().eval()
    result = slimgraph.optimize(slimgraph.import_model(model, (img, grid)), "fp16", example_inputs=(img, grid))
    assert next(n for n in result.graph.nodes if n.op == "grid_sample").output.dtype == DType.float32
    # its inputs are computed in float16
    assert {n.output.dtype for n in result.graph.nodes if n.op == "mul"} == {DType.float16}
    (y,) = interpret(result.graph, [img, grid])
    assert torch.equal(y, model(img, grid)) and float(y) == 2.0
