"""One way for every command to report a user error: one line on stderr and an exit code (2)."""

from __future__ import annotations

import sys
from typing import NoReturn

from omegaconf.errors import MissingMandatoryValue

EXIT_USER_ERROR = 2


def one_line(err: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", "") or "?"
        return f"missing value: {key} (set it on the command line: {key}=...)"
    return " ".join(str(err).split()) or type(err).__name__


def exit_with(err: BaseException | str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``error: <one line>`` to stderr and exit with ``code`` (no traceback)."""
    message = err if isinstance(err, str) else one_line(err)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None
