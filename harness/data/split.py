"""Deterministic train/validation split and the real reference set for the metrics.

The split ranks photos by ``sha256(f"{split_seed}:{content sha256}")``: it depends only on the
photos' bytes and the seed, not on file names, listing order, the platform or Python's RNG, and
adding a photo never moves the others between splits except by the count rule. The number of
validation photos is :func:`harness.config.validation_count` (round-half-up of
``n * val_fraction``, at least one when ``val_fraction > 0``).

Few photos (DreamBench has 4-6 per subject): with the default ``val_fraction=0.2`` one photo is
held out. Training uses the ``train`` split only, always. The real reference set for the
DINO / CLIP-I metrics is chosen by ``data.reference``:

* ``all`` (default): every kept photo, train and validation. This is the DreamBooth paper's
  protocol (generated images are compared with all real photos of the subject), so numbers are
  comparable with published ones; it rewards copying the training photos.
* ``val``: the held-out photos only; an honest generalisation check, but with one or two photos
  the score has a large variance.

For numbers comparable with the paper (which trains on every photo) use ``val_fraction: 0`` and
``reference: all``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from harness.config import validation_count
from harness.data.errors import DataError

__all__ = ["Split", "assign_splits", "reference_members", "split_key"]

Split = Literal["train", "val"]


def split_key(sha256: str, seed: int) -> str:
    """Rank of a photo in the split order: a hash of the seed and the photo's content hash."""
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def assign_splits(
    items: Sequence[tuple[str, str]], val_fraction: float, seed: int, label: str
) -> dict[str, Split]:
    """Map each ``(name, sha256)`` to ``train`` or ``val``.

    Raises:
        DataError: naming ``label`` when the split would leave no training photo.
    """
    n_val = validation_count(len(items), val_fraction)
    if len(items) - n_val < 1:
        raise DataError(
            f"{label}: val_fraction={val_fraction} puts all {len(items)} usable photo(s) in "
            "validation; lower data.val_fraction"
        )
    ranked = sorted(items, key=lambda item: (split_key(item[1], seed), item[0]))
    return {name: ("val" if i < n_val else "train") for i, (name, _) in enumerate(ranked)}


def reference_members(
    splits: dict[str, Split], reference: Literal["all", "val"], label: str
) -> set[str]:
    """Names of the photos forming the real reference set for the metrics.

    Raises:
        DataError: when ``reference='val'`` and no photo is held out.
    """
    if reference == "all":
        return set(splits)
    chosen = {name for name, split in splits.items() if split == "val"}
    if not chosen:
        raise DataError(
            f"{label}: data.reference='val' but no photo is held out (val_fraction=0); "
            "set val_fraction > 0 or reference: all"
        )
    return chosen
