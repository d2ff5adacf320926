"""slimgraph: one IR where every rewrite composes, each pass verified and shown as a diff."""

from slimgraph.api import OptimizeResult, import_model, load_weights, optimize, to_onnx, to_torch
from slimgraph.errors import SlimgraphError
from slimgraph.generate import generate
from slimgraph.ir import Graph
from slimgraph.iterative import bn_l1_penalty, iterative_prune

__all__ = [
    "Graph", "OptimizeResult", "SlimgraphError", "bn_l1_penalty", "generate", "import_model", "iterative_prune",
    "load_weights", "optimize", "to_onnx", "to_torch",
]
__version__ = "0.1.0"
