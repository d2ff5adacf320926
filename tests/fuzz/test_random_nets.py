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
}
CASES = sorted({("cnn", s) for s in CNN_SEEDS} | {("transformer", s) for s in TRANSFORMER_SEEDS}
               | {("ir", s) for s in IR_SEEDS} | set(REGRESSIONS))


@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("kind,seed", CASES)
def test_property(kind, seed, prop):
    PROPERTIES[prop](make_case(kind, seed))
