"""Every property of properties.py on a fixed budget of random nets: CNNs and transformers
(nets.py) and IR graphs drawn from the op registry (ir_graphs.py), each reproduced by one number,
e.g. ``python -m tests.fuzz --kind cnn --seed 17``.
Longer campaigns: ``python -m tests.fuzz --graphs 10000``. Seeds that once failed are kept in
REGRESSIONS with the bug they found."""

from __future__ import annotations

import os

import pytest

from tests.fuzz.properties import PROPERTIES, make_case

# the suite's budget (SLIMGRAPH_FUZZ_SEEDS raises it): CNNs are cheap, transformers cost an export each
CNN_SEEDS = range(int(os.environ.get("SLIMGRAPH_FUZZ_SEEDS", "60")))
TRANSFORMER_SEEDS = range(int(os.environ.get("SLIMGRAPH_FUZZ_SEEDS", "24")))
IR_SEEDS = range(int(os.environ.get("SLIMGRAPH_FUZZ_SEEDS", "60")))

# (kind, seed): the bug it found, fixed since
REGRESSIONS = {
    ("transformer", 20): "fx traced an argument left at its None default as an input (mask=None); the ONNX "
                         "importer could not read a Gather of one static dim from Shape (a bare int)",
    ("transformer", 8): "fuse wrote float64 attention as onnxruntime's MultiHeadAttention (float32/16 only); "
                        "float64 GELU was written as Erf, which onnxruntime has no double kernel for; optimize() "
                        "refused example inputs of another length on a symbolic sequence dim",
    ("transformer", 6): "quantize{activations=dynamic} removed dead code it found and said it changed nothing",
    ("transformer", 1): "linear-form renamed weights and layers on every ONNX round trip (_t_t, matmul_1)",
    ("transformer", 12): "the ONNX importer froze a copied (0) dim of a symbolic sequence at its import size",
    ("transformer", 10151): "the ONNX backend named a linear's transposed weight after the node, not the weight: "
                            "torch.export-imported layers came back with other weight names",
    ("transformer", 23): "printed constants followed creation order, which differs between importers",
    ("cnn", 20471): "fp16 overflowed to inf where float32 values pass 65504 (x * x chains): such ops stay float32",
    ("cnn", 6): "a re-imported ONNX Split named its outputs after the node, not the file's tensors",
    ("cnn", 12): "the ONNX importer reordered the nodes of an already sorted file",
    ("ir", 91): "resize's output lost the symbolic batch (torch's upsampling kernels guard it on fake tensors): "
                "an index_put after it wrote batch-2 indices into the ONNX file",
    ("ir", 94): "the ONNX importer read Expand's 1s as sizes: a batch imported at 1 was frozen in the expand",
    ("ir", 20013): "the ONNX importer read Expand's 1s as sizes (as ir 94)",
    ("ir", 73): "oracle: nearest grid_sample on inexact coordinates jumps a pixel under 16-bit rounding",
    ("ir", 124): "oracle: atan2 of a softmax output float16 flushes to zero (pi/4 becomes 0)",
    ("ir", 20083): "oracle: atan2 at (0, 0) of inexact values (as ir 124)",
    ("ir", 20064): "fp16 lowered prod, whose product of 24 factors (1e-13) underflows float16",
    ("ir", 20007): "remove-identity removed div(x, 1) with rounding_mode trunc / floor on floats",
    ("ir", 20072): "remove-identity removed a rounding div by 1 (as ir 20007)",
    ("ir", 20089): "remove-identity removed a rounding div by 1 (as ir 20007)",
    ("ir", 20093): "remove-identity removed a rounding div by 1 (as ir 20007)",
    ("ir", 20042): "canonicalize left a constant computation that is a graph output, which both importers fold",
    ("ir", 20085): "oracle: rel_error on an empty output (a diagonal past the edge) raised",
    ("ir", 58): "a ceil-mode pool written as pool + Slice, whose intermediate onnxruntime sizes two ways (its "
                "int8 file warned); pools with floor mode's windows are now written in floor mode",
    ("ir", 40056): "atan2 written to ONNX read -0.0 as positive: torch.atan2(-0.0, -1) is -pi, the file gave +pi",
    ("ir", 40074): "atan2(-0.0, -0.0) written to ONNX (as ir 40056)",
    ("ir", 40155): "PRelu of a float64 x and a float32 slope was written with mixed types",
    ("ir", 40170): "fp16 computed tan's angle in float16 (tan(100) off by its 0.06 rounding)",
    ("ir", 40123): "fp16 computed a sin of angles past 100 in float16",
    ("ir", 40254): "fp16 computed tan's angle in float16 (as ir 40170)",
    ("ir", 40117): "oracle: layer_norm of nearly constant rows amplifies any rounding (2e-4 in float32, 0.27 in fp16)",
    ("ir", 40243): "oracle: group_norm of nearly constant groups (as ir 40117)",
    ("ir", 100261): "remainder written to ONNX as a - floor(a / b) * b gave +0.0 where torch gives -0.0 (an atan2 "
                    "of it pi off); float16 logsigmoid's Softplus infinite at opset 18",
    ("ir", 100331): "float16 softplus and mish at opset 18: onnxruntime ran Softplus's function body "
                    "log(exp(x) + 1), infinite past 88.7 (as ir 100261)",
    ("ir", 100416): "fp16 computed cos's angle in float16 where cos is all near 0 (angles near pi/2: 0.15 off)",
    ("ir", 100254): "oracle: atan2 of a mean of tanhs near +-1, which are 1 in float16 (the mean 0, atan2 0 for pi/4)",
    ("ir", 100342): "oracle: reciprocal of a linear's O(1) terms that cancel to 4e-3 (as ir 100254)",
    ("ir", 40181): "oracle: softsign of conv_transpose terms near 560 that cancel (as ir 100254)",
    ("ir", 100389): "var written to ONNX in float32: five equal values gave 4.4e-15, not 0 (torch accumulates "
                    "in double)",
    ("ir", 100404): "onnxruntime merged fake_quant(fake_quant(x)) of other parameters into one Q/DQ pair on the "
                    "second grid",
    ("ir", 100140): "torch.fx import dropped torch.div's rounding_mode; canonicalize then removed the div by 1",
    ("ir", 300223): "the PyTorch backend wrote F.prelu of a float64 x and a float32 slope (the IR promotes); "
                    "F.prelu refuses mixed types",
    ("ir", 300252): "as ir 300223: F.prelu of a float64 x and a float32 (fp16: float16) slope",
    ("ir", 200076): "torch.export spelled one symbolic reshape two ways (view kept -1, reshape's decomposition "
                    "wrote the traced size): IR -> PyTorch source -> IR was not a fixed point",
    ("ir", 300056): "fp16 ran grid_sample in float16, whose kernel unnormalizes the grid in 16 bits: a nearest "
                    "sample 2e-6 px below a pixel's edge landed on the tie and read the next pixel (0.58 off)",
    ("ir", 1000248): "oracle: var of atan2(t, t) rows, pi / 4 one bit apart (torch's float32 atan2: SIMD body vs "
                     "scalar tail), 8.6e-16 in torch and 0 in onnxruntime",
    ("ir", 4000109): "a conv_transpose whose padding cropped its output to width 0 passed shape inference (torch's "
                     "meta kernel allows it); its float16 kernel and onnxruntime refuse it",
    ("ir", 3000286): "roll along an empty dim (a diagonal past the edge, [2, 1, 0]): the ONNX emitter's cut was "
                     "size - shift % size, a modulo by zero",
    ("ir", 3000326): "oracle: tan of a conv's output near a pole amplified onnxruntime's one-bit-off sum 5e3 times "
                     "(1.8e-4 off)",
    ("ir", 4000332): "oracle: tan of a matmul's output near a pole (amplification 2e4: 1.9e-3 off, as ir 3000326)",
    ("ir", 3001204): "oracle: group_norm of a group of copies of one value: torch's kernel cancels x*gamma*rstd "
                     "against mean*gamma*rstd (4506), an ulp off the bias (2.7e-4 from its ONNX file's form)",
    ("ir", 3002454): "oracle: gelu of g near -4 is x * (1 + erf), a cancellation one ulp of 1 off; the row minima "
                     "of such values kept it at 6e-5 of their peak, 1.03e-4 from onnxruntime's gelu",
    ("ir", 3002606): "oracle: tan of a prod of lrn values near a pole: onnxruntime's lrn and prod, some ulps off "
                     "torch's, 1.37e-4 off after tan",
    ("ir", 5000495): "oracle: the float16 model took cos's angle as float32, which fp16 keeps only past 8 times "
                     "cos's peak; 1 / cos(4.7093) from a float16 angle is 2x off",
    ("ir", 6001318): "a ceil-mode avg_pool that drops a window starting in the padding was written as AveragePool "
                     "+ Slice; ONNX inferred the window onnxruntime's kernel drops, and its memory planner failed "
                     "to reuse a buffer (fp16)",
    ("ir", 7001198): "oracle: a prod of silu values of -12: onnxruntime's Sigmoid is 5e-8 off there (a percent), "
                     "4.9e-2 off after the product, in slimgraph's file and torch.onnx.export's",
    ("ir", 7001639): "oracle: the max of logsigmoid values, -1.5e-10 where float16 holds 0: the float16 model "
                     "compared it to 1e-2 of a 1e-6 floor, not of its peak (fp16 1.0 off)",
    ("ir", 7001663): "oracle: as ir 5000495, a cos whose angle fp16 computes in float16 (0.21 off)",
    ("ir", 8000212): "oracle: a nearest grid_sample of a coordinate near a pixel's edge, computed through a "
                     "cancellation: onnxruntime's float16 grid read the next pixel (9e-2 off in fp16)",
    ("ir", 8000318): "the generator drew an index_put along an empty axis (a diagonal past the edge): "
                     "randint(1, 0) raised",
    ("ir", 9000480): "a ceil-mode avg_pool written with less right padding came back with asymmetric pads, whose "
                     "reference padded with F.pad: its meta kernel guarded the batch to 2, and a roll after it "
                     "folded to a constant (IR -> ONNX -> IR no fixed point)",
    ("ir", 11000386): "expm1 was written to ONNX as exp(x) - 1, 8% off at x = -1.7e-7 (exact, onnx-file); the "
                      "float16 model rounded a value fp16 keeps float32 where it is 0 at the example inputs",
}
CASES = sorted({("cnn", s) for s in CNN_SEEDS} | {("transformer", s) for s in TRANSFORMER_SEEDS}
               | {("ir", s) for s in IR_SEEDS} | set(REGRESSIONS))


@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("kind,seed", CASES)
def test_property(kind, seed, prop):
    PROPERTIES[prop](make_case(kind, seed))
