"""Command line: ``python -m metrics score --real DIR --generated DIR [--prompts FILE]``.

Prints the means with 95% intervals and the real ceiling (rich tables), the per-prompt rows,
and optionally writes everything as JSON. Input problems (empty folder, non-image file,
prompts file that does not match the images, missing weights) print one line naming the file
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metrics.api import Scorer, ScorerConfig, ScoreResult
from metrics.encoders import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, DEFAULT_DINO_MODEL
from metrics.errors import MetricsError
from metrics.images import list_image_files
from metrics.manifest import match_prompts
from metrics.prompts import IDENTIFIER_POLICIES

__all__ = ["build_parser", "main"]

EXIT_INPUT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The ``metrics`` argument parser (one subcommand: ``score``)."""
    parser = argparse.ArgumentParser(
        prog="python -m metrics", description="DreamBooth metrics: DINO, CLIP-I, CLIP-T, DIV."
    )
    commands = parser.add_subparsers(dest="command", required=True)
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
    return parser


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _print_tables(result: ScoreResult, ceiling: dict[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title="DreamBooth metrics")
    for column in ("metric", "mean", "95% CI (prompts)", "real ceiling"):
        summary.add_column(column, justify="left" if column == "metric" else "right")
    ceilings = ceiling or {}
    for key, label in (
        ("dino", "DINO"),
        ("clip_i", "CLIP-I"),
        ("clip_t", "CLIP-T"),
        ("div", "DIV"),
    ):
        summary.add_row(
            label, _fmt(result.means()[key]), _fmt_ci(result.ci.get(key)), _fmt(ceilings.get(key))
        )
    console.print(summary)
    meta = result.metadata
    console.print(
        f"identifier policy: {meta['identifier_policy']} (token {meta['token']!r}); "
        f"DIV embedding: {meta['div_embedding']}; real: {meta['n_real']}, "
        f"generated: {meta['n_generated']}"
    )
    if result.prompts:
        per_prompt = Table(title="Per prompt")
        for column in ("prompt", "encoded text", "n", "DINO", "CLIP-I", "CLIP-T", "DIV"):
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
            )
        console.print(per_prompt)


def _score(args: argparse.Namespace) -> int:
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
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    scorer = Scorer(config)
    result = scorer.score(real, generated, prompts, token=args.token, class_name=args.class_name)
    ceiling = scorer.real_ceiling(real) if len(real) >= 2 else None
    _print_tables(result, ceiling)
    if args.json_out is not None:
        payload = {
            "inputs": {
                "real": str(args.real),
                "generated": str(args.generated),
                "prompts": str(args.prompts) if args.prompts is not None else None,
            },
            **result.to_dict(),
            "real_ceiling": ceiling,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


class _UsageError(MetricsError):
    """An invalid option value."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 on input errors, with one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            return _score(args)
    except MetricsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return EXIT_INPUT_ERROR  # pragma: no cover - argparse requires a command
