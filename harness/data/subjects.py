"""Several subjects in one sweep (``data.subjects``): which ones, and each one's data config.

``data.subjects`` names the subjects (``[dog, cat2, backpack, teapot]``) or says ``all``: every
subject folder of the source (``dreambench_dir/*`` or ``raw_dir/*``, hidden folders left out).
Everything that works on one subject (the source scan, ``prepare``, the loader) is given one
:class:`~harness.config.DataConfig` per subject by :func:`per_subject`; each subject keeps its
own class noun and, for DreamBench, its own prompt list (live subjects and objects differ).
Without ``data.subjects`` the list is ``[data.subject]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.data.errors import DataError
from harness.data.files import resolve_path

if TYPE_CHECKING:
    from harness.config import DataConfig
    from harness.data.identifier import IdentifierContext
    from harness.data.prepare import PrepareResult

__all__ = [
    "is_multi_subject",
    "one_subject",
    "per_subject",
    "prepare_subjects",
    "scan_subjects",
    "subject_names",
]


def is_multi_subject(cfg: DataConfig) -> bool:
    """Does the config sweep several subjects (``data.subjects`` set, even to one name)?"""
    return cfg.subjects is not None


def subject_names(cfg: DataConfig, root: Path) -> list[str]:
    """The configured subjects, in order (``all``: the source's subject folders, sorted).

    Raises:
        DataError: ``all`` and the source folder is missing or holds no subject folder.
    """
    if cfg.subjects is None:
        return [cfg.subject]
    if isinstance(cfg.subjects, list):
        return list(cfg.subjects)
    setting = "dreambench_dir" if cfg.source == "dreambench" else "raw_dir"
    folder = resolve_path(str(getattr(cfg, setting)), root)
    names = (
        sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if folder.is_dir()
        else []
    )
    if not names:
        raise DataError(f"data.subjects: 'all' but data.{setting} ({folder}) has no subject folder")
    return names


def one_subject(cfg: DataConfig, name: str, **update: object) -> DataConfig:
    """``cfg`` for subject ``name`` alone: ``data.subject`` set, ``data.subjects`` cleared
    (and ``update``'s other keys set)."""
    return cfg.model_copy(update={**update, "subject": name, "subjects": None})


def per_subject(cfg: DataConfig, root: Path) -> list[DataConfig]:
    """One data config per subject (:func:`one_subject`)."""
    return [one_subject(cfg, name) for name in subject_names(cfg, root)]


def scan_subjects(cfg: DataConfig, root: Path) -> dict[str, Any]:
    """:func:`harness.data.scan_source` of every subject (one subject: its scan, unchanged)."""
    from harness.data.source import scan_source

    if not is_multi_subject(cfg):
        return scan_source(cfg, root)
    return {"subjects": {one.subject: scan_source(one, root) for one in per_subject(cfg, root)}}


def prepare_subjects(
    cfg: DataConfig,
    root: Path,
    *,
    progress: bool = True,
    identifier: IdentifierContext | None = None,
) -> list[PrepareResult]:
    """Prepare every subject; one that fails does not stop the others (nothing done is lost).

    Raises:
        DataError: after all subjects were tried, one line per subject that failed (each
            names the subject and its rejection report), when any failed.
    """
    from harness.data.prepare import prepare_subject

    if not is_multi_subject(cfg):
        return [prepare_subject(cfg, root, progress=progress, identifier=identifier)]
    results, failed = [], []
    for one in per_subject(cfg, root):
        try:
            results.append(prepare_subject(one, root, progress=progress, identifier=identifier))
        except DataError as exc:
            failed.append(f"subject {one.subject!r}: {exc}")
    if failed:
        done = f" ({len(results)} other(s) prepared)" if results else ""
        raise DataError("\n".join(failed) + done)
    return results
