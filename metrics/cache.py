"""Embedding cache: one safetensors file per (encoder, image content).

A sweep scores hundreds of generated sets against the same few real photos; their embeddings
are computed once and then read back. The key is the sha256 of the image file's bytes (of the
upright RGB pixels the encoder sees, for an in-memory image) plus the encoder id (weights,
preprocessing and precision), so an edited photo or another model never hits a stale entry. Files are safetensors (never pickle) and are written atomically, so
parallel sweep workers can share one cache folder. The cache is only an optimisation: a
folder that cannot be written (read-only home, a path under a file, a full disk) logs one
warning and scoring goes on without storing embeddings.

Layout: ``<root>/<sha256(encoder_id)[:16]>/<image_sha256>.safetensors``, each holding the
tensor ``embedding`` (``[D]``, float32) and the metadata ``encoder_id`` and ``image_sha256``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from metrics.images import ImageInput, image_sha256

__all__ = ["DEFAULT_CACHE_DIR", "EmbeddingCache", "default_cache_dir", "encode_cached"]

DEFAULT_CACHE_DIR = "~/.cache/harness-metrics"

_LOG = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$METRICS_CACHE_DIR`` if set, else ``~/.cache/harness-metrics``."""
    return Path(os.environ.get("METRICS_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


class EmbeddingCache:
    """Content-addressed store of image embeddings under ``root``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        # Set by the first failed write: later writes would fail the same way, so they are
        # skipped and the user is warned once, not once per image.
        self._writes_failed = False

    def path(self, encoder_id: str, image_hash: str) -> Path:
        """The file that holds (or would hold) this embedding."""
        encoder_dir = hashlib.sha256(encoder_id.encode()).hexdigest()[:16]
        return self.root / encoder_dir / f"{image_hash}.safetensors"

    def get(self, encoder_id: str, image_hash: str) -> torch.Tensor | None:
        """The cached ``[D]`` embedding, or ``None`` when missing or unreadable."""
        path = self.path(encoder_id, image_hash)
        try:
            if not path.is_file():  # PermissionError on an unreadable folder: a miss
                return None
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("encoder_id") != encoder_id:
                return None  # a (vanishingly unlikely) directory-name collision
            return load_file(str(path))["embedding"]
        except (SafetensorError, OSError, KeyError):
            return None  # a damaged entry is recomputed and overwritten, not fatal

    def put(self, encoder_id: str, image_hash: str, embedding: torch.Tensor) -> None:
        """Store one ``[D]`` embedding (atomic: write a temp file, then rename).

        A write that fails (:class:`OSError`, or safetensors' I/O error) logs one warning and
        turns writing off for this cache: the caller keeps its embedding, only unstored.
        """
        if self._writes_failed:
            return
        try:
            self._write(encoder_id, image_hash, embedding)
        except (OSError, SafetensorError) as exc:
            self._writes_failed = True
            _LOG.warning(
                "embedding cache %s cannot be written (%s); scoring goes on without caching",
                self.root,
                exc,
            )

    def _write(self, encoder_id: str, image_hash: str, embedding: torch.Tensor) -> None:
        """Write one entry atomically; raises on any I/O failure (handled by :meth:`put`)."""
        path = self.path(encoder_id, image_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                {"embedding": embedding.detach().to("cpu", torch.float32).contiguous()},
                tmp_name,
                metadata={"encoder_id": encoder_id, "image_sha256": image_hash},
            )
            Path(tmp_name).replace(path)
        finally:
            Path(tmp_name).unlink(missing_ok=True)


def encode_cached(
    encode: Callable[[Sequence[ImageInput]], torch.Tensor],
    encoder_id: str,
    images: Sequence[ImageInput],
    cache: EmbeddingCache,
) -> torch.Tensor:
    """Embeddings ``[N, D]`` of ``images`` in input order, encoding only the cache misses.

    ``encode`` is called at most once, with the images whose content is not cached yet (each
    distinct content once), and not at all when every image is cached.
    """
    hashes = [image_sha256(image) for image in images]
    found: dict[str, torch.Tensor] = {}
    for image_hash in dict.fromkeys(hashes):
        cached = cache.get(encoder_id, image_hash)
        if cached is not None:
            found[image_hash] = cached
    missing: dict[str, ImageInput] = {}
    for image, image_hash in zip(images, hashes, strict=True):
        if image_hash not in found:
            missing.setdefault(image_hash, image)
    if missing:
        fresh = encode(list(missing.values())).to("cpu", torch.float32)
        for image_hash, embedding in zip(missing, fresh, strict=True):
            cache.put(encoder_id, image_hash, embedding)
            found[image_hash] = embedding
    return torch.stack([found[image_hash] for image_hash in hashes])
