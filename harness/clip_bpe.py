"""OpenAI CLIP's BPE tokenizer, built offline from the vocabulary ``open_clip`` ships.

Light on purpose: neither torch nor open_clip is imported (open_clip's package import loads
torch, several seconds of every ``harness prepare`` that only checks a token), only the
vocabulary file inside its installed package is read; transformers' ``CLIPTokenizer`` does the
tokenizing. The ids equal those of ``openai/clip-vit-large-patch14``'s tokenizer (SD 1.x's,
and both of SDXL's).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

__all__ = ["build_clip_tokenizer", "bytes_to_unicode", "clip_bpe_file", "write_clip_bpe_files"]

MERGES = 49152 - 256 - 2  # the merges OpenAI's tokenizer uses, of the file's longer list


def clip_bpe_file() -> Path:
    """open_clip's copy of the CLIP BPE merges (``bpe_simple_vocab_16e6.txt.gz``).

    Raises:
        ModuleNotFoundError: open_clip is not installed.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed (it ships the CLIP BPE vocabulary)")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 bytes to printable characters: the
    printable Latin-1 bytes to themselves, first, then the others to code points from 256 on,
    in byte order (the order is the first 256 token ids)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    extra = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def write_clip_bpe_files(out_dir: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` of OpenAI's CLIP BPE: the byte alphabet, the
    same with ``</w>``, the merges in rank order, then the two special tokens."""
    with gzip.open(clip_bpe_file()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return vocab_file, merges_file


def build_clip_tokenizer(work_dir: Path, pad_token: str = "<|endoftext|>") -> Any:
    """An offline ``CLIPTokenizer`` identical in ids to OpenAI CLIP's (77 tokens max)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_bpe_files(work_dir)
    # transformers >= 5 takes the vocabulary and merges themselves (file paths are ignored).
    return CLIPTokenizer(
        vocab=str(vocab_file),
        merges=str(merges_file),
        model_max_length=77,
        pad_token=pad_token,
    )
