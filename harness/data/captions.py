"""Captions: ``captions.txt``, sidecar ``<image>.txt`` files, or the instance-prompt template.

Policy (documented in the README section of the data stage):

* No caption files at all: every photo gets ``caption_template`` (default
  ``a photo of {token} {class_name}``), the DreamBooth instance prompt.
* Caption files present (``captions.txt`` or any sidecar) but a photo has none: by default
  (``data.missing_caption: template``, kohya's behaviour) it gets ``caption_template`` and the
  prepare stage warns, naming every such photo; with ``missing_caption: reject`` it is
  *rejected* ("missing caption") rather than mixed with template ones.
* ``captions.txt`` lines: ``<file name><TAB><caption>`` or ``<file name>: <caption>``; blank
  lines and ``#`` comments are skipped. Entries name files directly in the subject folder; an
  absolute path, a ``..`` segment or a sub-folder is rejected (never resolved).
* A sidecar ``00.txt`` or ``00.jpg.txt`` next to ``00.jpg`` overrides a ``captions.txt`` entry.
* ``{token}`` and ``{class_name}`` inside captions are substituted. The identifier token must
  appear in every caption as a word (case-insensitive, as CLIP lower-cases); otherwise the photo
  is rejected.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from harness.data.errors import Rejection

__all__ = [
    "CAPTIONS_FILE",
    "MISSING_CAPTION_NOTE",
    "CaptionError",
    "Captions",
    "check_entry_name",
    "has_token",
    "missing_captions_warning",
    "read_captions",
    "render",
    "token_warnings",
]

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.txt"
#: More CLIP BPE pieces than this and the identifier is "split into many pieces".
MAX_TOKEN_PIECES = 2
#: A single whole-word BPE piece merged this early is a frequent word with a strong prior.
#: CLIP's merges are ordered by corpus frequency: 'dog' is 1929, 'zebra' 22548, 'sks' 48136.
COMMON_WORD_MAX_ID = 40_000
#: The manifest note of a photo captioned by the template because its caption was missing.
MISSING_CAPTION_NOTE = (
    f"no caption in {CAPTIONS_FILE} or a sidecar .txt: captioned with data.caption_template"
)


class CaptionError(Exception):
    """A photo's caption is missing or unusable; the message is the rejection reason."""


@dataclass
class Captions:
    """Captions found in a subject folder; ``source`` says where each came from."""

    text: dict[str, str] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    given: bool = False  # any caption file exists: a photo without one has a missing caption

    def missing(self, names: list[str]) -> list[str]:
        """The photos among ``names`` without a caption although caption files exist."""
        return sorted(n for n in names if self.given and n not in self.text)

    def caption_for(
        self,
        name: str,
        template: str,
        token: str,
        class_name: str | None,
        missing: Literal["template", "reject"] = "template",
    ) -> tuple[str, str]:
        """``(caption, where_from)`` for image ``name``; ``where_from`` is ``template`` for one
        rendered from ``template`` (no caption files, or a missing caption and ``missing`` is
        ``template``).

        Raises:
            CaptionError: missing caption (with ``missing="reject"``), empty caption, or the
                token is absent.
        """
        if name in self.text:
            caption, where = render(self.text[name], token, class_name), self.source[name]
        elif self.given and missing == "reject":
            stem = Path(name).stem
            raise CaptionError(
                f"missing caption: no entry in {CAPTIONS_FILE} and no sidecar {stem}.txt "
                "(other photos have captions; add one, or set data.missing_caption: template "
                "to use data.caption_template)"
            )
        else:
            caption, where = render(template, token, class_name), "template"
        if not caption:
            raise CaptionError(f"empty caption ({where})")
        if not has_token(caption, token):
            raise CaptionError(
                f"caption lacks the identifier token {token!r} ({where}): {caption!r}"
            )
        return caption, where


def missing_captions_warning(names: list[str]) -> str:
    """The prepare stage's one warning naming every photo captioned by the template."""
    return (
        f"{len(names)} photo(s) have no caption in {CAPTIONS_FILE} or a sidecar .txt and are "
        f"captioned with data.caption_template: {', '.join(names)} (add captions, or set "
        "data.missing_caption: reject to reject them)"
    )


def render(text: str, token: str, class_name: str | None) -> str:
    """Substitute ``{token}``/``{class_name}`` (plain replace: other braces stay literal)."""
    out = text.replace("{token}", token)
    if class_name is not None:
        out = out.replace("{class_name}", class_name)
    return " ".join(out.split())


def has_token(caption: str, token: str) -> bool:
    """Whether ``token`` occurs as a whole word (CLIP lower-cases, so case is ignored)."""
    return re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", caption, re.IGNORECASE) is not None


