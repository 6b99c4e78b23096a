"""Where a subject's photos come from, and a fingerprint of them for DVC.

* ``sample``: drawn by :mod:`harness.data.sample` into ``<root>/data/sample/<subject>``.
* ``folder``: ``<root>/<raw_dir>/<subject>`` (photos plus optional captions, ``dvc add``-ed).
* ``dreambench``: ``<dreambench_dir>/<subject>`` read in place, never copied; the class noun
  and the evaluation prompts come from the dataset's ``prompts_and_classes.txt``. The dataset's
  class wins over ``data.class_name`` (a preset's class is for its own subject), with a warning;
  ``data.class_name`` only names the class of a subject the file does not list.

Photos sit directly in the subject folder; hidden files are ignored. Symlinks (a photo, or the
subject folder itself) may point anywhere inside the dataset root (the folder holding the subject
folders) or the project's DVC cache (``cache.type symlink``); any other target is rejected (a
photo is listed in the rejection report, a subject folder stops the stage).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from harness.config import DataConfig
from harness.data.errors import DataError
from harness.data.files import is_within, resolve_path, sha256_file
from harness.data.sample import SAMPLE_CLASS_NAME, make_sample_subject

__all__ = [
    "DREAMBENCH_FILE",
    "SAMPLE_DIR",
    "SAMPLE_SEED",
    "SubjectSource",
    "entry_problem",
    "list_entries",
    "parse_dreambench_file",
    "printable_name",
    "resolve_source",
    "scan_source",
    "symlink_problem",
]

DREAMBENCH_FILE = "prompts_and_classes.txt"
SAMPLE_DIR = "data/sample"
SAMPLE_SEED = 0  # wanted: a data.sample_seed config field
# DreamBench's "live subject" prompt list applies to these classes; objects get the other one.
_LIVE_CLASSES = frozenset({"cat", "dog"})
_PROMPT_RE = re.compile(r"""^'(?P<text>.*)'\.format\(\s*unique_token\s*,\s*class_token\s*\),?$""")


@dataclass(frozen=True)
class SubjectSource:
    """A resolved subject: its folder, class noun and (for DreamBench) evaluation prompts.

    ``prompts`` use the harness's placeholders ``{token}`` and ``{class_name}``. ``label`` is
    the folder as the config names it (used in reports, so they do not depend on the clone's
    location). ``warnings`` are config problems found while resolving (for the manifest).
    """

    subject: str
    kind: Literal["sample", "folder", "dreambench"]
    folder: Path
    dataset_root: Path
    allowed_roots: tuple[Path, ...]
    class_name: str | None
    label: str
    prompts: tuple[str, ...] = ()
    live: bool | None = None
    warnings: tuple[str, ...] = ()


def parse_dreambench_file(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Read DreamBench's ``prompts_and_classes.txt``.

    Returns ``(class by subject, object prompts, live-subject prompts)``; prompts have
    ``{0}``/``{1}`` replaced by ``{token}``/``{class_name}``.

    Raises:
        DataError: naming the file when it is missing or has no class table.
    """
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:  # a Latin-1 or UTF-16 copy: not UTF-8
        raise DataError(f"{path}: cannot read DreamBench prompt file ({exc})") from None
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = "classes"
    for raw in lines:
        line = raw.strip()
        lower = line.lower()
        if lower.startswith("object prompts"):
            section = "object"
        elif lower.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in line and not lower.startswith("subject_name"):
            subject, _, noun = line.partition(",")
            classes[subject.strip()] = noun.strip()
        elif section in prompts and (match := _PROMPT_RE.match(line)):
            text = match["text"].replace("{0}", "{token}").replace("{1}", "{class_name}")
            prompts[section].append(text)
    if not classes:
        raise DataError(f"{path}: no 'subject_name,class' table found")
    return classes, prompts["object"], prompts["live"]


