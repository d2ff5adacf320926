"""Canonical op definitions; importing this package registers them all."""

from slimgraph.ir.opdefs import elementwise, nn, quant, shape  # noqa: F401