def check_entry_name(name: str) -> str | None:
    """Why a ``captions.txt`` file name is unsafe, or None when it is a plain file name."""
    if "\x00" in name:
        return "file name contains a NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"absolute path {name!r} not allowed (name a file in the subject folder)"
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        return f"path {name!r} leaves the subject folder ('..' not allowed)"
    if len(parts) > 1:
        return f"path {name!r} names a sub-folder; entries name files directly in the folder"
    return None


def _split_line(line: str) -> tuple[str, str] | None:
    if "\t" in line:
        name, _, caption = line.partition("\t")
    elif ": " in line:
        name, _, caption = line.partition(": ")
    else:
        return None
    return name.strip(), caption.strip()


def read_captions(
    folder: Path, image_names: list[str], txt_names: list[str]
) -> tuple[Captions, list[Rejection]]:
    """Read ``captions.txt`` and sidecars among ``txt_names`` for the photos ``image_names``.

    Returns the captions and the rejected entries/files (unsafe paths, malformed lines,
    duplicates, captions for files that are not there, unreadable files).
    """
    caps, rejects = Captions(), []
    images = set(image_names)
    if CAPTIONS_FILE in txt_names:
        caps.given = True
        rejects += _read_captions_file(folder / CAPTIONS_FILE, images, caps)
    by_stem: dict[str, list[str]] = {}
    for name in sorted(images):
        by_stem.setdefault(Path(name).stem, []).append(name)
    for txt in sorted(set(txt_names) - {CAPTIONS_FILE}):
        base = txt[: -len(".txt")]
        targets = [base] if base in images else by_stem.get(base, [])
        if not targets:
            # A stray README.txt is reported but does not switch on "captions required".
            rejects.append(Rejection(txt, "sidecar caption without a matching photo"))
            continue
        caps.given = True
        text = _read_text(folder / txt, txt, rejects)
        if text is None:
            continue
        for target in targets:
            if caps.source.get(target, "").startswith("sidecar") and base != target:
                continue  # a full-name sidecar (00.jpg.txt) beats a stem one (00.txt)
            caps.text[target], caps.source[target] = " ".join(text.split()), f"sidecar:{txt}"
    return caps, rejects


def _read_text(path: Path, label: str, rejects: list[Rejection]) -> str | None:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        rejects.append(Rejection(label, f"unreadable caption file ({type(exc).__name__}: {exc})"))
        return None


def _read_captions_file(path: Path, images: set[str], caps: Captions) -> list[Rejection]:
    rejects: list[Rejection] = []
    text = _read_text(path, CAPTIONS_FILE, rejects)
    for number, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{CAPTIONS_FILE}:{number}"
        parsed = _split_line(line)
        if parsed is None:
            rejects.append(
                Rejection(where, "expected '<file name><TAB><caption>' or '<file name>: <caption>'")
            )
            continue
        name, caption = parsed
        problem = check_entry_name(name)
        if problem is None and name not in images:
            problem = f"caption for {name!r}, which is not a photo in the folder"
        if problem is None and name in caps.text:
            problem = f"duplicate entry for {name!r} (first one, {caps.source[name]}, kept)"
        if problem is not None:
            rejects.append(Rejection(where, problem))
            continue
        caps.text[name], caps.source[name] = caption, where
    return rejects


@cache
def _tokenizer() -> Any:
    """OpenAI CLIP's BPE tokenizer, built offline from the vocabulary open_clip ships, without
    importing torch (:mod:`harness.clip_bpe`); built once per process."""
    from harness.clip_bpe import build_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(Path(tmp))


def token_warnings(token: str, class_name: str | None = None) -> list[str]:
    """Warnings about the identifier token: many BPE pieces, a frequent word, the class noun."""
    out: list[str] = []
    if class_name and token.lower() in class_name.lower().split():
        out.append(
            f"identifier token {token!r} is the class noun {class_name!r}: it cannot bind a new subject"
        )
    try:
        tok = _tokenizer()
    except Exception as exc:  # a broken optional dependency must not stop data preparation
        return [
            *out,
            f"token check skipped: CLIP tokenizer unavailable ({type(exc).__name__}: {exc})",
        ]
    ids: list[int] = tok.encode(token, add_special_tokens=False)
    pieces = [str(piece).replace("</w>", "") for piece in tok.convert_ids_to_tokens(ids)]
    if len(ids) > MAX_TOKEN_PIECES:
        out.append(
            f"identifier token {token!r} is split into {len(ids)} CLIP BPE pieces {pieces}; "
            "a rare 1-piece token (e.g. 'sks') binds the subject more reliably"
        )
    elif len(ids) == 1 and ids[0] < COMMON_WORD_MAX_ID and pieces[0] == token.lower():
        out.append(
            f"identifier token {token!r} is a common word (CLIP BPE id {ids[0]}); its existing "
            "meaning competes with the subject; prefer a rare token such as 'sks'"
        )
    for message in out:
        log.warning(message)
    return out
