"""The sweep loop: one training run per sampled configuration, many evaluated points per run.

For each run the worker

1. asks ``S.runs`` for training parameters (sampler: TPE, NSGA-II, random or grid);
2. trains the LoRA once, to ``max_steps``, saving checkpoints at ``train.checkpoint_steps``;
3. at every checkpoint runs a cheap proxy evaluation (first ``sweep.proxy.prompts`` prompts,
   ``sweep.proxy.images_per_prompt`` seeds), reports it to the run's twin in ``S.proxy`` and lets
   the pruner stop hopeless runs early;
4. for a surviving run, evaluates every checkpoint under every inference setting of
   ``sweep.inference`` on the same loaded pipeline (all prompts, ``eval.images_per_prompt`` seeds);
5. records each (training parameters, steps, inference setting) point as a completed trial of
   ``S`` with all parameters, scores and intervals, and tells ``S.runs`` the values of the run's
   representative point (the one with the highest objective sum, or weighted objective).

Steps and inference scales therefore cost generation and scoring, never retraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import optuna
from optuna.trial import TrialState

from harness.config import HarnessConfig
from harness.generate import InferenceSetting
from harness.sweep.results import pareto_rows, points_frame, write_results
from harness.sweep.space import (
    evaluated_distributions,
    inference_settings,
    point_params,
    sample_training_params,
    training_distributions,
    with_training_params,
)
from harness.sweep.study import (
    Studies,
    fail_orphan_proxies,
    objective_names,
    open_studies,
    recover_dead_runs,
)
from harness.tracking.base import TrackingError

__all__ = [
    "Checkpoint",
    "PointEval",
    "SweepBackend",
    "SweepSummary",
    "TrainOutcome",
    "run_key",
    "run_sweep",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A saved LoRA adapter at a training step."""

    step: int
    path: Path


@dataclass
class TrainOutcome:
    """How a training run ended."""

    status: Literal["completed", "pruned", "failed"]
    checkpoints: list[Checkpoint] = field(default_factory=list)
    reason: str | None = None


@dataclass
class PointEval:
    """Scores of one checkpoint under one inference setting."""

    setting: InferenceSetting
    scores: dict[str, float]
    images_dir: Path
    n_images: int
    extra: dict[str, Any] = field(default_factory=dict)


class SweepBackend(Protocol):
    """What the sweep needs from training, generation and scoring (tests use fakes)."""

    def train(
        self,
        cfg: HarnessConfig,
        run_dir: Path,
        on_checkpoint: Callable[[Checkpoint], bool],
        on_log: Callable[[Mapping[str, Any], int], None],
    ) -> TrainOutcome:
        """Train to ``cfg.train.max_steps``; stop early when ``on_checkpoint`` returns True."""
        ...

    def proxy_scores(self, cfg: HarnessConfig, adapter: Path, out_dir: Path) -> dict[str, float]:
        """Cheap scores of one checkpoint (few prompts and seeds, default setting)."""
        ...

    def evaluate(
        self,
        cfg: HarnessConfig,
        adapter: Path,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
    ) -> list[PointEval]:
        """Full evaluation of one checkpoint under every setting."""
        ...


@dataclass
class SweepSummary:
    """What a sweep invocation did and where its results are."""

    study_name: str
    storage: str
    runs_total: int
    runs_completed: int
    runs_pruned: int
    runs_failed: int
    points: int
    pareto: list[dict[str, Any]]
    results_csv: Path
    results_parquet: Path
    runs_interrupted: int = 0
    started_runs_this_call: int = 0

    def describe(self) -> str:
        """One human sentence on runs versus evaluated points."""
        interrupted = (
            f", {self.runs_interrupted} interrupted and retried" if self.runs_interrupted else ""
        )
        return (
            f"{self.runs_total} training runs ({self.runs_completed} completed, "
            f"{self.runs_pruned} pruned, {self.runs_failed} failed{interrupted}) -> "
            f"{self.points} evaluated "
            f"points ({self.points / max(self.runs_completed, 1):.1f} per completed run)"
        )


class RunFailed(Exception):
    """A training run failed; recorded with its reason, the sweep goes on."""


