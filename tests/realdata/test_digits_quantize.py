"""Real data: int8 quantization of the digits CNN: calibration alone, quantization-aware training
through the emitted PyTorch module, and the whole fold-bn, prune, quantize, fold-int8 pipeline;
accuracy checked in both backends (the emitted module and onnxruntime)."""

import pytest
import torch

import slimgraph
from tests.realdata.digits import DigitsResNet, accuracy, digits_data, train

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(one_thread):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_data()
    model = train(DigitsResNet(width=16), xtr, ytr, epochs=8, slimming=1e-3)  # sparse BN gammas to prune
    base = accuracy(model, xte, yte)
    assert base > 90
    # 32 calibration batches of 8 training images
    calibration = [(b,) for b in xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(3))[:256]]
                   .split(8)]
    return model, base, (xtr, ytr, xte, yte), calibration


def both_backends(graph, x, y) -> tuple[float, float]:
    """Test accuracy of the emitted PyTorch module and of the emitted ONNX in onnxruntime."""
    from slimgraph.backends.onnx import run_onnxruntime

    torch_acc = accuracy(slimgraph.to_torch(graph).eval(), x, y)
    proto = slimgraph.to_onnx(graph)
    for v in [*proto.graph.input, *proto.graph.output]:  # exported at batch 1: let the batch vary
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.graph.value_info[:]
    (logits,) = run_onnxruntime(proto, [x])
    return torch_acc, float((logits.argmax(1) == y).float().mean()) * 100


def test_calibration_and_qat(trained):
    model, base, (xtr, ytr, xte, yte), calibration = trained
    fq = slimgraph.optimize(model, "fold-bn,quantize", example_inputs=xtr[:1], calibration_data=calibration)
    assert any(n.op == "fake_quant" for n in fq.graph.nodes)
    int8 = slimgraph.optimize(fq.graph, "fold-int8")
    ptq_torch, ptq_ort = both_backends(int8.graph, xte, yte)
    drop = base - min(ptq_torch, ptq_ort)

    # QAT: fine-tune the fake-quant module (straight-through gradients), weights and scales (LSQ),
    # then bring both back into the graph
    module = fq.to_torch().train()
    scales = {name for name, _ in module.named_parameters() if name.endswith("_scale")}
    assert len(scales) >= 10  # every activation and weight quantizer's scale is a parameter
    loss = torch.nn.functional.cross_entropy(module(xtr[:16]), ytr[:16])
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    assert grads and all(g is not None and bool(g.any()) for g in grads)  # weights and scales learn
    module.zero_grad()
    before = fq.to_torch()(xte[:4]).detach()
    calibrated = {v.name: v.const_value for v in fq.graph.constants.values() if v.name in scales}
    assert len(calibrated) == len(scales)
    train(module, xtr, ytr, epochs=2, lr=0.001, seed=2)
    qat_fq = accuracy(module, xte, yte)
    assert slimgraph.load_weights(fq.graph, module) > 0
    assert not torch.allclose(fq.to_torch()(xte[:4]), before)  # the graph now holds the trained weights
    change = [float(((fq.graph.constants[k].const_value - s) / s).abs().max()) for k, s in calibrated.items()]
    # and the trained scales: every one moved; minmax-calibrated activation scales little (~1e-5 in two
    # epochs at this rate: no clipping to pull them), per-channel weight scales by percents
    assert min(change) > 0 and max(change) > 0.01, change
    qat = slimgraph.optimize(fq.graph, "fold-int8")
    qat_torch, qat_ort = both_backends(qat.graph, xte, yte)
    print(f"\ndigits int8: fp32 {base:.2f}% | calibration only: torch {ptq_torch:.2f}%, onnxruntime {ptq_ort:.2f}%"
          f" | QAT (learned scales, largest change {max(change):.1%}): fake-quant module {qat_fq:.2f}%, "
          f"int8 torch {qat_torch:.2f}%, onnxruntime {qat_ort:.2f}%")
    assert ptq_torch >= base - 1.0 and ptq_ort >= base - 1.0
    qat_drop = base - min(qat_torch, qat_ort)
    # QAT recovers at least half of a drop over 1 point; where calibration lost less, QAT loses at most 1 point
    assert qat_drop <= (drop / 2 if drop > 1.0 else 1.0)


def test_prune_finetune_quantize_pipeline(trained):
    model, base, (xtr, ytr, xte, yte), calibration = trained

    def finetune(module):
        train(module, xtr, ytr, epochs=6, lr=0.02, seed=1)

    pruned = slimgraph.iterative_prune(model, xtr[:1], finetune, ratio=0.5, steps=1, criterion="bn_gamma",
                                       scope="global")
    pruned_acc = accuracy(slimgraph.to_torch(pruned.graph), xte, yte)
    result = slimgraph.optimize(pruned.graph, "fold-bn,quantize,fold-int8", calibration_data=calibration)
    assert any(n.op == "dequantize_linear" for n in result.graph.nodes)
    q_torch, q_ort = both_backends(result.graph, xte, yte)
    print(f"\ndigits pipeline: fp32 {base:.2f}% -> pruned 50% + fine-tune {pruned_acc:.2f}% -> int8 torch "
          f"{q_torch:.2f}%, onnxruntime {q_ort:.2f}%")
    assert q_torch >= base - 2.0 and q_ort >= base - 2.0
