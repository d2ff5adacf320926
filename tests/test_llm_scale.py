"""Large decoders (issue 15, part 3): ONNX with external data, written tensor by tensor, and the
memory a decoder costs through import, ``dce`` with verification and ``to_onnx`` (the 1.1B run
is bench/llm_scale.py; here a 110M-parameter Llama-architecture model in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

import slimgraph
import slimgraph.backends.onnx as onnx_backend
from slimgraph import SlimgraphError
from slimgraph.backends.onnx import run_onnxruntime

transformers = pytest.importorskip("transformers")

SCRIPT = textwrap.dedent("""
    import json, resource, warnings
    warnings.filterwarnings("ignore")
    import onnxruntime as ort, torch, transformers
    import slimgraph

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # torch.export's own machinery (sympy, dynamo, fx) costs ~0.4 GB however large the model: warmed
    # up on a tiny decoder first, so what is measured is what grows with the weights
    ids = torch.randint(0, 64, (1, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tiny = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=64)
    slimgraph.optimize(transformers.LlamaForCausalLM(tiny).eval(), "dce", example_inputs=inputs)
    baseline = peak()
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
    result = slimgraph.optimize(model, "dce", example_inputs=inputs)
    result.to_onnx(PATH, external_data=True)
    used = peak() - baseline
    del result, model
    session = ort.InferenceSession(PATH, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})
    error = float((torch.from_numpy(got) - want).abs().max() / want.abs().max())
    print(json.dumps({"weights": weights, "used": used, "error": error}))
""")


def test_decoder_through_import_dce_and_external_data_costs_at_most_two_and_a_half_weights(tmp_path):
    """Resident memory the steps add (the user's model, slimgraph's private copy of it, the pass,
    its verification, the file) stays within 2.5x the weights: no step copies them twice."""
    path = tmp_path / "llama.onnx"
    done = subprocess.run([sys.executable, "-c", f"PATH = {str(path)!r}\n" + SCRIPT], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["weights"] > 400e6  # 110M float32 parameters
    assert report["used"] <= 2.5 * report["weights"], report
    assert report["error"] < 1e-4
    data = tmp_path / "llama.onnx.data"
    assert path.stat().st_size < 1e6 and data.stat().st_size >= report["weights"]
    proto = onnx.load(path, load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 4 * 9 and all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0
                                          for t in external)


def small():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    return slimgraph.optimize(model, "dce", example_inputs=(torch.randn(2, 64),))


def test_external_data_round_trips_and_is_chosen_for_large_graphs(tmp_path, monkeypatch):
    result = small()
    x = torch.randn(2, 64)
    inline = run_onnxruntime(result.to_onnx(), [x])[0]
    path = tmp_path / "m.onnx"
    result.to_onnx(path, external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size >= 64 * 64 * 4
    assert torch.equal(run_onnxruntime(str(path), [x])[0], inline)
    reimported = slimgraph.import_model(str(path))  # the ONNX frontend reads the data file too
    assert torch.allclose(slimgraph.to_torch(reimported)(x), inline, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporary left
    monkeypatch.setattr(onnx_backend, "AUTO_EXTERNAL_BYTES", 1000)  # as if the graph held GBs
    auto = tmp_path / "auto.onnx"
    result.to_onnx(auto)
    assert (tmp_path / "auto.onnx.data").exists()
    with pytest.raises(SlimgraphError, match="to a path"):
        result.to_onnx()


def test_external_data_never_overwrites_and_leaves_nothing_on_failure(tmp_path):
    result = small()
    path = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.data").write_bytes(b"someone's data")
    with pytest.raises(SlimgraphError, match="already exist"):
        result.to_onnx(path, external_data=True)
    assert (tmp_path / "m.onnx.data").read_bytes() == b"someone's data" and not path.exists()
    result.to_onnx(path, external_data=True, overwrite=True)
    x = torch.ones(2, 64)
    assert torch.allclose(run_onnxruntime(str(path), [x])[0], result.to_torch()(x), atol=1e-6)
    with pytest.raises(SlimgraphError, match="external data"):
        result.to_onnx(tmp_path / "q.onnx", external_data=True, opset=11)  # the version converter reads all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
