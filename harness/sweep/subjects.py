"""Sweeps across subjects (``data.subjects``): one configuration, trained once per subject,
scored by the mean over subjects.

:class:`SubjectsBackend` is a :class:`~harness.sweep._base.SweepBackend` over one backend per
subject, so the runner, adaptive evaluation, the recorder and the evaluate stage treat a
multi-subject configuration like any other run:

* **Training** trains the subjects one after the other, each in ``<run dir>/subjects/<name>``
  (each resumes on its own). The proxy evaluation at a subject's checkpoint is reported at
  step ``index x stride + step`` (``stride``: the largest ``max_steps`` the sweep can train),
  so the pruner compares a configuration with the others on the same subject and step, and can
  stop it after its first subjects.
* **A checkpoint** of the configuration is the folder ``<run dir>/checkpoints/step-<n>`` holding
  ``subjects.json``: the adapter of every subject at that step (paths relative to the folder).
  The results table's ``adapter`` is that folder; :func:`subject_adapters` reads it.
* **A point** (configuration x step x inference setting) is every subject's evaluation of
  that checkpoint under that setting; :func:`mean_over_subjects` gives its scores: the mean
  over subjects, with a 95% Student-t interval across subjects in ``<metric>_lo``/``_hi``,
  and keeps every subject's own :class:`PointScores` in ``subjects``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import HarnessConfig, InferenceSetting, Rung
from harness.errors import HarnessError
from harness.sweep._base import PointScores, SweepBackend
from harness.train import CheckpointInfo, TrainResult

if TYPE_CHECKING:
    from harness.train.validation import ValidationCallback, ValidationImages

__all__ = [
    "SUBJECTS_FILE",
    "SubjectsBackend",
    "mean_over_subjects",
    "step_stride",
    "subject_adapters",
    "subject_config",
]

SUBJECTS_FILE = "subjects.json"
_INTERVAL = ("_lo", "_hi")


def subject_config(cfg: HarnessConfig, name: str, class_name: str | None = None) -> HarnessConfig:
    """``cfg`` for one subject: ``data.subject`` set, ``data.subjects`` cleared and, when
    given, the prepared subject's class noun."""
    from harness.data.subjects import one_subject

    extra = {} if class_name is None else {"class_name": class_name}
    return cfg.model_copy(update={"data": one_subject(cfg.data, name, **extra)})


def step_stride(cfg: HarnessConfig) -> int:
    """The largest ``train.max_steps`` any run of the sweep can have: subject ``i``'s steps are
    reported from ``i x`` this, so two subjects' steps never meet."""
    from harness.sweep.space import max_possible_steps

    return max_possible_steps(cfg)


