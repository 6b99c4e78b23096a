"""The ``prepare`` stage: raw subject photos -> ``<prepared_dir>/<subject>/``.

Output layout (everything is rewritten on each run; stale files of a previous run go)::

    <root>/<prepared_dir>/<subject>/
        train/<stem>.png   training photos: square (crop="center"), resolution x resolution
        val/<stem>.png     held-out photos (see harness.data.split for the few-photos policy)
        manifest.json      settings, counts, warnings, and per photo: source file, sha256,
                           format, mode, original size, EXIF orientation, upright size, crop
                           box, caption, caption source, split, reference flag, pHash, notes
        rejects.json       every input not used, with its reason (also on failure), and the
                           warnings
        rejects.txt        the same, one ``file: reason`` line each, for people; warnings as
                           ``# warning:`` lines

Bad inputs never stop the stage on their own: each is reported and every valid photo is still
processed. The stage fails (``DataError`` naming the folder and the counts, after writing the
rejection report and *no* manifest) only when fewer than ``min_images`` usable photos remain.

Determinism: files are processed in name order; the split depends on content hashes and the
seed; PNGs carry no metadata; JSON is key-sorted with fixed indentation. The same input and the
same library versions give byte-identical outputs (the Pillow version is in the manifest).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
from rich.console import Console
from rich.progress import track

from harness.config import DataConfig
from harness.data.captions import (
    MISSING_CAPTION_NOTE,
    CaptionError,
    Captions,
    missing_captions_warning,
    read_captions,
    token_warnings,
)
from harness.data.dedupe import DuplicateIndex, perceptual_hash
from harness.data.errors import DataError, Rejection
from harness.data.files import display_path, resolve_path, sha256_file, write_json
from harness.data.identifier import IdentifierContext, resolve_token
from harness.data.ingest import SUPPORTED_SUFFIXES, DecodeError, decode_image, fmt_exc, parse_color
from harness.data.source import (
    SubjectSource,
    ensure_folder,
    entry_problem,
    list_entries,
    printable_name,
    resolve_source,
)
from harness.data.split import assign_splits, reference_members
from harness.data.transform import (
    TooSmallError,
    crop_box,
    encode_png,
    output_size,
    resize,
    size_check,
)

__all__ = [
    "MANIFEST",
    "REJECTS_JSON",
    "REJECTS_TXT",
    "SCHEMA_VERSION",
    "PrepareResult",
    "prepare_subject",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REJECTS_JSON = "rejects.json"
REJECTS_TXT = "rejects.txt"
_SUPPORTED = ", ".join(sorted(SUPPORTED_SUFFIXES))


@dataclass(frozen=True)
class PrepareResult:
    """What a successful run wrote, with counts."""

    subject: str
    out_dir: Path
    manifest_path: Path
    rejects_path: Path
    n_found: int
    n_train: int
    n_val: int
    n_reference: int
    n_rejected: int
    warnings: tuple[str, ...]
    token: str = ""  # the identifier in the captions (data.token: auto: the chosen one)
    token_choice: dict[str, Any] | None = None  # how data.token: auto chose it


@dataclass(frozen=True)
class _Photo:
    """One accepted photo, processed and encoded, before it gets a split and a file name."""

    name: str
    record: dict[str, Any]
    sha256: str
    png: bytes


class _Skip(Exception):
    """A duplicate: the message is the rejection reason."""


def prepare_subject(
    cfg: DataConfig,
    root: Path,
    *,
    progress: bool = True,
    identifier: IdentifierContext | None = None,
) -> PrepareResult:
    """Prepare the configured subject under ``<root>/<prepared_dir>/<subject>/``.

    Args:
        cfg: the data section of the harness config.
        root: project root; relative config paths are relative to it.
        progress: show a progress bar on stderr.
        identifier: the tokenizer and words ``data.token: auto`` chooses with (default: the
            offline CLIP BPE, no other words); the choice is in ``manifest.json``.

    Raises:
        DataError: the folder is missing, fewer than ``min_images`` usable photos remain, or
            the split leaves no training/reference photo. The rejection report is written first.
    """
    root = root.resolve()
    out_dir = resolve_path(cfg.prepared_dir, root) / cfg.subject
    rejects: list[Rejection] = []
    label = cfg.subject
    try:
        src = resolve_source(cfg, root)
        label = src.label
        ensure_folder(src, cfg)
        for message in src.warnings:
            log.warning("%s", message)
        cfg, choice = resolve_token(cfg, src.class_name, src.prompts, identifier)
        notes = [*src.warnings, *token_warnings(cfg.token, src.class_name)]
        photos, n_found = _collect(cfg, src, rejects, progress)
        notes += _caption_warnings(photos)
        if len(photos) < cfg.min_images:
            raise DataError(
                f"{label}: {len(photos)} usable photo(s) of {n_found} found "
                f"({_rejected_counts(n_found - len(photos), len(rejects))}); need at least "
                f"min_images={cfg.min_images}. See {display_path(out_dir / REJECTS_TXT, root)}"
            )
        splits = assign_splits(
            [(p.name, p.sha256) for p in photos], cfg.val_fraction, cfg.split_seed, label
        )
        refs = reference_members(splits, cfg.reference, label)
    except DataError as exc:
        _write_failure(out_dir, label, rejects, str(exc))
        raise
    manifest = _manifest(cfg, src, photos, splits, refs, notes, rejects, n_found)
    if choice is not None:  # only then: other manifests stay byte-identical
        manifest["token_choice"] = choice.record()
    _write_outputs(
        out_dir, photos, manifest, _rejects_doc(label, rejects, None, manifest["warnings"])
    )
    return _result(out_dir, manifest, n_found)


def _rejected_counts(photos: int, rejections: int) -> str:
    """``2 rejected``, and the folder's other rejected entries (symlinks leaving the dataset,
    unsupported files, caption lines), which were never among the photos found."""
    others = rejections - photos
    if others <= 0:
        return f"{photos} rejected"
    entries = "entry" if others == 1 else "entries"
    return f"{photos} rejected; {others} other {entries} rejected too"


def _result(out_dir: Path, manifest: dict[str, Any], n_found: int) -> PrepareResult:
    """What :func:`prepare_subject` returns, from the manifest it wrote."""
    counts = manifest["counts"]
    return PrepareResult(
        subject=manifest["subject"],
        out_dir=out_dir,
        manifest_path=out_dir / MANIFEST,
        rejects_path=out_dir / REJECTS_JSON,
        n_found=n_found,
        n_train=counts["train"],
        n_val=counts["val"],
        n_reference=counts["reference"],
        n_rejected=counts["rejected"],
        warnings=tuple(manifest["warnings"]),
        token=manifest["token"],
        token_choice=manifest.get("token_choice"),
    )


# ------------------------------------------------------------------------------------------
# Reading and processing
# ------------------------------------------------------------------------------------------


def _classify(src: SubjectSource, rejects: list[Rejection]) -> tuple[list[Path], list[Path]]:
    """Split the folder's entries into photos and ``.txt`` caption files; report the rest."""
    images: list[Path] = []
    texts: list[Path] = []
    for entry in list_entries(src.folder):
        problem = entry_problem(entry, src.allowed_roots)
        suffix = entry.suffix.lower()
        if problem is None and entry.is_dir():
            problem = "sub-folder ignored: photos must sit directly in the subject folder"
        elif problem is None and not entry.is_file():
            problem = "not a regular file"
        elif problem is None and suffix not in SUPPORTED_SUFFIXES | {".txt"}:
            problem = f"unsupported file type {suffix or '(no suffix)'!r} (supported: {_SUPPORTED})"
        if problem is not None:
            rejects.append(Rejection(printable_name(entry), problem))
        else:
            (texts if suffix == ".txt" else images).append(entry)
    return images, texts


