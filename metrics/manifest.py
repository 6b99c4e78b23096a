"""Prompts files: which prompt produced which generated image.

Two formats, detected per line (blank lines and lines starting with ``#`` are skipped):

* JSONL, the manifest the harness's generator writes: ``{"file": "img_000.png", "prompt":
  "a sks dog on the beach", ...}``; ``file`` is relative to the generated folder and any
  other keys are ignored.
* Text: ``img_000.png<TAB>a sks dog on the beach``.

The prompts file must match the generated folder exactly: every listed file exists and is an
image, no file is listed twice, and no image in the folder lacks a prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from metrics.errors import MetricsInputError
from metrics.images import check_image_file, list_image_files

__all__ = ["match_prompts", "read_prompts_file"]


def read_prompts_file(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(file, prompt)`` pairs in file order.

    Raises:
        MetricsInputError: unreadable file, malformed line, or no entries; the message names
            the file and line.
    """
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsInputError(f"cannot read prompts file {source}: {exc}") from None
    entries: list[tuple[str, str]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MetricsInputError(f"{where}: invalid JSON ({exc.msg})") from None
            file, prompt = record.get("file"), record.get("prompt")
            if not isinstance(file, str) or not file or not isinstance(prompt, str):
                raise MetricsInputError(f'{where}: needs string keys "file" and "prompt"')
        elif "\t" in raw:
            file, prompt = (part.strip() for part in raw.split("\t", 1))
            if not file:
                raise MetricsInputError(f"{where}: empty file name")
        else:
            raise MetricsInputError(
                f'{where}: expected a JSON object with "file" and "prompt" or "file<TAB>prompt"'
            )
        entries.append((file, prompt))
    if not entries:
        raise MetricsInputError(f"no prompts in prompts file {source}")
    return entries


def match_prompts(
    generated_dir: str | os.PathLike[str], prompts_file: str | os.PathLike[str]
) -> tuple[list[Path], list[str]]:
    """Generated image paths and their prompts, sorted by path.

    Raises:
        MetricsInputError: naming the offending file: a listed image is missing or listed twice,
            or an image in the folder has no prompt (also: an empty folder, a non-image file).
    """
    folder = Path(generated_dir)
    source = Path(prompts_file)
    # Also rejects non-image files; images may all sit in listed sub-folders.
    on_disk = list_image_files(folder, exclude=[source], allow_empty=True)
    # Keyed by resolved path so "a.png" and "./a.png" are the same file.
    entries: dict[Path, tuple[Path, str]] = {}
    for file, prompt in read_prompts_file(source):
        path = folder / file
        key = path.resolve()
        if key in entries:
            raise MetricsInputError(f"{source}: image listed twice: {path}")
        if not path.is_file():
            raise MetricsInputError(f"{source}: listed image not found: {path}")
        entries[key] = (path, prompt)
    listed = {p.resolve() for p in on_disk}
    for path in on_disk:
        if path.resolve() not in entries:
            raise MetricsInputError(f"image has no prompt in {source}: {path}")
    for key, (path, _) in entries.items():
        if key not in listed:  # a file in a sub-folder: allowed when listed, still checked
            check_image_file(path)
    ordered = sorted(entries.values(), key=lambda entry: str(entry[0]))
    return [path for path, _ in ordered], [prompt for _, prompt in ordered]
