"""Evaluate an adapter (or the base model): generate for every setting, then score each setting.

Scores follow the DreamBooth protocol as implemented by the standalone :mod:`metrics` package:
DINO and CLIP-I against the subject's real reference photos (all pairs), CLIP-T against each
image's prompt (identifier policy recorded), DIV (the paper's: mean LPIPS distance among images
of the same prompt, with ``metrics.lpips_weights``) and DIV-DINO (``div_dino``: 1 - their mean
DINO similarity), and bootstrap 95% intervals over prompts. Real-photo embeddings are cached by content hash, so a sweep
computes them once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from harness.config import HarnessConfig, InferenceSetting
from harness.errors import HarnessError
from harness.generate import GeneratedImage, Speed, generate_images
from harness.models import LoadedModel

if TYPE_CHECKING:
    from metrics import ScoreResult

__all__ = [
    "SettingScores",
    "evaluate_adapter",
    "image_grid",
    "image_rows",
    "make_scorer",
    "score_dict",
]

logger = logging.getLogger(__name__)


@dataclass
class SettingScores:
    """The scores of one inference setting, with its images, per-prompt and per-image tables.

    ``per_image`` has one row per image of ``images`` (same order): ``template``, ``prompt``,
    ``seed``, ``image`` (``out_dir / file``), ``dino``, ``clip_i``, ``clip_t``.
    """

    setting: InferenceSetting
    scores: dict[str, float]
    images: list[GeneratedImage]
    images_dir: Path
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    per_image: list[dict[str, Any]] = field(default_factory=list)
    # Wall seconds: ``generate`` (this setting's share of the checkpoint's generation, which
    # runs every setting with the adapter loaded once) and ``score``.
    seconds: dict[str, float] = field(default_factory=dict)


def make_scorer(cfg: HarnessConfig, device: str = "cpu") -> Any:
    """A :class:`metrics.Scorer` configured from the ``metrics`` section."""
    from metrics import Scorer, ScorerConfig

    m = cfg.metrics
    return Scorer(
        ScorerConfig(
            dino_model=m.dino_model,
            clip_model=m.clip_model,
            clip_pretrained=m.clip_pretrained,
            identifier_policy=m.identifier_policy,
            batch_size=m.batch_size,
            bootstrap_samples=m.bootstrap_samples,
            device=device,
            seed=cfg.seed,
            lpips_weights=m.lpips_weights,
        )
    )


def score_dict(result: ScoreResult) -> dict[str, float]:
    """Flatten a :class:`metrics.ScoreResult` into ``{metric, metric_lo, metric_hi}`` floats."""
    out: dict[str, float] = {}
    for name, value in result.means().items():
        if value is None:
            continue
        out[name] = float(value)
        interval = result.ci.get(name)
        if interval is not None:
            out[f"{name}_lo"], out[f"{name}_hi"] = float(interval[0]), float(interval[1])
    return out


def evaluate_adapter(
    cfg: HarnessConfig,
    loaded: LoadedModel,
    scorer: Any,
    *,
    reference: Sequence[Path],
    token: str,
    class_name: str,
    adapter: Path | None,
    settings: Sequence[InferenceSetting],
    templates: Sequence[str],
    seeds: Sequence[int],
    out_dir: Path,
    progress: bool = False,
    reuse: Sequence[GeneratedImage] = (),
) -> list[SettingScores]:
    """Generate ``templates x seeds`` for every setting with ``adapter`` loaded once, then score.

    ``reuse``: images of the same adapter and out_dir generated before (an adaptive rung's):
    those of the wanted prompts, seeds and settings are scored again, not generated again.
    An image's noise depends only on (adapter, prompt, seed, setting), never on its batch, so
    the scores equal those of generating everything afresh (to float rounding).

    Returns one :class:`SettingScores` per setting, in the order of ``settings``.
    """
    wanted = {(s.id, i, seed) for s in settings for i in range(len(templates)) for seed in seeds}
    kept = [r for r in reuse if (r.setting.id, r.prompt_index, r.seed) in wanted]
    started = time.perf_counter()
    records = generate_images(
        loaded,
        templates=templates,
        token=token,
        class_name=class_name,
        seeds=seeds,
        settings=settings,
        out_dir=out_dir,
        adapter=adapter,
        resolution=cfg.eval.resolution or cfg.data.resolution,
        batch_size=cfg.eval.batch_size,
        progress=progress,
        skip={(r.setting.id, r.prompt_index, r.seed) for r in kept},
        speed=Speed.of(cfg),
    )
    generate_s = (time.perf_counter() - started) / max(1, len(settings))
    results = []
    for setting in settings:
        # In the order of a fresh generation (prompt, then seed): the scores' bootstrap
        # resamples prompts in order, so reused images score as fresh ones do.
        mine = sorted(
            (r for r in [*kept, *records] if r.setting == setting),
            key=lambda r: (r.prompt_index, seeds.index(r.seed)),
        )
        result = _score_setting(scorer, reference, token, class_name, setting, mine, out_dir)
        result.seconds["generate"] = generate_s
        results.append(result)
        _write_setting_manifest(out_dir, setting, mine)
    return results


def _score_setting(
    scorer: Any,
    reference: Sequence[Path],
    token: str,
    class_name: str,
    setting: InferenceSetting,
    images: list[GeneratedImage],
    out_dir: Path,
) -> SettingScores:
    """Score one setting's images against the reference photos and their prompts."""
    started = time.perf_counter()
    result = scorer.score(
        real=list(reference),
        generated=[out_dir / r.file for r in images],
        prompts=[r.prompt for r in images],
        token=token,
        class_name=class_name,
    )
    return SettingScores(
        setting=setting,
        scores=score_dict(result),
        images=images,
        images_dir=out_dir / "images" / setting.id,
        per_prompt=[dataclasses.asdict(row) for row in result.prompts],
        metadata=dict(result.metadata),
        per_image=image_rows(out_dir, images, result),
        seconds={"score": time.perf_counter() - started},
    )


def image_rows(
    out_dir: Path, records: Sequence[GeneratedImage], result: ScoreResult
) -> list[dict[str, Any]]:
    """One row per generated image: its record joined with its :class:`metrics.ImageScore`.

    The scorer returns its per-image scores in the order of the images it was given (each
    named by its path); a score is matched to its record by that order and checked by name.
    A result without per-image scores gives ``[]``.

    Raises:
        HarnessError: the scores do not line up with the records.
    """
    if not result.images:
        return []
    paths = [out_dir / r.file for r in records]
    if [score.name for score in result.images] != [str(path) for path in paths]:
        raise HarnessError(
            f"{out_dir}: the scorer's per-image scores do not match the generated images"
        )
    return [
        {
            "template": record.template,
            "prompt": record.prompt,
            "seed": record.seed,
            "image": str(path),
            "dino": score.dino,
            "clip_i": score.clip_i,
            "clip_t": score.clip_t,
        }
        for record, path, score in zip(records, paths, result.images, strict=True)
    ]


def _write_setting_manifest(
    out_dir: Path, setting: InferenceSetting, records: Sequence[GeneratedImage]
) -> None:
    """A per-setting manifest whose paths are relative to that setting's folder.

    ``python -m metrics score --generated <setting folder> --prompts <that manifest>`` then
    reproduces the harness' scores from the files alone.
    """
    folder = out_dir / "images" / setting.id
    with (folder / "manifest.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            line = {"file": Path(record.file).name, "prompt": record.prompt, "seed": record.seed}
            handle.write(json.dumps(line, sort_keys=True) + "\n")


def image_grid(paths: Sequence[Path], columns: int, cell: int = 128) -> Image.Image:
    """A simple grid of images (row-major), each resized to ``cell`` pixels."""
    rows = max(1, -(-len(paths) // columns))
    grid = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            tile = image.convert("RGB").resize((cell, cell))
        grid.paste(tile, ((i % columns) * cell, (i // columns) * cell))
    return grid
