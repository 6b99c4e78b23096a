"""The base class of every user-facing error (bad config, bad data, unloadable model...).

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
