"""The torch frontend: torch.nn.Module -> IR Graph.

Where to find things:
  importer.py   import_torch: example inputs, which tracing path, private copy of the model
  tracing.py    torch.fx tracing; torch.export + Core ATen decompositions (and what is kept whole)
  converter.py  walks a traced fx graph and builds the IR (folding, inlining, opaque fallback)
  ops/          the handler tables: modules.py, functions.py (torch.*, F.*, Tensor methods), aten.py
  dims.py       sizes tracked on the host side (the symbolic batch)
  copying.py    the private copy of the user's model
"""

from slimgraph.frontends.torch.importer import import_torch

__all__ = ["import_torch"]
