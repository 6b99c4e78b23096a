"""Errors and rejection records shared by the data stage."""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import HarnessError


class DataError(HarnessError):
    """A dataset problem that stops the stage; the message names the file or folder."""


@dataclass(frozen=True, order=True)
class Rejection:
    """One input that was not used, and why (a line of ``rejects.json``).

    ``file`` is relative to the subject folder (``captions.txt:3`` for a caption entry, ``.``
    for the folder itself), so the report is the same wherever the dataset lives.
    """

    file: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON-compatible form."""
        return {"file": self.file, "reason": self.reason}
