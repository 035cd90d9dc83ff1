"""The error users can cause and fix in synthesis (bad text, reference audio, output path, options)."""

from __future__ import annotations


class SynthesisError(ValueError):
    """A one-line message saying what is wrong and where; ``synthesize.py`` prints it and exits with 2."""


def one_line(err: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__
