"""Files that several workers rewrite (the results table, metrics): never seen half written."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.outputs import temporary_beside

__all__ = ["replaced_together"]


@contextmanager
def replaced_together(*paths: Path) -> Iterator[list[Path]]:
    """Temporary files for ``paths``, renamed over them when the ``with`` block succeeds.

    Every worker rewrites the sweep's tables when it finishes, and the evaluate and report
    stages read them: a reader sees the old files or the new ones, never a torn one, and when
    writing fails (a full disk, a killed worker) the old files stay as they were. The renames
    follow one another only after every file is written, so a pair (CSV and Parquet) is not
    left half old, half new by a failed write.
    """
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporaries = [temporary_beside(path) for path in paths]
    try:
        yield temporaries
        for temporary, path in zip(temporaries, paths, strict=True):
            temporary.replace(path)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
