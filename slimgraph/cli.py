"""The ``slimgraph`` command: optimize, inspect, passes.

    slimgraph optimize torchvision:resnet18 --passes dce -o out/
    slimgraph optimize model.onnx --passes dce -o out.onnx
    slimgraph optimize torchvision:resnet18 --passes fold-bn,quantize,fold-int8 --calibration-data cal.pt -o int8.onnx
    slimgraph inspect torchvision:mobilenet_v2
    slimgraph inspect timm:convnext_atto
    slimgraph optimize path/to/hf-model-folder --dynamic-dims input_ids=batch,seq \
        --dynamic-dims attention_mask=batch,seq --passes canonicalize -o bert.onnx
    slimgraph passes
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from slimgraph.errors import SlimgraphError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise SlimgraphError(f"{self.prog}: {message}")


def default_input_shape(name: str) -> tuple[int, ...]:
    return (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)


def load_model(spec: str, input_shape: str | None):
    """An ONNX path, a Hugging Face model folder (config and weights; its tokenizer, if present,
    makes the example inputs from two sentences), ``torchvision:NAME`` or ``timm:NAME`` (random
    init) or ``package.module:factory``.

    Returns (model, example inputs); ONNX models carry their own input shapes (None).
    """
    import torch

    if spec.endswith(".onnx"):
        if not Path(spec).is_file():
            raise SlimgraphError(f"{spec}: no such file")
        if input_shape:
            return spec, (torch.randn(_parse_shape(input_shape)),)
        return spec, None
    if Path(spec).is_dir():
        return _load_hf_folder(Path(spec))
    if ":" not in spec:
        raise SlimgraphError(f"model {spec!r}: expected a Hugging Face model folder, torchvision:NAME, timm:NAME "
                             "or module:factory")
    source, _, name = spec.partition(":")
    shape = (1, 3, 224, 224)
    if source == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise SlimgraphError("torchvision is not installed (pip install torchvision)") from None
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise SlimgraphError(f"torchvision has no classification model {name!r}")
        model = torchvision.models.get_model(name, weights=None)
        shape = default_input_shape(name)
    elif source == "timm":
        try:
            import timm
        except ImportError:
            raise SlimgraphError("timm is not installed (pip install timm)") from None
        if name not in timm.list_models():
            raise SlimgraphError(f"timm has no model {name!r}")
        model = timm.create_model(name, pretrained=False)
        shape = (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    else:
        try:
            factory = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError) as exc:
            raise SlimgraphError(f"model {spec!r}: {exc}") from None
        model = factory()
    if input_shape:
        shape = _parse_shape(input_shape)
    torch.manual_seed(0)
    return model.eval(), (torch.randn(shape),)


SENTENCES = ["slimgraph makes neural networks faster and smaller.", "A second, shorter sentence."]


def _load_hf_folder(folder: Path):
    """A transformers model saved in ``folder`` (no network): the model, and its tokenizer's encoding
    of two sentences (padded), or random token ids when the folder has no tokenizer."""
    import os

    import torch

    if not (folder / "config.json").is_file():
        raise SlimgraphError(f"{folder}: not a Hugging Face model folder (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SlimgraphError("transformers is not installed (pip install transformers)") from None
    try:
        model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as exc:
        raise SlimgraphError(f"{folder}: transformers cannot load it ({type(exc).__name__}: "
                             f"{(str(exc).strip().splitlines() or [''])[0]})") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return model, dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    except Exception:  # no tokenizer in the folder
        vocab = getattr(model.config, "vocab_size", 100)
        return model, {"input_ids": torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))}


def parse_dynamic_dims(specs: list[str] | None) -> dict | None:
    """``--dynamic-dims input_ids=batch,seq`` (repeatable): the symbol of each leading axis, ``-``
    for a static one."""
    if not specs:
        return None
    dims: dict[str, dict[int, str]] = {}
    for spec in specs:
        name, sep, symbols = spec.partition("=")
        if not sep or not name or not symbols:
            raise SlimgraphError(f"--dynamic-dims {spec!r}: expected INPUT=SYMBOL,SYMBOL,... "
                                 "(e.g. input_ids=batch,seq)")
        dims[name] = {axis: s for axis, s in enumerate(symbols.split(",")) if s != "-"}
    return dims


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise SlimgraphError(f"--input-shape {text!r}: expected comma-separated ints") from None


def _cmd_passes(args) -> None:
    from slimgraph.passes import available
    from slimgraph.passes.pipeline import PRESETS

    for name, description in available().items():
        print(f"{name:20s} {description}")
    print("\npresets (named pipelines; combine them with other passes: onnxruntime-fp32,prune{ratio=0.3}):")
    for name, preset in PRESETS.items():
        if preset.cnn == preset.transformer:
            print(f"{name:20s} = {preset.cnn}")
        else:
            print(f"{name:20s} = {preset.cnn}  (CNNs: most MACs in convs)\n"
                  f"{'':20s} = {preset.transformer}  (transformers)")
        print(f"{'':20s} {preset.description}")


def _cmd_inspect(args) -> None:
    from slimgraph import import_model
    from slimgraph.ir import describe_opaque, graph_stats, opaque_ops, print_graph

    model, inputs = load_model(args.model, args.input_shape)
    graph = import_model(model, inputs, parse_dynamic_dims(args.dynamic_dims))
    print(print_graph(graph, constants=args.constants))
    stats = graph_stats(graph)
    print(", ".join(f"{k}={v}" for k, v in stats.items()))
    opaque = opaque_ops(graph)
    print(f"imported through {graph.meta.get('source', '?')}; opaque ops: "
          + (describe_opaque(opaque) + " (passes skip them and keep the channels they touch)" if opaque else "none"))


CALIBRATION_HELP = (
    "calibration inputs for quantize: a .pt file (torch.save of a tensor [N, ...], samples along dim 0, "
    "or of a list of batches, each a tensor or a tuple with one tensor per model input), a .npy file "
    "[N, ...], or an .npz with one [N, ...] array per model input (by input name, else in order); "
    "samples are fed in batches of the model input's batch size")


def load_calibration_data(path: str, graph) -> list[tuple]:
    """The batches in a --calibration-data file, checked against the graph's inputs (shape, dtype,
    NaN/Inf): a one-line SlimgraphError for anything wrong."""
    import numpy as np
    import torch

    from slimgraph.passes.calibration import check_batches

    who = f"--calibration-data {path}"
    file = Path(path)
    if not file.is_file():
        raise SlimgraphError(f"{who}: no such file")
    suffix = file.suffix.lower()
    if suffix not in (".pt", ".pth", ".npy", ".npz"):
        raise SlimgraphError(f"{who}: expected a .pt, .npy or .npz file")
    try:
        if suffix == ".npy":
            data = torch.from_numpy(np.load(file, allow_pickle=False))
        elif suffix == ".npz":
            with np.load(file, allow_pickle=False) as arrays:
                data = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        else:
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise SlimgraphError(f"{who}: cannot read it ({type(exc).__name__}: {reason})") from None
    if isinstance(data, torch.Tensor):
        data = [data] if len(graph.inputs) == 1 else data
        if isinstance(data, torch.Tensor):
            raise SlimgraphError(f"{who}: one tensor feeds one input; the model takes {len(graph.inputs)} "
                                 "(save a list of input tuples, or an .npz with one array per input)")
        batches = _split_samples(data, graph, who)
    elif isinstance(data, dict):
        names = [v.name for v in graph.inputs]
        if all(n in data for n in names):
            per_input = [data[n] for n in names]
        elif len(data) == len(names):
            per_input = list(data.values())
        else:
            raise SlimgraphError(f"{who}: holds arrays {', '.join(map(str, data))}; the model's inputs are "
                                 f"{', '.join(names)} (one [N, ...] array per input)")
        batches = _split_samples(per_input, graph, who)
    elif isinstance(data, (list, tuple)):
        batches = [(item,) if isinstance(item, torch.Tensor) else item for item in data]
    else:
        raise SlimgraphError(f"{who}: holds a {type(data).__name__}, not tensors")
    cast = []
    for batch in batches:  # numpy data is often float64: feed it as the model's float type
        if isinstance(batch, (tuple, list)) and len(batch) == len(graph.inputs):
            batch = tuple(t.to(v.dtype.torch) if isinstance(t, torch.Tensor) and t.is_floating_point()
                          and v.dtype.is_float else t for t, v in zip(batch, graph.inputs))
        cast.append(batch)
    return check_batches(graph, cast, who)


def _split_samples(per_input: list, graph, who: str) -> list[tuple]:
    """One [N, ...] tensor per input -> batches of the model input's batch size."""
    import torch

    if not all(isinstance(t, torch.Tensor) for t in per_input):
        raise SlimgraphError(f"{who}: expected tensors, got {', '.join(type(t).__name__ for t in per_input)}")
    for i, (t, v) in enumerate(zip(per_input, graph.inputs)):
        if t.dim() != len(v.shape) or tuple(t.shape[1:]) != tuple(v.shape[1:]):
            want = ", ".join(["N", *(str(d) for d in v.shape[1:])])
            raise SlimgraphError(f"{who}: input {i} (%{v.name}) has shape {tuple(t.shape)}; the model needs "
                                 f"[{want}] (samples along dim 0; --input-shape sets a torch model's input)")
    n = per_input[0].shape[0]
    if any(t.shape[0] != n for t in per_input):
        raise SlimgraphError(f"{who}: the inputs hold different numbers of samples "
                             f"({', '.join(str(t.shape[0]) for t in per_input)})")
    size = graph.inputs[0].shape[0] if isinstance(graph.inputs[0].shape[0], int) else 1
    if n == 0 or n % size:
        raise SlimgraphError(f"{who}: {n} samples do not make batches of {size} (the model input's batch size)")
    return [tuple(t[i:i + size] for t in per_input) for i in range(0, n, size)]