def run_key(cfg: HarnessConfig) -> str:
    """Stable id of a training run: what it trains on and how (not the inference settings)."""
    payload = {
        "model": cfg.model.model_dump(mode="json", exclude={"device", "cache_dir"}),
        "data": cfg.data.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude={"output_dir"}),
        "seed": cfg.seed,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def scalarize(cfg: HarnessConfig, scores: Mapping[str, float]) -> float:
    """One number for pruning and for picking a run's representative point."""
    weights = cfg.sweep.weights or {cfg.sweep.subject_metric: 0.5, cfg.sweep.prompt_metric: 0.5}
    return float(sum(w * scores[m] for m, w in weights.items()))


def objective_values(cfg: HarnessConfig, scores: Mapping[str, float]) -> list[float]:
    """The study's objective values of a point."""
    if cfg.sweep.weights:
        return [scalarize(cfg, scores)]
    return [float(scores[cfg.sweep.subject_metric]), float(scores[cfg.sweep.prompt_metric])]


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (cluster pre-emption, ``kill``) ends the run like Ctrl-C: recorded, re-queued."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Objective:
    """The function Optuna optimises on ``S.runs``: one training run and its evaluation."""

    def __init__(
        self, cfg: HarnessConfig, root: Path, studies: Studies, backend: SweepBackend, tracker: Any
    ) -> None:
        self.cfg, self.root, self.studies, self.backend, self.tracker = (
            cfg,
            root,
            studies,
            backend,
            tracker,
        )
        self.settings = inference_settings(cfg)
        self.distributions = {**training_distributions(cfg.sweep), **evaluated_distributions(cfg)}
        self.started = 0

    def __call__(self, trial: optuna.Trial) -> list[float] | float:
        self.started += 1
        params = sample_training_params(trial, self.cfg.sweep)
        run_cfg = with_training_params(self.cfg, params)
        key = run_key(run_cfg)
        run_dir = self.root / self.cfg.sweep.dir / "runs" / key
        trial.set_user_attr("run_key", key)
        trial.set_user_attr("run_dir", str(run_dir))
        proxy_trial = self.studies.proxy.ask()
        proxy_trial.set_user_attr("run_key", key)
        proxy_trial.set_user_attr("run_trial", trial.number)
        trial.set_user_attr("proxy_trial", proxy_trial.number)
        logger.info("run %d (%s): %s", trial.number, key, params)
        track: Any = None
        try:
            track = self._start_tracking(trial, run_cfg, key)
            if hasattr(self.backend, "track"):
                self.backend.track = track  # sample grids and per-prompt tables go to this run
            values, score = self._run(trial, proxy_trial, params, run_cfg, run_dir, track)
        except optuna.TrialPruned:
            self.studies.proxy.tell(proxy_trial, state=TrialState.PRUNED)
            raise
        except (KeyboardInterrupt, TrackingError):
            # Not the run's fault: same parameters again first next time (the trainer resumes
            # from its checkpoint); a tracking error under tracking.strict still stops the sweep.
            trial.set_user_attr("interrupted", True)
            self.studies.proxy.tell(proxy_trial, state=TrialState.FAIL)
            self.studies.runs.enqueue_trial(
                {f"train.{k}": v for k, v in params.items()}, user_attrs={"retry_of": trial.number}
            )
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            logger.exception("run %d failed", trial.number)
            trial.set_user_attr("fail_reason", reason[:2000])
            self.studies.proxy.tell(proxy_trial, state=TrialState.FAIL)
            raise RunFailed(reason) from exc
        finally:
            if track is not None:
                track.close()
        self.studies.proxy.tell(proxy_trial, score)
        return values if len(values) > 1 else values[0]

    def _start_tracking(self, trial: optuna.Trial, run_cfg: HarnessConfig, key: str) -> Any:
        from harness.tracking import default_tags

        config = run_cfg.to_dict()
        return self.tracker.start_run(
            f"{self.cfg.sweep.study_name}/run-{trial.number:04d}-{key}",
            config=config,
            tags=[*default_tags(config), f"sweep:{self.cfg.sweep.study_name}"],
            project=f"{self.cfg.tracking.project}/{self.cfg.sweep.study_name}",
        )

    def _run(
        self,
        trial: optuna.Trial,
        proxy_trial: optuna.Trial,
        params: dict[str, Any],
        run_cfg: HarnessConfig,
        run_dir: Path,
        track: Any,
    ) -> tuple[list[float], float]:
        def on_checkpoint(ckpt: Checkpoint) -> bool:
            scores = self.backend.proxy_scores(
                run_cfg, ckpt.path, run_dir / "proxy" / f"step-{ckpt.step}"
            )
            value = scalarize(self.cfg, scores)
            proxy_trial.report(value, ckpt.step)
            trial.set_user_attr(f"proxy.step-{ckpt.step}", value)
            for name, score in scores.items():
                track.log_scalar("proxy", name, score, ckpt.step)
            return proxy_trial.should_prune()

        def on_log(values: Mapping[str, Any], step: int) -> None:
            track.log_scalars(dict(values), step, title="train")

        outcome = self.backend.train(run_cfg, run_dir, on_checkpoint, on_log)
        trial.set_user_attr("status", outcome.status)
        if outcome.status == "pruned":
            trial.set_user_attr(
                "prune_reason", outcome.reason or "proxy score below the pruner's bar"
            )
            raise optuna.TrialPruned(outcome.reason)
        if outcome.status == "failed":
            raise RuntimeError(outcome.reason or "training failed")
        return self._evaluate(trial, params, run_cfg, run_dir, outcome.checkpoints, track)

    def _evaluate(
        self,
        trial: optuna.Trial,
        params: dict[str, Any],
        run_cfg: HarnessConfig,
        run_dir: Path,
        checkpoints: Sequence[Checkpoint],
        track: Any,
    ) -> tuple[list[float], float]:
        """Evaluate every checkpoint; return the representative point's values and score."""
        done = _recorded_point_keys(self.studies.points, str(trial.user_attrs.get("run_key")))
        best: tuple[float, list[float], Path] | None = None
        for ckpt in checkpoints:
            evals = self.backend.evaluate(
                run_cfg, ckpt.path, self.settings, run_dir / "eval" / f"step-{ckpt.step:06d}"
            )
            for ev in evals:
                values = objective_values(self.cfg, ev.scores)
                point_key = f"{trial.user_attrs['run_key']}/{ckpt.step}/{ev.setting.id}"
                if point_key not in done:
                    self._record_point(trial, params, ckpt, ev, values, point_key)
                for name, score in ev.scores.items():
                    track.log_scalar(f"eval/{ev.setting.id}", name, score, ckpt.step)
                score = scalarize(self.cfg, ev.scores)
                if best is None or score > best[0]:
                    best = (score, values, ckpt.path)
        if best is None:
            raise RuntimeError("training produced no checkpoint to evaluate")
        trial.set_user_attr("best_adapter", _relative(best[2], self.root))
        weights = best[2] / "pytorch_lora_weights.safetensors"
        if weights.is_file():
            track.upload_artifact("best adapter", weights)
        return best[1], best[0]

    def _record_point(
        self,
        trial: optuna.Trial,
        params: dict[str, Any],
        ckpt: Checkpoint,
        ev: PointEval,
        values: list[float],
        point_key: str,
    ) -> None:
        attrs: dict[str, Any] = {
            "point_key": point_key,
            "run_trial": trial.number,
            "run_key": trial.user_attrs["run_key"],
            "adapter": _relative(ckpt.path, self.root),
            "images_dir": _relative(ev.images_dir, self.root),
            "n_images": ev.n_images,
            "scores": ev.scores,
            "setting_id": ev.setting.id,
            "scheduler": ev.setting.scheduler,
            **ev.extra,
        }
        self.studies.points.add_trial(
            optuna.trial.create_trial(
                params=point_params(params, ckpt.step, ev.setting),
                distributions=self.distributions,
                values=values,
                user_attrs=attrs,
            )
        )


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the project root when inside it (tables stay portable)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _recorded_point_keys(study: optuna.Study, key: str) -> set[str]:
    return {
        str(t.user_attrs.get("point_key"))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("run_key") == key
    }


