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
