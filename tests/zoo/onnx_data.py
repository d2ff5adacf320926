"""Locations of the ONNX models and node tests that ship inside the onnx package."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
LIGHT = sorted(p.stem.removeprefix("light_") for p in (DATA / "light").glob("light_*.onnx"))
NODE_TESTS = sorted(
    f"{sub}/{p.name}" for sub in ("pytorch-converted", "pytorch-operator") for p in (DATA / sub).iterdir()
)


def load_pb(path: str | Path) -> torch.Tensor:
    return torch.from_numpy(numpy_helper.to_array(onnx.load_tensor(str(path))).copy())


def node_test_data(name: str) -> tuple[Path, list[torch.Tensor], list[np.ndarray]]:
    folder = DATA / name
    inputs = [load_pb(f) for f in sorted(glob.glob(str(folder / "test_data_set_0" / "input_*.pb")))]
    outputs = [load_pb(f).numpy() for f in sorted(glob.glob(str(folder / "test_data_set_0" / "output_*.pb")))]
    return folder / "model.onnx", inputs, outputs