def finished_runs(study: optuna.Study) -> int:
    """Runs that count against ``n_trials``: completed, pruned, or failed for a reason."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs)
    )


def _queued_runs(study: optuna.Study) -> int:
    """Runs waiting to start: retries of interrupted or dead runs (and user-enqueued ones)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


class _Budget:
    """Stop when ``n_trials`` runs have finished, counted across every worker of the study.

    A queued run is always run first, even past the budget: it is the retry of a run that
    started (interrupted, or its worker died) and has not finished yet.
    """

    def __init__(self, n_trials: int | None) -> None:
        self.n_trials = n_trials

    def reached(self, study: optuna.Study) -> bool:
        if self.n_trials is None or finished_runs(study) < self.n_trials:
            return False
        return _queued_runs(study) == 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.reached(study):
            study.stop()


def run_sweep(
    cfg: HarnessConfig,
    root: Path,
    backend: SweepBackend,
    tracker: Any | None = None,
) -> SweepSummary:
    """Run (or continue) the sweep until its budget is spent; write the results table.

    Re-running continues the same study: finished runs are not repeated, an interrupted run is
    retried first with the same parameters (its trainer resumes from the last checkpoint).

    Raises:
        SweepError: when the stored study was created with a different configuration.
    """
    from harness.tracking import NullTracker

    tracker = tracker or NullTracker()
    studies = open_studies(cfg, root)
    recover_dead_runs(studies)
    objective = _Objective(cfg, root, studies, backend, tracker)
    budget = _Budget(cfg.sweep.n_trials)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    try:
        if not budget.reached(studies.runs):
            with _sigterm_as_interrupt():
                studies.runs.optimize(
                    objective,
                    n_trials=None,  # the budget callback counts runs of every worker
                    timeout=cfg.sweep.timeout_s,
                    callbacks=[budget],
                    catch=(RunFailed,),
                    gc_after_trial=True,
                )
    finally:
        fail_orphan_proxies(studies)
    logger.info("sweep loop finished in %.1fs", time.perf_counter() - started)
    remove_unkept_adapters(cfg, root, studies)
    summary = summarize(cfg, root, studies)
    summary.started_runs_this_call = objective.started
    return summary