def resolve_source(cfg: DataConfig, root: Path) -> SubjectSource:
    """Resolve the configured subject to its folder, class noun and prompts (reads no photos).

    Raises:
        DataError: unknown DreamBench subject or missing prompt file, or a missing class noun
            for a template that needs one.
    """
    root = root.resolve()
    if cfg.source == "dreambench":
        return _dreambench_source(cfg, root)
    return _folder_source(cfg, root)


def _dreambench_source(cfg: DataConfig, root: Path) -> SubjectSource:
    """A DreamBench subject: class noun and prompt list from the dataset's prompt file."""
    assert cfg.dreambench_dir is not None  # the config validator guarantees it
    bench = resolve_path(cfg.dreambench_dir, root)
    classes, objects, live_prompts = parse_dreambench_file(bench / DREAMBENCH_FILE)
    # The dataset's class wins: a preset's data.class_name is for its own (sample) subject.
    # data.class_name only names the class of a subject the dataset file does not list.
    dataset_class = classes.get(cfg.subject)
    class_name = dataset_class or cfg.class_name
    if class_name is None:
        known = ", ".join(sorted(classes))
        raise DataError(
            f"{bench / DREAMBENCH_FILE}: no class for subject {cfg.subject!r} "
            f"(known: {known}); set data.class_name"
        )
    warnings: tuple[str, ...] = ()
    if dataset_class is not None and cfg.class_name not in (None, dataset_class):
        warnings = (
            f"data.class_name {cfg.class_name!r} ignored for DreamBench subject "
            f"{cfg.subject!r}: the dataset's class {dataset_class!r} "
            f"({DREAMBENCH_FILE}) is used",
        )
    live = class_name in _LIVE_CLASSES
    return SubjectSource(
        subject=cfg.subject,
        kind="dreambench",
        folder=bench / cfg.subject,
        dataset_root=bench,
        allowed_roots=(bench.resolve(),),
        class_name=class_name,
        label=f"{cfg.dreambench_dir.rstrip('/')}/{cfg.subject}",
        prompts=tuple(live_prompts if live else objects),
        live=live,
        warnings=warnings,
    )


def _folder_source(cfg: DataConfig, root: Path) -> SubjectSource:
    """A ``sample`` or ``folder`` subject; its photos may also be links into the DVC cache."""
    class_name: str | None
    if cfg.source == "sample":
        base, label_base = root / SAMPLE_DIR, SAMPLE_DIR
        class_name = cfg.class_name or SAMPLE_CLASS_NAME
    else:
        base, label_base = resolve_path(cfg.raw_dir, root), cfg.raw_dir.rstrip("/")
        class_name = cfg.class_name
    if class_name is None and "{class_name}" in cfg.caption_template:
        raise DataError(
            f"{label_base}/{cfg.subject}: data.class_name is required for source "
            f"{cfg.source!r} (the caption template uses {{class_name}})"
        )
    return SubjectSource(
        subject=cfg.subject,
        kind=cfg.source,
        folder=base / cfg.subject,
        dataset_root=base,
        allowed_roots=(base.resolve(), (root / ".dvc" / "cache").resolve()),
        class_name=class_name,
        label=f"{label_base}/{cfg.subject}",
    )


def ensure_folder(src: SubjectSource, cfg: DataConfig) -> None:
    """Generate the sample (deterministic, idempotent); check that the subject folder exists.

    A subject folder that is a symlink must stay inside the dataset root, like a symlinked
    photo (:func:`symlink_problem`): ``data/raw/my-dog -> /elsewhere`` would put photos that
    ``dvc add data/raw`` never versions into the prepared set.

    Raises:
        DataError: naming the folder (and the available DreamBench subjects) when missing, a
            broken symlink, or a symlink leaving the dataset root.
    """
    if src.kind == "sample":
        make_sample_subject(src.folder, cfg.sample_images, seed=SAMPLE_SEED)
    if src.folder.is_symlink():
        target = _resolved(src.folder)
        if target is None:
            raise DataError(f"{src.label}: the subject folder is a symlink loop")
        if not target.exists():
            raise DataError(f"{src.label}: the subject folder is a broken symlink (-> {target})")
        if not is_within(target, list(src.allowed_roots)):
            root_label = src.label.rpartition("/")[0] or str(src.dataset_root)
            raise DataError(
                f"{src.label}: the subject folder is a symlink leaving {root_label} "
                f"(-> {target}); move or copy the photos into {src.label}"
            )
    if src.folder.is_dir():
        return
    hint = ""
    if src.kind == "dreambench" and src.dataset_root.is_dir():
        names = sorted(p.name for p in src.dataset_root.iterdir() if p.is_dir())
        hint = f"; subjects there: {', '.join(names)}"
    raise DataError(f"{src.label}: subject folder not found ({src.folder}){hint}")


