"""Handler tables for the torch frontend, one module per kind of call:

* ``modules``: torch.nn modules torch.fx keeps as leaves (nn.Conv2d, nn.MultiheadAttention, ...);
* ``functions``: torch.* / torch.nn.functional calls, Tensor methods and Python operators;
* ``aten``: Core ATen ops and the composite ops torch.export keeps whole (``tracing.KEEP``).

``find_handler`` looks a call up; importing this package fills the tables.
"""

from slimgraph.frontends.torch.ops import aten, functions, modules  # noqa: F401  (fill the tables)
from slimgraph.frontends.torch.ops.registry import find_handler

__all__ = ["find_handler"]
