"""Command line: ``python -m metrics score --real DIR --generated DIR [--prompts FILE]`` and
``python -m metrics lpips-convert --out lpips_alex.safetensors``.

``score`` prints the means with 95% intervals and the real ceiling (rich tables), the
per-prompt rows, and optionally writes everything as JSON; DIV (LPIPS) needs
``--lpips-weights``. ``lpips-convert`` writes the LPIPS weights file from the ``lpips``
package's lin weights and torchvision's AlexNet (:func:`metrics.lpips.convert`). Input problems
(empty folder, non-image file, prompts file that does not match the images, missing weights,
a ``--json`` destination that cannot be written: checked before scoring) print one line naming
the file and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metrics.api import Scorer, ScorerConfig, ScoreResult
from metrics.encoders import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, DEFAULT_DINO_MODEL
from metrics.errors import MetricsError, MetricsInputError
from metrics.images import list_image_files
from metrics.lpips import NETS
from metrics.manifest import match_prompts
from metrics.prompts import IDENTIFIER_POLICIES

__all__ = ["build_parser", "main"]

EXIT_INPUT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The ``metrics`` argument parser (subcommands ``score`` and ``lpips-convert``)."""
    parser = argparse.ArgumentParser(
        prog="python -m metrics", description="DreamBooth metrics: DINO, CLIP-I, CLIP-T, DIV."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_score(commands)
    _add_lpips_convert(commands)
    return parser


def _add_score(commands: Any) -> None:
    score = commands.add_parser(
        "score",
        help="score generated images against a subject's real photos",
        description="Score generated images against real photos; prints tables, writes JSON.",
    )
    score.add_argument("--real", required=True, type=Path, help="folder of real subject photos")
    score.add_argument("--generated", required=True, type=Path, help="folder of generated images")
    score.add_argument(
        "--prompts",
        type=Path,
        help='JSONL {"file": ..., "prompt": ...} or "file<TAB>prompt" lines; without it CLIP-T '
        "and DIV are skipped",
    )
    score.add_argument(
        "--lpips-weights",
        help="LPIPS weights of DIV: a .safetensors file from `lpips-convert`, or tiny (random); "
        "without it DIV is not measured (DIV-DINO still is)",
    )
    score.add_argument("--json", type=Path, dest="json_out", help="write the results here")
    score.add_argument("--dino-model", default=DEFAULT_DINO_MODEL)
    score.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL)
    score.add_argument(
        "--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED, help='tag, .safetensors, or "none"'
    )
    score.add_argument("--token", default="sks", help="identifier token (default: sks)")
    score.add_argument("--class-name", help="class noun (needed by replace_with_class)")
    score.add_argument("--identifier-policy", default="remove", choices=IDENTIFIER_POLICIES)
    score.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--bootstrap-samples", type=int, default=1000)
    score.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    score.add_argument("--cache-dir", help="embedding cache (default: $METRICS_CACHE_DIR)")
    score.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    score.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def _add_lpips_convert(commands: Any) -> None:
    convert = commands.add_parser(
        "lpips-convert",
        help="write the LPIPS weights file of DIV (safetensors)",
        description="Build the LPIPS v0.1 weights file from the lpips package's lin weights "
        "(weights/v0.1/<net>.pth) and torchvision's ImageNet backbone (torch hub's cache, "
        "downloaded once); both are read with torch.load(weights_only=True).",
    )
    convert.add_argument("--out", required=True, type=Path, help="the .safetensors file")
    convert.add_argument("--net", default="alex", choices=sorted(NETS), help="default: alex")
    convert.add_argument("--lin", type=Path, help="lin weights .pth (default: lpips package's)")
    convert.add_argument(
        "--backbone", type=Path, help="torchvision backbone .pth (default: torch hub's)"
    )


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _print_tables(result: ScoreResult, ceiling: dict[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped or captured output has no width of its own (rich assumes 80): keep the
        # per-prompt rows (eight columns) from wrapping the prompts into fragments.
        console = Console(width=max(console.width, 120))
    summary = Table(title="DreamBooth metrics")
    for column in ("metric", "mean", "95% CI (prompts)", "real ceiling"):
        summary.add_column(column, justify="left" if column == "metric" else "right")
    ceilings = ceiling or {}
    for key, label in (
        ("dino", "DINO"),
        ("clip_i", "CLIP-I"),
        ("clip_t", "CLIP-T"),
        ("div", "DIV"),
        ("div_dino", "DIV-DINO"),
    ):
        summary.add_row(
            label, _fmt(result.means()[key]), _fmt_ci(result.ci.get(key)), _fmt(ceilings.get(key))
        )
    console.print(summary)
    meta = result.metadata
    div_note = (
        f"weights {meta['lpips_weights']}"
        if result.div is not None
        else f"not measured: {meta['div_unmeasured']}"
    )
    console.print(
        f"identifier policy: {meta['identifier_policy']} (token {meta['token']!r}); "
        f"DIV: mean pairwise LPIPS ({div_note}); DIV-DINO: 1 - mean pairwise DINO similarity; "
        f"real: {meta['n_real']}, generated: {meta['n_generated']}"
    )
    if result.prompts:
        per_prompt = Table(title="Per prompt")
        columns = ("prompt", "encoded text", "n", "DINO", "CLIP-I", "CLIP-T", "DIV", "DIV-DINO")
        for column in columns:
            text_column = column in ("prompt", "encoded text")
            per_prompt.add_column(column, justify="left" if text_column else "right")
        for row in result.prompts:
            per_prompt.add_row(
                row.prompt,
                row.text,
                str(row.n_images),
                _fmt(row.dino),
                _fmt(row.clip_i),
                _fmt(row.clip_t),
                _fmt(row.div),
                _fmt(row.div_dino),
            )
        console.print(per_prompt)


def _check_json_destination(path: Path) -> None:
    """Fail in a second, not after the whole scoring, when ``--json`` cannot be written.

    The file must be writable, or its nearest existing ancestor a writable folder (the
    missing folders in between are created when writing). Nothing is created here.
    """
    try:
        if path.is_dir():
            raise MetricsInputError(f"cannot write --json {path}: it is a folder")
        if path.exists():
            target = path
        else:
            target = path.parent
            while not target.exists() and target != target.parent:
                target = target.parent
            if not target.is_dir():
                raise MetricsInputError(f"cannot write --json {path}: {target} is not a folder")
    except OSError as exc:  # e.g. a folder on the way that cannot be searched
        raise MetricsInputError(f"cannot write --json {path}: {exc.strerror or exc}") from None
    if not os.access(target, os.W_OK):
        raise MetricsInputError(f"cannot write --json {path}: {target} is not writable")


def _write_json(
    args: argparse.Namespace, result: ScoreResult, ceiling: dict[str, Any] | None
) -> None:
    """Write the ``--json`` file; a failure (the disk changed while scoring) is one line."""
    payload = {
        "inputs": {
            "real": str(args.real),
            "generated": str(args.generated),
            "prompts": str(args.prompts) if args.prompts is not None else None,
        },
        **result.to_dict(),
        "real_ceiling": ceiling,
    }
    path: Path = args.json_out
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise MetricsInputError(
            f"cannot write --json {path}: {exc.strerror or exc} (the scores printed above "
            "were not saved)"
        ) from None


def _score(args: argparse.Namespace) -> int:
    if args.json_out is not None:
        _check_json_destination(args.json_out)
    real = list_image_files(args.real)
    if args.prompts is not None:
        generated, prompts = match_prompts(args.generated, args.prompts)
    else:
        generated, prompts = list_image_files(args.generated), None
    pretrained = None if str(args.clip_pretrained).lower() == "none" else args.clip_pretrained
    try:
        config = ScorerConfig(
            dino_model=args.dino_model,
            clip_model=args.clip_model,
            clip_pretrained=pretrained,
            identifier_policy=args.identifier_policy,
            batch_size=args.batch_size,
            bootstrap_samples=args.bootstrap_samples,
            device=args.device,
            bf16_autocast=args.bf16,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            seed=args.seed,
            lpips_weights=args.lpips_weights,
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    scorer = Scorer(config)
    result = scorer.score(real, generated, prompts, token=args.token, class_name=args.class_name)
    ceiling = scorer.real_ceiling(real) if len(real) >= 2 else None
    _print_tables(result, ceiling)
    if args.json_out is not None:
        _write_json(args, result, ceiling)
    return 0


def _lpips_convert(args: argparse.Namespace) -> int:
    from metrics.lpips import convert, load_lpips

    path = convert(args.out, args.net, lin=args.lin, backbone=args.backbone)
    weights = load_lpips(str(path)).id  # loads back: the file fits the network
    print(f"wrote {path} (LPIPS v0.1, {args.net}; {weights}): use it as --lpips-weights")
    return 0


class _UsageError(MetricsError):
    """An invalid option value."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 on input errors, with one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            return _score(args)
        if args.command == "lpips-convert":
            return _lpips_convert(args)
    except MetricsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return EXIT_INPUT_ERROR  # pragma: no cover - argparse requires a command
