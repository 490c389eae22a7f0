"""The error a checkpoint that does not fit raises, apart so that every reader of checkpoint files (the
header check, the loaders) can raise it without importing each other."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the keys that are missing, unexpected or mis-shaped."""
