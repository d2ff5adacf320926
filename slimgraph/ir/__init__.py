"""The IR: Values, Nodes and Graphs, the op registry, printer, verifier and interpreter.

Nothing here imports a pass, a frontend or a backend.
"""

from slimgraph.ir.coupling import Coupling, DimRef
from slimgraph.ir.dtypes import DType
from slimgraph.ir.graph import Graph, clean_name
from slimgraph.ir.interpreter import run
from slimgraph.ir.node import Node
from slimgraph.ir.opaque import OpaqueImpl
from slimgraph.ir.ops import OPAQUE, OpDef, get_op, is_canonical, register_op, registered_ops
from slimgraph.ir.printer import print_graph
from slimgraph.ir.stats import describe_opaque, graph_stats, opaque_ops
from slimgraph.ir.value import Use, Value
from slimgraph.ir.verifier import verify

__all__ = [
    "OPAQUE", "Coupling", "DType", "DimRef", "Graph", "Node", "OpDef", "OpaqueImpl", "Use", "Value",
    "clean_name", "describe_opaque", "get_op", "graph_stats", "is_canonical", "opaque_ops", "print_graph",
    "register_op",
    "registered_ops", "run", "verify",
]