def _collect(
    cfg: DataConfig, src: SubjectSource, rejects: list[Rejection], progress: bool
) -> tuple[list[_Photo], int]:
    """Process every photo of the subject; returns the accepted ones and the number found."""
    images, texts = _classify(src, rejects)
    captions, caption_rejects = read_captions(
        src.folder, [p.name for p in images], [t.name for t in texts]
    )
    rejects.extend(caption_rejects)
    if not images:
        rejects.append(Rejection(".", f"no photos in the subject folder (supported: {_SUPPORTED})"))
    index = DuplicateIndex.create(cfg.dedupe_threshold)
    photos = []
    for path in _progress(images, f"prepare {src.subject}", progress):
        try:
            photos.append(_process(path, cfg, src, captions, index))
        except (DecodeError, TooSmallError, CaptionError, _Skip) as exc:
            rejects.append(Rejection(path.name, str(exc)))
        except OSError as exc:  # unreadable file (permissions, I/O error)
            rejects.append(Rejection(path.name, f"unreadable ({fmt_exc(exc)})"))
    return photos, len(images)


def _caption_warnings(photos: list[_Photo]) -> list[str]:
    """One warning naming every kept photo captioned by the template for lack of a caption."""
    names = [p.name for p in photos if MISSING_CAPTION_NOTE in p.record["notes"]]
    if not names:
        return []
    message = missing_captions_warning(names)
    log.warning("%s", message)
    return [message]


