"""Which weights a model reference stands for, read from disk without loading them.

``model.pretrained`` names weights that can change under the same name: a hub repository's
``main`` moves to a new commit, a local checkpoint is replaced by a retrained one, a tiny
model is built anew by other code. A sweep study keeps its points across such changes (it
resumes by configuration), so it stores the identity of the weights it was started with and
refuses a worker that would add points made with others (:mod:`harness.sweep.environment`).

The identity is a small mapping of strings:

* a hub model: the commit its cached snapshot is (``commit``), as loaded; with a full commit
  hash as ``model.revision``, that hash;
* a local folder, a single file, a tiny model: a digest of its files (``weights``). Files up to
  :data:`FULL_HASH_BYTES` are hashed whole; larger ones (the weights of a real model, gigabytes)
  by their size and :data:`SAMPLES` blocks spread over them. A retrained or other checkpoint
  changes nearly every block; a few edited bytes may not be seen. Reading a few megabytes
  keeps the check to milliseconds where hashing all of SDXL would take seconds per worker;
* ``random://sd15``: nothing to identify (random weights, for speed measurements).

``model.single_file_config``, which supplies a single file's scheduler and tokenizer, is
identified too (``config_commit`` or ``config_weights``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from harness.config import ModelConfig

__all__ = ["FULL_HASH_BYTES", "SAMPLES", "file_digest", "identity_change", "model_identity"]

FULL_HASH_BYTES = 4 << 20
SAMPLES = 32
_BLOCK = 64 << 10
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
UNKNOWN = "unknown"
# The keys that say which weights: compared between a study and a worker. ``model`` (the
# reference as written) is kept for messages only: a local path differs between machines.
IDENTITY_KEYS = ("commit", "weights", "config_commit", "config_weights")


def _digest_into(digest: hashlib._Hash, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\0".encode())
    with path.open("rb") as handle:
        if size <= FULL_HASH_BYTES:
            digest.update(handle.read())
            return
        # The header (safetensors: every tensor's name, dtype and place), then blocks spread
        # evenly up to the end.
        digest.update(handle.read(_BLOCK))
        for k in range(1, SAMPLES + 1):
            handle.seek((size - _BLOCK) * k // SAMPLES)
            digest.update(handle.read(_BLOCK))


def file_digest(paths: Iterable[Path], base: Path | None = None) -> str:
    """A sha256 hex digest of the files' names (relative to ``base``), sizes and contents
    (whole up to :data:`FULL_HASH_BYTES`, sampled above), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = path.relative_to(base) if base is not None else Path(path.name)
        digest.update(f"{name.as_posix()}\0".encode())
        _digest_into(digest, path)
    return digest.hexdigest()


def _folder_digest(folder: Path) -> str:
    """:func:`file_digest` of every file in ``folder``, hidden ones (``.cache``) left out."""
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return file_digest(files, folder)


def _hub_commit(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    """The commit of ``repo_id``'s cached snapshot at ``revision``, as a load from the cache
    uses it (``unknown``: not downloaded)."""
    if revision and _COMMIT.match(revision):
        return revision
    from harness.models import _hub_snapshot

    snapshot = _hub_snapshot(repo_id, revision, cache_dir)
    return snapshot.name if snapshot is not None else UNKNOWN


def _source_identity(value: str, cfg: ModelConfig, prefix: str = "") -> dict[str, str]:
    path = Path(value)
    if path.is_dir():
        return {f"{prefix}weights": _folder_digest(path)}
    if path.is_file():
        return {f"{prefix}weights": file_digest([path])}
    revision = cfg.revision if not prefix else None
    return {f"{prefix}commit": _hub_commit(value, revision, cfg.cache_dir)}


def model_identity(
    cfg: ModelConfig, root: Path | None = None, cache_root: Path | None = None
) -> dict[str, str]:
    """The identity of the weights ``cfg`` names, as they are on disk now (see the module).

    Call it after :func:`harness.models.load_pipeline`: a hub model is then in the cache and a
    tiny one built. Raises what :func:`harness.models.parse_model_ref` raises.
    """
    from harness.models import _config_source, parse_model_ref
    from harness.models.tiny import tiny_pipeline_dir

    ref = parse_model_ref(cfg.pretrained, root)
    identity = {"model": cfg.pretrained}
    if ref.kind == "tiny":
        folder = tiny_pipeline_dir(ref.value, cache_root)  # type: ignore[arg-type]
        identity["weights"] = _folder_digest(folder)
    elif ref.kind in ("local_dir", "single_file", "hub"):
        identity.update(_source_identity(ref.value, cfg))
    config = _config_source(cfg, root) if ref.kind == "single_file" else None
    if config is not None:
        identity.update(_source_identity(config, cfg, prefix="config_"))
    return identity


def identity_change(stored: Mapping[str, str], mine: Mapping[str, str]) -> str | None:
    """``"commit 1a2b3c4d5e6f (the study's: 9f8e7d6c5b4a)"``-style text for each identity key
    whose value differs (None: the same weights). A key only one side has, or an unknown
    value, is not compared: an older harness stored none, an undownloaded model has none."""
    found = [
        f"{key} {mine[key][:12]} (the study's: {stored[key][:12]})"
        for key in IDENTITY_KEYS
        if key in stored
        and key in mine
        and UNKNOWN not in (stored[key], mine[key])
        and stored[key] != mine[key]
    ]
    return ", ".join(found) or None