def list_entries(folder: Path) -> list[Path]:
    """Top-level, non-hidden entries of a subject folder, sorted by name (stable order)."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def printable_name(path: Path | str) -> str:
    """``path.name`` (a string: itself) as text any report can hold: a name that is not UTF-8
    (``café`` saved in Latin-1) has its bad bytes as ``\\xe9`` escapes (Python keeps them as
    lone surrogates, which no UTF-8 file or terminal can take)."""
    name = path if isinstance(path, str) else path.name
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def entry_problem(path: Path, allowed_roots: tuple[Path, ...]) -> str | None:
    """Why an entry of a subject folder is unusable before it is even read (a name that is not
    UTF-8, or :func:`symlink_problem`), else None."""
    if printable_name(path) != path.name:
        # Its name could not go into manifest.json, rejects.txt or a caption file's lines.
        return "file name is not valid UTF-8 (rename the file)"
    return symlink_problem(path, allowed_roots)


def _resolved(path: Path) -> Path | None:
    """``path.resolve()``, or None for a symlink loop (``a.jpg -> b.jpg -> a.jpg``)."""
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        return None
    except OSError as exc:  # Python >= 3.13 raises ELOOP itself
        if exc.errno == errno.ELOOP:
            return None
        raise


def symlink_problem(path: Path, allowed_roots: tuple[Path, ...]) -> str | None:
    """Why a symlinked entry is unusable (broken, in a loop, or leaving the dataset root), else
    None."""
    if not path.is_symlink():
        return None
    target = _resolved(path)
    if target is None:
        return "symlink loop"
    shown = printable_name(str(target))  # the target's name may not be UTF-8 either
    if not target.exists():
        return f"broken symlink (-> {shown})"
    if not is_within(target, list(allowed_roots)):
        return f"symlink leaves the dataset root (-> {shown})"
    return None


def scan_source(cfg: DataConfig, root: Path) -> dict[str, Any]:
    """JSON-able fingerprint of the subject's raw files, the input of an always-run DVC stage.

    Holds the sorted top-level file names with size and sha256, the resolved class noun and,
    for DreamBench, the sha256 of ``prompts_and_classes.txt``. For ``sample`` the photos are
    (re)generated first; unchanged photos keep their bytes, so the fingerprint is stable.
    Symlinks leaving the dataset root are listed with their target but never read.

    Raises:
        DataError: when the subject folder is missing or the class noun cannot be resolved.
    """
    src = resolve_source(cfg, root)
    ensure_folder(src, cfg)
    files: list[dict[str, Any]] = []
    for entry in list_entries(src.folder):
        problem = entry_problem(entry, src.allowed_roots)
        if problem is not None:
            files.append({"path": printable_name(entry), "problem": problem})
        elif entry.is_file():
            files.append(
                {"path": entry.name, "size": entry.stat().st_size, "sha256": sha256_file(entry)}
            )
        else:
            files.append({"path": entry.name, "problem": "not a regular file"})
    out: dict[str, Any] = {
        "subject": cfg.subject,
        "source": cfg.source,
        "folder": src.label,
        "class_name": src.class_name,
        "files": files,
    }
    if src.kind == "dreambench":
        out["prompts_sha256"] = sha256_file(src.dataset_root / DREAMBENCH_FILE)
    return out