def _progress(items: list[Path], description: str, enabled: bool) -> Iterator[Path]:
    shown: Iterable[Path] = track(
        items,
        description=description,
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )
    yield from shown


def _process(
    path: Path, cfg: DataConfig, src: SubjectSource, captions: Captions, index: DuplicateIndex
) -> _Photo:
    """Decode, check, caption, dedupe, crop and encode one photo (raises a rejection reason)."""
    sha = sha256_file(path)
    if (reason := index.exact(sha)) is not None:
        raise _Skip(reason)
    decoded = decode_image(
        path,
        max_pixels=cfg.max_image_pixels,
        background=parse_color(cfg.background),
        grayscale=cfg.grayscale,
    )
    notes = list(decoded.notes)
    size_note = size_check(decoded.image.size, cfg.min_side, cfg.upscale_small)
    caption, caption_source = captions.caption_for(
        path.name, cfg.caption_template, cfg.token, src.class_name, cfg.missing_caption
    )
    if captions.missing([path.name]):
        notes.append(MISSING_CAPTION_NOTE)
    phash = perceptual_hash(decoded.image)
    if (reason := index.near(phash)) is not None:
        raise _Skip(reason)
    index.add(path.name, sha, phash)
    box = crop_box(decoded.image.size, cfg.crop)
    size = output_size(box, cfg.resolution)
    if size_note is None and min(box[2] - box[0], box[3] - box[1]) < cfg.resolution:
        size_note = f"upscaled: shorter side below resolution {cfg.resolution}"
    if size_note is not None:
        log.warning("%s/%s: %s", src.label, path.name, size_note)
        notes.append(size_note)
    record: dict[str, Any] = {
        "source": path.name,
        "sha256": sha,
        "bytes": path.stat().st_size,
        "format": decoded.format,
        "mode": decoded.mode,
        "original_size": list(decoded.original_size),
        "orientation": decoded.orientation,
        "upright_size": list(decoded.image.size),
        "crop_box": list(box),
        "size": list(size),
        "caption": caption,
        "caption_source": caption_source,
        "phash": str(phash),
        "notes": notes,
    }
    return _Photo(path.name, record, sha, encode_png(resize(decoded.image, box, size)))


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def _output_names(names: list[str]) -> dict[str, str]:
    """PNG file name per source name: ``<stem>.png``, disambiguated when stems collide."""
    taken: set[str] = set()
    out: dict[str, str] = {}
    for name in sorted(names):
        stem, suffix = Path(name).stem, Path(name).suffix.lstrip(".").lower()
        candidates = [
            stem,
            f"{stem}_{suffix}",
            *(f"{stem}_{suffix}_{i}" for i in range(2, len(names) + 2)),
        ]
        chosen = next(
            c for c in candidates if c.lower() not in taken
        )  # case-insensitive file systems
        taken.add(chosen.lower())
        out[name] = f"{chosen}.png"
    return out


