"""Validation images while training (``train.validation_steps``), as diffusers' and kohya's
scripts make them: every N optimizer steps and after the last one, one image per
``train.validation_prompts`` template with seed ``train.validation_seed``.

They are generated the way the sweep evaluates a checkpoint from inside training: the current
adapters are written as a diffusers LoRA, the training adapters step aside
(:meth:`harness.train.attachment.Attachment.suspended`: weights, optimizer state and every RNG
state are put back afterwards, so validation never changes the trajectory) and
:func:`harness.generate.generate_images` generates with the ``eval`` settings (scheduler,
steps, guidance, LoRA scales, resolution). A validation image at a checkpoint step is
therefore the image ``harness generate --adapter <that checkpoint>`` gives for the same seed.

Layout (only the main process generates and writes; the others wait)::

    <run_dir>/validation/step-<N>/<prompt_index>-<seed>.png
    <run_dir>/validation/step-<N>/validation.json   step, prompts, templates, seed, setting
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.train.lora import save_diffusers_lora
from harness.train.tensorfiles import atomic_write_json

if TYPE_CHECKING:
    from harness.config import HarnessConfig
    from harness.tracking.base import Run
    from harness.train.step import Trainer

__all__ = ["VALIDATION_JSON", "ValidationCallback", "ValidationImages", "Validator"]

logger = logging.getLogger(__name__)
VALIDATION_JSON = "validation.json"


@dataclass(frozen=True)
class ValidationImages:
    """One validation round's images (in prompt order) and their prompts."""

    step: int
    folder: Path
    images: tuple[Path, ...]
    prompts: tuple[str, ...]
    seed: int
    subject: str | None = None  # set by a sweep across subjects (``data.subjects``)

    @property
    def title(self) -> str:
        """The tracker's title of these images: ``validation`` (``/<subject>``)."""
        return "validation" if self.subject is None else f"validation/{self.subject}"

    def log_to(self, run: Run) -> None:
        """Log the images to a tracked run: under :attr:`title`, one series per prompt
        (``<index>: <prompt>``), at the optimizer step (``harness train`` and the sweep)."""
        for index, (image, prompt) in enumerate(zip(self.images, self.prompts, strict=True)):
            run.log_image(self.title, f"{index}: {prompt}", image, self.step)


ValidationCallback = Callable[[ValidationImages], None]


class Validator:
    """When and how one training call makes its validation images."""

    def __init__(
        self, cfg: HarnessConfig, run_dir: Path, on_validation: ValidationCallback | None
    ) -> None:
        self.cfg, self.root, self.on_validation = cfg, Path(run_dir) / "validation", on_validation

    def due(self, step: int) -> bool:
        """Whether step ``step`` is a validation step (every N, and the last one)."""
        every = self.cfg.train.validation_steps
        return every is not None and (step % every == 0 or step == self.cfg.train.max_steps)

    def run(self, trainer: Trainer, step: int) -> ValidationImages | None:
        """Make step ``step``'s images (main process; every process returns together)."""
        accelerator = trainer.session.accelerator
        made = None
        if accelerator.is_main_process:
            made = self._generate(trainer, step)
            if self.on_validation is not None:
                self.on_validation(made)
        accelerator.wait_for_everyone()
        return made

    def _generate(self, trainer: Trainer, step: int) -> ValidationImages:
        """Write the adapters, step them aside, generate, and move the images into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=self.root))
        try:
            session = trainer.session
            lora = session.lora
            # What a checkpoint at this step publishes: the EMA when train.ema_decay is on.
            adapter = session.adapter_state()
            save_diffusers_lora(work / "adapter", session.model.family, lora, adapter)
            with trainer.suspended():
                records = self._images(trainer, work)
            return self._publish(work, step, records)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _images(self, trainer: Trainer, work: Path) -> list[Any]:
        """The images of the adapter in ``work/adapter`` (the base pipeline is free)."""
        from harness.generate import generate_images

        cfg = self.cfg
        return generate_images(
            trainer.session.model,
            templates=cfg.train.validation_prompts,
            token=cfg.data.token,
            class_name=cfg.data.class_name or "object",
            seeds=[cfg.train.validation_seed],
            settings=[cfg.eval.setting],
            out_dir=work / "generated",
            adapter=work / "adapter",
            resolution=cfg.eval.resolution or cfg.data.resolution,
            batch_size=cfg.eval.batch_size,
            progress=False,
        )

    def _publish(self, work: Path, step: int, records: list[Any]) -> ValidationImages:
        """``step-<N>/`` with the images and ``validation.json`` (replacing an older one)."""
        staging = work / "step"
        staging.mkdir()
        names = []
        for record in records:
            name = f"{record.prompt_index}-{record.seed}.png"
            (work / "generated" / record.file).replace(staging / name)
            names.append(name)
        seed, setting = self.cfg.train.validation_seed, self.cfg.eval.setting
        atomic_write_json(
            staging / VALIDATION_JSON,
            {
                "step": step,
                "seed": seed,
                "prompts": [r.prompt for r in records],
                "templates": [r.template for r in records],
                "images": names,
                "setting": setting.model_dump(mode="json"),
                "resolution": self.cfg.eval.resolution or self.cfg.data.resolution,
            },
        )
        target = self.root / f"step-{step}"
        shutil.rmtree(target, ignore_errors=True)  # a resumed run validates the step again
        staging.rename(target)
        logger.info("validation images of step %d in %s", step, target)
        return ValidationImages(
            step,
            target,
            tuple(target / n for n in names),
            tuple(r.prompt for r in records),
            seed,
        )