def _cmd_optimize(args) -> None:
    from slimgraph import import_model, optimize
    from slimgraph.passes import to_passes
    from slimgraph.passes.instruments import PrintAfterChange

    pipeline = to_passes(args.passes)  # a bad pipeline fails before the model loads
    onnx_out = bool(args.output) and args.output.endswith(".onnx")
    if args.quant_format != "qdq" and not onnx_out:
        raise SlimgraphError(f"--quant-format {args.quant_format}: only for ONNX output (-o out.onnx)")
    if args.dynamic_batch and not onnx_out:
        raise SlimgraphError("--dynamic-batch: only for ONNX output (-o out.onnx)")
    needing = [p.name for p in pipeline if p.needs_calibration()]
    if needing and not args.calibration_data:
        raise SlimgraphError(f"{' and '.join(repr(n) for n in needing)} need{'s' * (len(needing) == 1)} calibration "
                             "inputs: --calibration-data PATH (.pt, .npy or .npz; see --help)")
    dynamic_dims = parse_dynamic_dims(args.dynamic_dims)
    model, inputs = load_model(args.model, args.input_shape)
    calibration = None
    if args.calibration_data:
        model = import_model(model, inputs, dynamic_dims)  # the graph's inputs say what the data must look like
        calibration = load_calibration_data(args.calibration_data, model)
    instruments = [PrintAfterChange()] if args.print_after_change else []
    result = optimize(model, pipeline, example_inputs=inputs, instruments=instruments,
                      calibration_data=calibration, dynamic_dims=None if args.calibration_data else dynamic_dims,
                      measure=args.measure)
    print(result.trace.summary())
    if args.report:
        print(f"report: {result.report(args.report, overwrite=args.force)}")
    if onnx_out:
        result.to_onnx(args.output, opset=args.opset, overwrite=args.force, quant_format=args.quant_format,
                       dynamic_batch=args.dynamic_batch)
        print(f"wrote {args.output}")
    elif args.output:
        folder = result.save_torch(Path(args.output), overwrite=args.force)
        print(f"wrote {folder / 'model.py'} and {folder / 'weights.pt'}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimgraph", description="Make neural networks faster and smaller.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("optimize", help="run a pass pipeline and write model.py + weights")
    p.add_argument("model", help="model.onnx, a Hugging Face model folder, torchvision:NAME, timm:NAME or "
                                 "module:factory")
    p.add_argument("--dynamic-dims", action="append", metavar="INPUT=SYMBOLS",
                   help="keep dims symbolic, e.g. input_ids=batch,seq (repeat per input; - for a static axis)")
    p.add_argument("--passes", default="dce", help='pipeline, e.g. "dce,remove-identity"')
    p.add_argument("-o", "--output", help="out.onnx, or a folder for model.py and weights.pt")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset to emit (default: an ONNX model's own, else 17)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model.py")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--print-after-change", action="store_true", help="print each changing pass's diff")
    p.add_argument("--calibration-data", metavar="PATH", help=CALIBRATION_HELP)
    p.add_argument("--quant-format", choices=("qdq", "qoperator"), default="qdq",
                   help="how an int8 model is written to ONNX: qdq (QuantizeLinear/DequantizeLinear around "
                        "float ops, the default) or qoperator (QLinearConv, QGemm, ... written out)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="ONNX output: a symbolic batch dim (N) on inputs and outputs, so it runs at any batch size")
    p.add_argument("--report", metavar="PATH", help="write an HTML report of what every pass did")
    p.add_argument("--measure", choices=("onnxruntime", "torch"),
                   help="time the graph after every pass on this runtime (one thread): a latency column")
    p.set_defaults(func=_cmd_optimize)
    p = sub.add_parser("inspect", help="print a model's IR and stats")
    p.add_argument("model")
    p.add_argument("--dynamic-dims", action="append", metavar="INPUT=SYMBOLS", help="as for optimize")
    p.add_argument("--input-shape")
    p.add_argument("--constants", action="store_true", help="list constants too")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("passes", help="list the available passes")
    p.set_defaults(func=_cmd_passes)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            raise SlimgraphError("slimgraph: give a command: optimize, inspect or passes")
        args.func(args)
    except SlimgraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
