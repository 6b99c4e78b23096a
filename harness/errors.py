"""The base class of every user-facing error (bad config, bad data, unloadable model...), and
how user-facing text is worded.

The CLI prints such errors as one clear line and exits non-zero without a traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HarnessError(Exception):
    """An error caused by the user's input; its message says what and where."""


def error_text(exc: BaseException) -> str:
    """What a user error says: its message, and for a file-system error its path first (what
    went wrong with which file is all a user can act on)."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{(exc.strerror or str(exc) or type(exc).__name__).lower()}"
    return str(exc) or type(exc).__name__


def counted(n: int, noun: str) -> str:
    """``1 training run``, ``4 training runs``: a count with its noun (plural by ``-s``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
