"""The error users can cause and fix in synthesis (bad text, reference audio, output path, options)."""

from __future__ import annotations

from elise.errors import one_line

__all__ = ["SynthesisError", "one_line"]


class SynthesisError(ValueError):
    """A one-line message saying what is wrong and where; ``synthesize.py`` prints it and exits with 2."""
