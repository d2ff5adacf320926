"""slimgraph: one IR where every rewrite composes, each pass verified and shown as a diff."""

from slimgraph.api import OptimizeResult, import_model, optimize, to_onnx, to_torch
from slimgraph.errors import SlimgraphError
from slimgraph.ir import Graph

__all__ = ["Graph", "OptimizeResult", "SlimgraphError", "import_model", "optimize", "to_onnx", "to_torch"]
__version__ = "0.1.0"