def subject_adapters(checkpoint: Path) -> dict[str, Path]:
    """``{subject: adapter folder}`` of a multi-subject checkpoint folder.

    Raises:
        HarnessError: naming the folder, when it has no readable ``subjects.json``.
    """
    path = Path(checkpoint) / SUBJECTS_FILE
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))["subjects"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HarnessError(f"{path}: not a multi-subject checkpoint ({exc})") from None
    return {str(name): Path(checkpoint) / str(rel) for name, rel in listed.items()}


def write_subject_checkpoint(folder: Path, adapters: Mapping[str, Path]) -> Path:
    """Write ``<folder>/subjects.json`` naming every subject's adapter (relative paths, so
    the run folder can move)."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = {name: os.path.relpath(path, folder) for name, path in adapters.items()}
    path = folder / SUBJECTS_FILE
    path.write_text(json.dumps({"subjects": listed}, indent=2) + "\n", encoding="utf-8")
    return path


def _t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with ``n - 1`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def _interval(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean and its 95% t-interval across ``values`` (one value: no
    spread, the interval is the value itself)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t_quantile(n) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _with_subject(rows: Sequence[Mapping[str, Any]], name: str) -> list[dict[str, Any]]:
    return [{**row, "subject": name} for row in rows]


def mean_over_subjects(points: Mapping[str, PointScores]) -> PointScores:
    """One point from every subject's evaluation of it (same setting): each score the mean
    over subjects (metrics every subject has), ``<metric>_lo``/``_hi`` its 95% t-interval
    across subjects; per-prompt and per-image rows of all subjects with a ``subject`` column;
    seconds and images summed; the lowest fidelity; every subject's record in ``subjects``."""
    if not points:
        raise ValueError("no subject to average over")
    records = list(points.values())
    first = records[0]
    metrics = [
        m for m in first.scores if not m.endswith(_INTERVAL) and all(m in r.scores for r in records)
    ]
    scores: dict[str, float] = {}
    for metric in metrics:
        mean, lo, hi = _interval([float(r.scores[metric]) for r in records])
        scores[metric] = mean
        scores[f"{metric}_lo"], scores[f"{metric}_hi"] = lo, hi
    seconds: dict[str, float] = {}
    for record in records:
        for phase, value in record.seconds.items():
            seconds[phase] = seconds.get(phase, 0.0) + float(value)
    return PointScores(
        setting=first.setting,
        scores=scores,
        images_dir=Path(os.path.commonpath([str(r.images_dir) for r in records])),
        n_images=sum(r.n_images for r in records),
        per_prompt=[row for n, r in points.items() for row in _with_subject(r.per_prompt, n)],
        grid=first.grid,
        extra=dict(first.extra),
        per_image=[row for n, r in points.items() for row in _with_subject(r.per_image, n)],
        seconds=seconds,
        fidelity=min(r.fidelity for r in records),
        rung=first.rung,
        subjects=dict(points),
    )


class SubjectsBackend:
    """A :class:`SweepBackend` over one backend per subject (see the module docstring).

    ``backends`` maps each subject to its backend, in the order they are trained;
    ``class_names`` gives each subject's prepared class noun (DreamBench's per subject).
    """

    def __init__(
        self,
        backends: Mapping[str, SweepBackend],
        class_names: Mapping[str, str | None] | None = None,
    ) -> None:
        if not backends:
            raise ValueError("a multi-subject sweep needs at least one subject")
        self.backends = dict(backends)
        self.class_names = dict(class_names or {})
        self._training: str | None = None  # the subject whose checkpoint the proxy scores

    @property
    def subjects(self) -> list[str]:
        """The subject names, in training order."""
        return list(self.backends)

    def config(self, cfg: HarnessConfig, name: str) -> HarnessConfig:
        """The run config ``cfg`` for subject ``name``."""
        return subject_config(cfg, name, self.class_names.get(name))

    def train(
        self,
        cfg: HarnessConfig,
        run_dir: Path,
        on_checkpoint: Callable[[CheckpointInfo], bool],
        on_log: Callable[[Mapping[str, Any], int], None],
        on_validation: ValidationCallback | None = None,
    ) -> TrainResult:
        """Train every subject in turn; stop at the first subject pruned or failed. Each
        subject's steps (checkpoints, log, validation images) follow the previous ones'."""
        stride, results = step_stride(cfg), {}
        for index, name in enumerate(self.subjects):
            offset = index * stride

            def checkpoint(ckpt: CheckpointInfo, offset: int = offset, name: str = name) -> bool:
                self._training = name
                return on_checkpoint(CheckpointInfo(offset + ckpt.step, ckpt.path, ckpt.loss))

            def log(values: Mapping[str, Any], step: int, offset: int = offset) -> None:
                on_log(values, offset + step)

            def validated(made: ValidationImages, offset: int = offset, name: str = name) -> None:
                if on_validation is not None:
                    on_validation(replace(made, step=offset + made.step, subject=name))

            result = self.backends[name].train(
                self.config(cfg, name), run_dir / "subjects" / name, checkpoint, log, validated
            )
            if result.status != "completed":
                reason = f"subject {name!r} ({index + 1} of {len(self.subjects)}): {result.reason}"
                result.reason = reason
                return result
            results[name] = result
        return self._combined(cfg, run_dir, results)

    def _combined(
        self, cfg: HarnessConfig, run_dir: Path, results: Mapping[str, TrainResult]
    ) -> TrainResult:
        """The configuration's checkpoints: the steps every subject saved, one folder each."""
        by_subject = {n: {c.step: c for c in r.checkpoints} for n, r in results.items()}
        steps = sorted(set.intersection(*(set(c) for c in by_subject.values())))
        checkpoints = []
        for step in steps:
            folder = run_dir / "checkpoints" / f"step-{step:06d}"
            write_subject_checkpoint(folder, {n: c[step].path for n, c in by_subject.items()})
            losses = [x for c in by_subject.values() if (x := c[step].loss) is not None]
            loss = math.fsum(losses) / len(losses) if losses else None
            checkpoints.append(CheckpointInfo(step, folder, loss))
        first = next(iter(results.values()))
        return TrainResult(
            status="completed",
            run_dir=run_dir,
            steps_done=first.steps_done,
            max_steps=first.max_steps,
            checkpoints=checkpoints,
            final_loss=checkpoints[-1].loss if checkpoints else None,
            wall_s=sum(r.wall_s for r in results.values()),
            info={"subjects": {n: str(r.run_dir) for n, r in results.items()}},
        )

    def proxy_scores(self, cfg: HarnessConfig, adapter: Path, out_dir: Path) -> dict[str, float]:
        """The proxy scores of the subject being trained, at its checkpoint ``adapter``."""
        name = self._training or self.subjects[0]
        return self.backends[name].proxy_scores(self.config(cfg, name), adapter, out_dir)

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
        rung: Rung | None = None,
        reuse: Sequence[PointScores] = (),
    ) -> list[PointScores]:
        """Every subject's evaluation of ``checkpoint`` (into ``out_dir/<subject>``), one
        averaged point per setting."""
        adapters = subject_adapters(checkpoint.path)
        per_subject: dict[str, list[PointScores]] = {}
        for name in self.subjects:
            extra: dict[str, Any] = {} if rung is None else {"rung": rung}
            if reuse:
                extra["reuse"] = [point.subjects[name] for point in reuse]
            one = CheckpointInfo(checkpoint.step, adapters[name], checkpoint.loss)
            per_subject[name] = self.backends[name].evaluate(
                self.config(cfg, name), one, settings, out_dir / name, **extra
            )
        return [
            mean_over_subjects({name: points[i] for name, points in per_subject.items()})
            for i in range(len(settings))
        ]

    def references(self, cfg: HarnessConfig, out_dir: Path) -> dict[str, dict[str, float]]:
        """The base model's and the real photos' scores, each the mean over subjects (a
        reference some subject lacks, such as a ceiling from one photo, is left out)."""
        return _mean_references(
            {
                name: backend.references(self.config(cfg, name), out_dir / name)
                for name, backend in self.backends.items()
            }
        )

    def references_with_baseline(
        self, cfg: HarnessConfig, out_dir: Path
    ) -> tuple[dict[str, dict[str, float]], PointScores]:
        """:meth:`references`, and the base model's evaluation averaged over subjects (its
        per-image rows carry their subject): the evaluate stage's baseline rows."""
        found, baselines = {}, {}
        for name, backend in self.backends.items():
            one = self.config(cfg, name)
            with_baseline = getattr(backend, "references_with_baseline", None)
            if with_baseline is None:
                raise HarnessError(f"the backend of subject {name!r} gives no baseline images")
            found[name], baselines[name] = with_baseline(one, out_dir / name)
        return _mean_references(found), mean_over_subjects(baselines)

    def release(self) -> None:
        """Release every subject's backend."""
        for backend in self.backends.values():
            backend.release()


def _mean_references(
    found: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, float]]:
    """Each reference (``baseline``, ``real_ceiling``) averaged over subjects; one that some
    subject lacks (a ceiling needs two photos) is left out rather than averaged over fewer."""
    kinds = set.intersection(*(set(r) for r in found.values()))
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(kinds):
        metrics = set.intersection(*(set(r[kind]) for r in found.values()))
        out[kind] = {}
        for metric in sorted(m for m in metrics if not m.endswith(_INTERVAL)):
            mean, lo, hi = _interval([float(r[kind][metric]) for r in found.values()])
            out[kind].update({metric: mean, f"{metric}_lo": lo, f"{metric}_hi": hi})
    return out
