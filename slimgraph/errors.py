"""Errors slimgraph raises on purpose. Everything else is a bug."""

from __future__ import annotations


class SlimgraphError(Exception):
    """Base class of every error the package raises deliberately."""


class ImportError_(SlimgraphError):
    """A model could not be imported (untraceable, wrong example inputs, corrupt file)."""


class UnsupportedError(SlimgraphError):
    """A valid model uses something a frontend, pass or backend does not handle."""


class VerificationError(SlimgraphError):
    """The graph broke an IR invariant (use-def, topology, shapes)."""


class PassError(SlimgraphError):
    """Unknown pass, bad option, unmet requirement, or a pass that failed its checks."""


class NumericalError(PassError):
    """An exact pass changed the model's outputs beyond tolerance."""


# `ImportError` shadows a builtin; export a readable alias.
ModelImportError = ImportError_
