"""``harness bench --agreement``: does a fast sampler rank points as the slow reference does?

A sweep compares points (checkpoint x inference setting) with each other, so a sampler at few
steps is good enough for evaluation when it orders the points as a many-step reference does,
even if every score moves a little. One run is trained with the config's checkpoint steps;
every point is evaluated twice on the same prompts and seeds, once with its own scheduler and
steps (``eval.scheduler``, ``sweep.inference.num_inference_steps``) and once with the reference
(default DDIM at 50 steps). Printed: Spearman's rank correlation of the points' weighted
scores, the overlap of the two top-5s, the mean absolute difference per metric,
and the seconds per image of both; the last line is ``agreement=<spearman>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.bench.paths import BenchInputs, sync_device
from harness.config import InferenceSetting
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.models import LoadedModel

__all__ = ["Agreement", "agreement_lines", "measure_agreement", "parse_reference"]

METRICS = ("dino", "clip_i", "clip_t")


@dataclass(frozen=True)
class Agreement:
    """Both evaluations of the same points: ``{(step, setting id): scores}`` and the seconds
    per generated image of each."""

    candidate: dict[tuple[int, str], dict[str, float]]
    reference: dict[tuple[int, str], dict[str, float]]
    candidate_s_per_image: float
    reference_s_per_image: float
    candidate_name: str
    reference_name: str


def parse_reference(text: str) -> tuple[str, int]:
    """``"ddim:50"`` -> ``("ddim", 50)``.

    Raises:
        HarnessError: not ``<scheduler>:<steps>`` with a known scheduler and steps >= 1.
    """
    from typing import get_args

    from harness.config import Scheduler

    name, _, steps = text.partition(":")
    known = get_args(Scheduler)
    if name not in known or not steps.isdigit() or int(steps) < 1:
        raise HarnessError(
            f"--reference: expected <scheduler>:<steps> with a scheduler among {', '.join(known)} "
            f"and steps >= 1, got {text!r}"
        )
    return name, int(steps)


def _as_reference(setting: InferenceSetting, scheduler: str, steps: int) -> InferenceSetting:
    return setting.model_copy(update={"scheduler": scheduler, "num_inference_steps": steps})


def measure_agreement(
    inputs: BenchInputs,
    loaded: LoadedModel,
    scorer: Any,
    work: Path,
    reference: tuple[str, int],
) -> Agreement:
    """Train one run, then evaluate every point with its own sampler and with ``reference``."""
    from harness.evaluate import evaluate_adapter
    from harness.train import train_lora

    cfg = inputs.cfg
    result = train_lora(cfg, loaded, inputs.pairs, work / "run", resume=False, progress=False)
    scores: dict[str, dict[tuple[int, str], dict[str, float]]] = {"own": {}, "reference": {}}
    seconds = {"own": 0.0, "reference": 0.0}
    images = {"own": 0, "reference": 0}
    for ckpt in result.checkpoints:
        for kind in ("own", "reference"):
            settings = list(inputs.settings)
            if kind == "reference":
                settings = [_as_reference(s, *reference) for s in settings]
            measured = evaluate_adapter(
                cfg,
                loaded,
                scorer,
                reference=inputs.subject.reference,
                token=inputs.subject.token,
                class_name=inputs.class_name,
                adapter=ckpt.path,
                settings=settings,
                templates=inputs.templates,
                seeds=inputs.seeds,
                out_dir=work / kind / f"step-{ckpt.step}",
            )
            sync_device(loaded.device)
            seconds[kind] += sum(m.seconds["generate"] for m in measured)
            images[kind] += sum(len(m.images) for m in measured)
            for own, m in zip(inputs.settings, measured, strict=True):
                scores[kind][(ckpt.step, own.id)] = m.scores
    return Agreement(
        candidate=scores["own"],
        reference=scores["reference"],
        candidate_s_per_image=seconds["own"] / max(images["own"], 1),
        reference_s_per_image=seconds["reference"] / max(images["reference"], 1),
        candidate_name=_sampler_names(inputs.settings),
        reference_name=f"{reference[0]} {reference[1]} steps",
    )


def _sampler_names(settings: Sequence[InferenceSetting]) -> str:
    names = sorted({f"{s.scheduler} {s.num_inference_steps} steps" for s in settings})
    return " / ".join(names)


def agreement_lines(cfg: Any, agreement: Agreement, top: int = 5) -> list[str]:
    """The report: rank agreement, top overlap, score differences, speed; ``agreement=`` last."""
    import numpy as np
    import pandas as pd

    from harness.sweep.runner import scalarize

    keys = sorted(agreement.candidate)
    own = np.array([scalarize(cfg, agreement.candidate[k]) for k in keys])
    ref = np.array([scalarize(cfg, agreement.reference[k]) for k in keys])
    constant = len(keys) < 2 or np.ptp(own) == 0 or np.ptp(ref) == 0
    # Spearman: Pearson's correlation of the ranks (ties share their mean rank).
    rho = 1.0 if constant else float(pd.Series(own).corr(pd.Series(ref), method="spearman"))
    top = min(top, len(keys))
    best = {keys[i] for i in np.argsort(-ref, kind="stable")[:top]}
    found = {keys[i] for i in np.argsort(-own, kind="stable")[:top]}
    diffs = ", ".join(
        f"{m} {np.mean([abs(agreement.candidate[k][m] - agreement.reference[k][m]) for k in keys]):.4f}"
        for m in METRICS
        if all(m in agreement.candidate[k] and m in agreement.reference[k] for k in keys)
    )
    speed = agreement.reference_s_per_image / max(agreement.candidate_s_per_image, 1e-12)
    return [
        f"{len(keys)} points, {agreement.candidate_name} against {agreement.reference_name} "
        "(same prompts and seeds)",
        f"rank agreement of the weighted score: spearman {rho:.3f}; "
        f"top-{top} overlap {len(best & found) / max(top, 1):.2f}",
        f"mean |difference|: {diffs}",
        f"generation seconds per image: {agreement.candidate_s_per_image:.4f} against "
        f"{agreement.reference_s_per_image:.4f} (x{speed:.2f} faster)",
        f"agreement={rho:.4f}",
    ]
