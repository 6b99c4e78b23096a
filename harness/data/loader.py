"""Reading a prepared subject back, for the trainer and the metrics."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.data.errors import DataError

if TYPE_CHECKING:
    from harness.config import HarnessConfig

__all__ = [
    "PreparedImage",
    "PreparedSubject",
    "load_prepared",
    "photos_fingerprint",
    "prepared_fingerprint",
    "with_subject",
]

_SCHEMA_VERSION = 1  # must match harness.data.prepare.SCHEMA_VERSION


@dataclass(frozen=True)
class PreparedImage:
    """One prepared photo."""

    path: Path
    caption: str
    split: str
    reference: bool


@dataclass(frozen=True)
class PreparedSubject:
    """A prepared subject: what to train on and what the metrics compare against."""

    subject: str
    token: str
    class_name: str | None
    root: Path
    train: tuple[PreparedImage, ...]
    val: tuple[PreparedImage, ...]
    reference: tuple[Path, ...]
    prompts: tuple[str, ...]
    manifest: dict[str, Any]

    @property
    def train_paths(self) -> list[Path]:
        """Training image paths, in manifest order."""
        return [img.path for img in self.train]

    @property
    def train_captions(self) -> list[str]:
        """Training captions, aligned with :attr:`train_paths`."""
        return [img.caption for img in self.train]

    @property
    def fingerprint(self) -> str:
        """What the photos are (see :func:`photos_fingerprint`)."""
        return photos_fingerprint(self.manifest)


def photos_fingerprint(manifest: Mapping[str, Any]) -> str:
    """16 hex digits that change when what a run trains on or is scored against changes: each
    photo's bytes (the source file's sha256), split, reference flag, caption and crop, the
    prompts, the class noun and the token. Settings are not in it (they are in the config)."""
    photos = sorted(
        (
            str(rec["sha256"]),
            str(rec["split"]),
            bool(rec["reference"]),
            str(rec["caption"]),
            list(rec.get("crop_box") or []),
        )
        for rec in manifest.get("images", [])
    )
    payload = {
        "photos": photos,
        "prompts": list(manifest.get("prompts", [])),
        "class_name": manifest.get("class_name"),
        "token": manifest.get("token"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def prepared_fingerprint(prepared_subject_dir: Path) -> str | None:
    """:func:`photos_fingerprint` of a prepared subject's manifest; ``None`` when there is no
    readable manifest (nothing prepared yet: whatever needs the photos fails on its own)."""
    try:
        manifest = json.loads((Path(prepared_subject_dir) / "manifest.json").read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return photos_fingerprint(manifest) if isinstance(manifest, dict) else None


def load_prepared(prepared_subject_dir: Path) -> PreparedSubject:
    """Load ``<prepared_dir>/<subject>/manifest.json`` and check that its images exist.

    Raises:
        DataError: naming the folder when the manifest is missing (e.g. the last prepare
            failed; see rejects.txt), malformed, of another schema, or names a missing image.
    """
    folder = Path(prepared_subject_dir)
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{folder}: no manifest.json; run the prepare stage (if it failed, see rejects.txt)"
        ) from None
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError included
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    try:
        return _parse_manifest(folder, path, manifest)
    except (KeyError, TypeError, AttributeError) as exc:  # a hand edit into another shape
        raise DataError(
            f"{path}: malformed manifest ({type(exc).__name__}: {exc}); rerun prepare"
        ) from None


def _parse_manifest(folder: Path, path: Path, manifest: Any) -> PreparedSubject:
    if manifest.get("schema_version") != _SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {manifest.get('schema_version')!r}, expected {_SCHEMA_VERSION}"
        )
    images = []
    for rec in manifest["images"]:
        image_path = folder / rec["file"]
        if not image_path.is_file():
            raise DataError(f"{path}: lists {rec['file']}, which is missing; rerun prepare")
        images.append(
            PreparedImage(image_path, rec["caption"], rec["split"], bool(rec["reference"]))
        )
    if manifest.get("token") == "auto":  # cannot happen since prepare resolves it; be sure
        raise DataError(f"{path}: token 'auto' was never resolved; rerun prepare")
    return PreparedSubject(
        subject=manifest["subject"],
        token=manifest["token"],
        class_name=manifest["class_name"],
        root=folder,
        train=tuple(i for i in images if i.split == "train"),
        val=tuple(i for i in images if i.split == "val"),
        reference=tuple(i.path for i in images if i.reference),
        prompts=tuple(manifest.get("prompts", [])),
        manifest=manifest,
    )


def with_subject(cfg: HarnessConfig, subject: PreparedSubject) -> HarnessConfig:
    """``cfg`` with ``data.class_name`` set to the prepared subject's class noun and, for
    ``data.token: auto``, ``data.token`` to the token the prepare stage chose.

    The prepared subject is the truth about its class (for DreamBench, the dataset's
    ``prompts_and_classes.txt``, which wins over a preset's ``data.class_name``) and about an
    automatically chosen identifier. Everything after ``prepare`` (the prior-preservation
    class prompt, training, the sweep, generation) must use this config. Returns ``cfg``
    itself when nothing changes; ``cfg`` is never modified (the config models are frozen).
    """
    from harness.data.identifier import AUTO

    update: dict[str, Any] = {}
    if subject.class_name is not None and subject.class_name != cfg.data.class_name:
        update["class_name"] = subject.class_name
    if cfg.data.token == AUTO:
        update["token"] = subject.token
    if not update:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})
