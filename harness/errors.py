"""The base class of every user-facing error (bad config, bad data, unloadable model...).

The CLI prints such errors as one clear line and exits non-zero without a traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HarnessError(Exception):
    """An error caused by the user's input; its message says what and where."""