def summarize(cfg: HarnessConfig, root: Path, studies: Studies) -> SweepSummary:
    """Count runs and points, and write the tidy results table."""
    runs = studies.runs.get_trials(deepcopy=False)
    states = [t.state for t in runs]
    csv_path, parquet_path, pareto = write_results(
        studies.points, root / cfg.sweep.dir, objective_names(cfg), root
    )
    return SweepSummary(
        study_name=cfg.sweep.study_name,
        storage=studies.storage_url,
        runs_total=len(runs),
        runs_completed=states.count(TrialState.COMPLETE),
        runs_pruned=states.count(TrialState.PRUNED),
        runs_failed=sum(
            1 for t in runs if t.state == TrialState.FAIL and "fail_reason" in t.user_attrs
        ),
        runs_interrupted=sum(
            1 for t in runs if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs
        ),
        points=len(studies.points.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
        pareto=pareto,
        results_csv=csv_path,
        results_parquet=parquet_path,
    )


def remove_unkept_adapters(cfg: HarnessConfig, root: Path, studies: Studies) -> None:
    """Delete checkpoints of finished runs that ``sweep.keep_adapters`` does not keep (before the
    results table is written, so that its rows mark them removed)."""
    if cfg.sweep.keep_adapters == "all":
        return
    objectives = objective_names(cfg)
    front = pareto_rows(points_frame(studies.points, objectives), objectives)
    keep_points = front if cfg.sweep.keep_adapters == "pareto" else front[:1]
    keep = {(root / p["adapter"]).resolve() for p in keep_points if p["adapter"]}
    for trial in studies.runs.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
    ):
        run_dir = trial.user_attrs.get("run_dir")
        if not run_dir:
            continue
        for ckpt in sorted((Path(run_dir) / "checkpoints").glob("step-*")):
            if ckpt.resolve() not in keep and ckpt.is_dir():
                shutil.rmtree(ckpt, ignore_errors=True)
