"""The error of every checkpoint reader (``elise.checkpoints``, ``elise.interop``): one line, a user error."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not an elise/transformers checkpoint (one-line message)."""
