"""Exact and near-duplicate detection.

Exact duplicates share a sha256 of the file bytes (checked before decoding, cheaply). Near
duplicates (a re-encode, a resized copy, the same photo with an EXIF rotation) are found with a
64-bit perceptual hash (pHash, DCT of a 32x32 grayscale) of the *upright* photo: two photos
whose hashes differ in at most ``dedupe_threshold`` bits are the same picture. The first photo in
file-name order is kept, so the choice is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import imagehash
from PIL import Image

__all__ = ["DuplicateIndex", "perceptual_hash"]


def perceptual_hash(im: Image.Image) -> imagehash.ImageHash:
    """64-bit pHash of an image (grayscale DCT; robust to re-encoding and resizing)."""
    return imagehash.phash(im, hash_size=8)


@dataclass
class DuplicateIndex:
    """Hashes of the photos kept so far; answers "is this one a duplicate, and of which?"."""

    threshold: int
    _sha: dict[str, str]
    _phash: list[tuple[str, imagehash.ImageHash]]

    @classmethod
    def create(cls, threshold: int) -> DuplicateIndex:
        """An empty index for the given maximum Hamming distance."""
        return cls(threshold, {}, [])

    def exact(self, sha256: str) -> str | None:
        """Reason when a kept photo has the same bytes, else None."""
        first = self._sha.get(sha256)
        return None if first is None else f"exact duplicate of {first} (same sha256)"

    def near(self, phash: imagehash.ImageHash) -> str | None:
        """Reason when a kept photo is within ``threshold`` bits, else None (closest reported)."""
        best: tuple[int, str] | None = None
        for name, other in self._phash:
            distance = int(phash - other)
            if distance <= self.threshold and (best is None or distance < best[0]):
                best = (distance, name)
        if best is None:
            return None
        return (
            f"near-duplicate of {best[1]} (perceptual-hash distance {best[0]} "
            f"<= dedupe_threshold {self.threshold})"
        )

    def add(self, name: str, sha256: str, phash: imagehash.ImageHash) -> None:
        """Record a kept photo."""
        self._sha.setdefault(sha256, name)
        self._phash.append((name, phash))
