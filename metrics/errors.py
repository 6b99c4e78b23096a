"""Errors the metrics package raises on purpose (the CLI turns them into one-line messages)."""

from __future__ import annotations


class MetricsError(Exception):
    """Base class: a problem the user can fix, reported without a traceback by the CLI."""


class MetricsInputError(MetricsError, ValueError):
    """Bad input: an empty folder, a file that is not an image, prompts that do not match."""


class WeightsUnavailableError(MetricsError, RuntimeError):
    """Model weights cannot be found (offline and not cached, missing file, unsafe format)."""
