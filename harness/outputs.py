"""Reading the stages' outputs (results tables, ``references.json``, ``metrics.json``) in the
stages after them: a damaged file (a write torn by a full disk or a kill, a merge conflict in
the git-tracked ``reports/metrics.json``, a partial ``dvc pull``) is one error naming the file
and the command that writes it again, not a parser's traceback.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["read_json_object", "read_table", "temporary_beside"]


def temporary_beside(path: Path) -> Path:
    """A temporary name in ``path``'s folder, to write and then rename over ``path``.

    Unique across processes, threads and machines: workers on several hosts (or containers,
    each with its own process ids) share ``sweep.dir``, and a name made of the process id alone
    let one worker rename another's half-written file over the table.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _damaged(
    path: Path, exc: BaseException, writer: str, error: type[HarnessError]
) -> HarnessError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return error(f"{path}: unreadable ({reason}); run `{writer}` again to rewrite it")


def read_table(path: Path, writer: str, error: type[HarnessError]) -> pd.DataFrame:
    """``path`` as a DataFrame.

    Raises:
        HarnessError: ``error``, naming ``path`` and ``writer`` (the command that writes it),
            when the file is not a readable Parquet table.
    """
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise _damaged(path, exc, writer, error) from None


def read_json_object(path: Path, writer: str, error: type[HarnessError]) -> dict[str, Any]:
    """``path``'s JSON object, or ``{}`` when there is no such file.

    Raises:
        HarnessError: ``error``, naming ``path`` and ``writer``, when it is not a JSON object.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise _damaged(path, exc, writer, error) from None
    if not isinstance(data, dict):
        raise _damaged(path, ValueError("not a JSON object"), writer, error)
    return data
