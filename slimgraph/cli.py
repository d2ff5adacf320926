"""The ``slimgraph`` command: optimize, inspect, passes.

    slimgraph optimize torchvision:resnet18 --passes dce -o out/
    slimgraph optimize model.onnx --passes dce -o out.onnx
    slimgraph inspect torchvision:mobilenet_v2
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
    """An ONNX path, ``torchvision:NAME`` (random init) or ``package.module:factory``.

    Returns (model, example inputs); ONNX models carry their own input shapes (None).
    """
    import torch

    if spec.endswith(".onnx"):
        if not Path(spec).is_file():
            raise SlimgraphError(f"{spec}: no such file")
        if input_shape:
            return spec, (torch.randn(_parse_shape(input_shape)),)
        return spec, None
    if ":" not in spec:
        raise SlimgraphError(f"model {spec!r}: expected torchvision:NAME or module:factory")
    source, _, name = spec.partition(":")
    if source == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise SlimgraphError("torchvision is not installed (pip install torchvision)") from None
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise SlimgraphError(f"torchvision has no classification model {name!r}")
        model = torchvision.models.get_model(name, weights=None)
        shape = default_input_shape(name)
    else:
        try:
            factory = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError) as exc:
            raise SlimgraphError(f"model {spec!r}: {exc}") from None
        model = factory()
        shape = (1, 3, 224, 224)
    if input_shape:
        shape = _parse_shape(input_shape)
    torch.manual_seed(0)
    return model.eval(), (torch.randn(shape),)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise SlimgraphError(f"--input-shape {text!r}: expected comma-separated ints") from None


def _cmd_passes(args) -> None:
    from slimgraph.passes import available

    for name, description in available().items():
        print(f"{name:20s} {description}")


def _cmd_inspect(args) -> None:
    from slimgraph import import_model
    from slimgraph.ir import graph_stats, print_graph

    model, inputs = load_model(args.model, args.input_shape)
    graph = import_model(model, inputs)
    print(print_graph(graph, constants=args.constants))
    stats = graph_stats(graph)
    print(", ".join(f"{k}={v}" for k, v in stats.items()))


def _cmd_optimize(args) -> None:
    from slimgraph import optimize
    from slimgraph.passes.instruments import PrintAfterChange

    model, inputs = load_model(args.model, args.input_shape)
    instruments = [PrintAfterChange()] if args.print_after_change else []
    result = optimize(model, args.passes, example_inputs=inputs, instruments=instruments)
    print(result.trace.summary())
    if args.output and args.output.endswith(".onnx"):
        result.to_onnx(args.output, opset=args.opset, overwrite=args.force)
        print(f"wrote {args.output}")
    elif args.output:
        folder = result.save_torch(Path(args.output), overwrite=args.force)
        print(f"wrote {folder / 'model.py'} and {folder / 'weights.pt'}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimgraph", description="Make neural networks faster and smaller.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("optimize", help="run a pass pipeline and write model.py + weights")
    p.add_argument("model", help="model.onnx, torchvision:NAME or module:factory")
    p.add_argument("--passes", default="dce", help='pipeline, e.g. "dce,remove-identity"')
    p.add_argument("-o", "--output", help="out.onnx, or a folder for model.py and weights.pt")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset to emit (default 17)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model.py")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--print-after-change", action="store_true", help="print each changing pass's diff")
    p.set_defaults(func=_cmd_optimize)
    p = sub.add_parser("inspect", help="print a model's IR and stats")
    p.add_argument("model")
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
