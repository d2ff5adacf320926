"""Canonical op definitions; importing this package registers them all."""

from slimgraph.ir.opdefs import elementwise, indexing, nn, quant, shape  # noqa: F401
