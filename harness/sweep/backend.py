"""The real sweep backend: the harness trainer, generator and metrics on one loaded pipeline.

It returns records (:mod:`harness.sweep._base`) and reports nothing: what is tracked and where
is the recorder's business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import HarnessConfig, InferenceSetting, Rung
from harness.data import PreparedSubject
from harness.errors import HarnessError
from harness.evaluate import SettingScores, evaluate_adapter, image_grid
from harness.generate import GeneratedImage, Speed, eval_seeds, generate_images
from harness.models import LoadedModel
from harness.sweep._base import PointScores

if TYPE_CHECKING:
    from harness.train.validation import ValidationCallback
from harness.train import CheckpointInfo, TrainResult

__all__ = ["HarnessBackend", "evaluation_templates", "point_scores"]

logger = logging.getLogger(__name__)


class HarnessBackend:
    """Trains with :func:`harness.train.train_lora` and scores with :mod:`metrics`.

    The base pipeline and the scorer are created once per worker and reused by every run.
    """

    def __init__(
        self,
        cfg: HarnessConfig,
        loaded: LoadedModel,
        subject: PreparedSubject,
        scorer: Any,
        progress: bool = True,
    ) -> None:
        self.cfg, self.loaded, self.subject, self.scorer, self.progress = (
            cfg,
            loaded,
            subject,
            scorer,
            progress,
        )
        self.class_name = subject.class_name or cfg.data.class_name or "object"
        self.templates = evaluation_templates(cfg, subject)

    @property
    def instance(self) -> list[tuple[Path, str]]:
        """Training pairs (image, caption) of the prepared subject."""
        return list(zip(self.subject.train_paths, self.subject.train_captions, strict=True))

    def train(
        self,
        cfg: HarnessConfig,
        run_dir: Path,
        on_checkpoint: Callable[[CheckpointInfo], bool],
        on_log: Callable[[Mapping[str, Any], int], None],
        on_validation: ValidationCallback | None = None,
    ) -> TrainResult:
        """One training run to ``max_steps`` (resumes from its last checkpoint)."""
        from harness.train import train_lora

        return train_lora(
            cfg,
            self.loaded,
            self.instance,
            run_dir,
            on_log=on_log,
            on_checkpoint=on_checkpoint,
            progress=self.progress,
            on_validation=on_validation,
        )

    def release(self) -> None:
        """Collect the finished run's reference cycles (LoRA layers, optimizer state) and hand
        the CUDA cache back, so the next run starts from the memory the first one had."""
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def proxy_scores(self, cfg: HarnessConfig, adapter: Path, out_dir: Path) -> dict[str, float]:
        """Few prompts, few seeds, the default ``eval`` setting, on the checkpoint just saved.

        Called from the trainer's ``on_checkpoint``: the trainer has suspended its own adapter
        (the pipeline is the plain base model), so the checkpoint is loaded and unloaded here.
        """
        proxy = cfg.sweep.proxy
        (result,) = self._evaluate(
            cfg,
            adapter,
            [cfg.eval.setting],
            self.templates[: proxy.prompts],
            [cfg.eval.seed + i for i in range(proxy.images_per_prompt)],
            out_dir,
        )
        return result.scores

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
        rung: Rung | None = None,
        reuse: Sequence[PointScores] = (),
    ) -> list[PointScores]:
        """All prompts x ``eval.images_per_prompt`` seeds under every setting, with PRES and a
        prompts x seeds grid image per setting; with ``rung``, its first prompts and seeds
        (no PRES). Images of ``reuse`` (earlier rungs) are scored, not generated again.

        The prompts and seeds are ``cfg``'s: the evaluate stage's backend, made for the
        held-out prompts, scores the sweep's best point on the sweep's own too."""
        adapter, seeds = checkpoint.path, eval_seeds(cfg)
        templates = evaluation_templates(cfg, self.subject)
        full = len(templates) * len(seeds)
        if rung is not None:
            templates, seeds = templates[: rung.prompts], seeds[: rung.images_per_prompt]
        results = self._evaluate(
            cfg,
            adapter,
            settings,
            templates,
            seeds,
            out_dir,
            self.progress,
            reuse=[image for point in reuse for image in point.generated],
        )
        pres = {} if rung else self._prior_preservation(cfg, adapter, settings, out_dir / "pres")
        points = []
        (out_dir / "grids").mkdir(parents=True, exist_ok=True)
        for r in results:
            # Beside the images folder, not in it: that folder is exactly the scored images.
            suffix = "" if rung is None else f".{len(templates)}x{len(seeds)}"
            grid = out_dir / "grids" / f"{r.setting.id}{suffix}.png"
            image_grid([out_dir / i.file for i in r.images], columns=len(seeds)).save(grid)
            if r.setting.id in pres:
                r.scores["pres"] = pres[r.setting.id]
            point = point_scores(r, grid)
            point.fidelity = len(r.images) / full
            points.append(point)
        return points

    def _evaluate(
        self,
        cfg: HarnessConfig,
        adapter: Path | None,
        settings: Sequence[InferenceSetting],
        templates: Sequence[str],
        seeds: Sequence[int],
        out_dir: Path,
        progress: bool = False,
        reuse: Sequence[GeneratedImage] = (),
    ) -> list[SettingScores]:
        """:func:`evaluate_adapter` on this worker's pipeline, scorer and subject."""
        return evaluate_adapter(
            cfg,
            self.loaded,
            self.scorer,
            reference=self.subject.reference,
            token=self.subject.token,
            class_name=self.class_name,
            adapter=adapter,
            settings=settings,
            templates=templates,
            seeds=seeds,
            out_dir=out_dir,
            progress=progress,
            reuse=reuse,
        )

    def references(self, cfg: HarnessConfig, out_dir: Path) -> dict[str, dict[str, float]]:
        """The two bounds that make scores readable: the base model and the real photos.

        ``baseline``: the base model without adapter, default ``eval`` setting, all prompts.
        ``real_ceiling``: DINO / CLIP-I among the subject's real photos (self-pairs excluded).
        """
        return self.references_with_baseline(cfg, out_dir)[0]

    def references_with_baseline(
        self, cfg: HarnessConfig, out_dir: Path
    ) -> tuple[dict[str, dict[str, float]], PointScores]:
        """:meth:`references`, and the base model's evaluation as a :class:`PointScores` (its
        images and per-image scores: the evaluate stage's baseline rows).

        The prompts are ``cfg``'s, not those this backend was made with: the evaluate stage
        scores the base model on the sweep's prompts and seeds too, with the backend it made
        for the held-out ones."""
        templates = evaluation_templates(cfg, self.subject)
        (base,) = self._evaluate(cfg, None, [cfg.eval.setting], templates, eval_seeds(cfg), out_dir)
        out = {"baseline": base.scores}
        if len(self.subject.reference) >= 2:
            ceiling = self.scorer.real_ceiling(list(self.subject.reference))
            out["real_ceiling"] = {k: float(ceiling[k]) for k in ("dino", "clip_i")}
        return out, point_scores(base)

    def _prior_preservation(
        self, cfg: HarnessConfig, adapter: Path, settings: Sequence[InferenceSetting], out_dir: Path
    ) -> dict[str, float]:
        """PRES per setting: class-prompt images vs the subject's photos (DINO; lower is better)."""
        n = cfg.eval.prior_preservation_images
        if n == 0:
            return {}
        records = generate_images(
            self.loaded,
            templates=[cfg.train.class_prompt],
            token=self.subject.token,
            class_name=self.class_name,
            seeds=[cfg.eval.seed + i for i in range(n)],
            settings=settings,
            out_dir=out_dir,
            adapter=adapter,
            resolution=cfg.eval.resolution or cfg.data.resolution,
            batch_size=cfg.eval.batch_size,
            progress=False,
            speed=Speed.of(cfg),
        )
        return {
            s.id: float(
                self.scorer.prior_preservation(
                    [out_dir / r.file for r in records if r.setting == s],
                    list(self.subject.reference),
                )
            )
            for s in settings
        }


def point_scores(result: SettingScores, grid: Path | None = None) -> PointScores:
    """The sweep's record of one evaluated setting (scores, per-prompt and per-image rows)."""
    return PointScores(
        setting=result.setting,
        scores=result.scores,
        images_dir=result.images_dir,
        n_images=len(result.images),
        per_prompt=result.per_prompt,
        grid=grid,
        extra={"identifier_policy": result.metadata.get("identifier_policy")},
        per_image=result.per_image,
        seconds=dict(result.seconds),
        generated=list(result.images),
    )


def evaluation_templates(cfg: HarnessConfig, subject: PreparedSubject) -> list[str]:
    """The prompt templates to evaluate: ``eval.prompts`` or the dataset's own prompts."""
    if cfg.eval.prompt_source == "dataset":
        if not subject.prompts:
            raise HarnessError(
                f"eval.prompt_source: 'dataset' but subject {subject.subject!r} ships no prompts "
                "(only DreamBench-style sources do); use 'config'"
            )
        return list(subject.prompts)
    return list(cfg.eval.prompts)