def _manifest(
    cfg: DataConfig,
    src: SubjectSource,
    photos: list[_Photo],
    splits: Mapping[str, str],
    refs: set[str],
    notes: list[str],
    rejects: list[Rejection],
    n_found: int,
) -> dict[str, Any]:
    """The prepared set's ``manifest.json``: source, settings, counts, splits and images."""
    images = _image_records(photos, splits, refs)
    by_split = {s: [r["file"] for r in images if r["split"] == s] for s in ("train", "val")}
    return {
        "schema_version": SCHEMA_VERSION,
        "subject": cfg.subject,
        "source": {"kind": src.kind, "folder": src.label},
        "token": cfg.token,
        "class_name": src.class_name,
        "live_subject": src.live,
        "prompts": list(src.prompts),
        "settings": _settings_record(cfg),
        "counts": {
            "found": n_found,
            "kept": len(images),
            "train": len(by_split["train"]),
            "val": len(by_split["val"]),
            "reference": sum(1 for r in images if r["reference"]),
            "rejected": len(rejects),
        },
        "train": by_split["train"],
        "val": by_split["val"],
        "reference": [r["file"] for r in images if r["reference"]],
        "images": images,
        "warnings": sorted(notes),
        "software": {"pillow": PIL.__version__},
    }


def _image_records(
    photos: list[_Photo], splits: Mapping[str, str], refs: set[str]
) -> list[dict[str, Any]]:
    """The manifest's per-image records with output file, split and reference flag, by file."""
    names = _output_names([p.name for p in photos])
    images = []
    for photo in photos:
        split = splits[photo.name]
        images.append(
            {
                **photo.record,
                "file": f"{split}/{names[photo.name]}",
                "split": split,
                "reference": photo.name in refs,
            }
        )
    images.sort(key=lambda rec: rec["file"])
    return images


def _settings_record(cfg: DataConfig) -> dict[str, Any]:
    """The data settings the prepared set depends on (the manifest's ``settings``)."""
    return {
        "caption_template": cfg.caption_template,
        "resolution": cfg.resolution,
        "min_side": cfg.min_side,
        "upscale_small": cfg.upscale_small,
        "crop": cfg.crop,
        "background": cfg.background,
        "grayscale": cfg.grayscale,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "dedupe_threshold": cfg.dedupe_threshold,
        "reference": cfg.reference,
        "max_image_pixels": cfg.max_image_pixels,
    }


def _rejects_doc(
    label: str, rejects: list[Rejection], error: str | None, warnings: list[str] | None = None
) -> dict[str, Any]:
    return {
        "folder": label,
        "rejected": [r.to_dict() for r in sorted(rejects)],
        "error": error,
        "warnings": list(warnings or []),
    }


def _write_rejects(out_dir: Path, doc: dict[str, Any]) -> None:
    write_json(out_dir / REJECTS_JSON, doc)
    lines = [f"# {len(doc['rejected'])} input(s) not used from {doc['folder']}"]
    if doc["error"]:
        lines.append(f"# FAILED: {doc['error']}")
    lines += [f"# warning: {w}" for w in doc["warnings"]]
    lines += [f"{r['file']}: {r['reason']}" for r in doc["rejected"]]
    (out_dir / REJECTS_TXT).write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _write_outputs(
    out_dir: Path, photos: list[_Photo], manifest: dict[str, Any], rejects: dict[str, Any]
) -> None:
    """Write into a staging folder, then swap it in: a crash never leaves a half-written set."""
    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    _remove(staging)
    try:
        for split in ("train", "val"):
            (staging / split).mkdir(parents=True)
        by_source = {rec["source"]: rec["file"] for rec in manifest["images"]}
        for photo in photos:
            (staging / by_source[photo.name]).write_bytes(photo.png)
        write_json(staging / MANIFEST, manifest)
        _write_rejects(staging, rejects)
    except BaseException:
        # A failed write (a full disk, a name no file system takes) leaves no hidden
        # half-written folder beside the previous set, which stays as it was.
        _remove(staging)
        raise
    _remove(out_dir)
    staging.rename(out_dir)


def _write_failure(out_dir: Path, label: str, rejects: list[Rejection], error: str) -> None:
    """On failure: drop the previous outputs (no stale manifest) and write only the report."""
    _remove(out_dir)
    out_dir.mkdir(parents=True)
    _write_rejects(out_dir, _rejects_doc(label, rejects, error))
    log.error("%s", error)
