"""The sweep loop: one training run per sampled configuration, many evaluated points per run.

For each run the worker

1. asks ``S.runs`` for training parameters (sampler: TPE, NSGA-II, random or grid);
2. trains the LoRA once, to ``max_steps``, saving checkpoints at ``train.checkpoint_steps``;
3. at every checkpoint runs a cheap proxy evaluation and lets the pruner (on ``S.proxy``) stop
   hopeless runs early;
4. for a surviving run, evaluates every checkpoint under every inference setting of
   ``sweep.inference`` on the same loaded pipeline (``sweep.evaluation``: all at the full
   protocol, or adaptively, see :mod:`harness.sweep.adaptive`);
5. tells ``S.runs`` the values of the run's representative point (the highest objective sum,
   or weighted objective).

Steps and inference scales therefore cost generation and scoring, never retraining. Every
step is an event for the :class:`~harness.sweep.recorder.Recorder`; this module records
nothing itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from harness.config import VALIDATION_KEYS, HarnessConfig, InferenceSetting, Rung, identity_dump
from harness.errors import HarnessError, counted, error_text
from harness.sweep._base import (
    PointScores,
    RunEnd,
    RunSpec,
    ScoredPoint,
    SweepBackend,
    SweepSink,
    run_folder,
)
from harness.sweep.adaptive import evaluate_points
from harness.sweep.claims import Claims, open_claims
from harness.sweep.environment import (
    ENVIRONMENT_ATTR,
    join_environment,
    join_model,
    software_versions,
)
from harness.sweep.recorder import Recorder, ResultsTable, StudySink, TrackerSink
from harness.sweep.results import remove_unkept_adapters
from harness.sweep.retry import StorageUnreachable, unreachable_in
from harness.sweep.space import (
    TRAIN_PREFIX,
    active_training_params,
    inference_settings,
    never_sampled,
    run_budget,
    run_inference_settings,
    sample_training_params,
    with_training_params,
)
from harness.sweep.study import (
    BUDGET_ATTR,
    WORKER_ATTR,
    Studies,
    SweepError,
    fail_orphan_proxies,
    given_up_runs,
    open_studies,
    recover_dead_runs,
)
from harness.sweep.summary import SweepSummary, summarize
from harness.sweep.worker import Worker
from harness.tracking.base import NullTracker, Tracker, TrackingError
from harness.train import CheckpointInfo
from metrics.errors import MetricsError

if TYPE_CHECKING:
    from harness.train.validation import ValidationImages

__all__ = ["finished_runs", "has_work", "objective_values", "run_key", "run_sweep", "scalarize"]

logger = logging.getLogger(__name__)


# Not the run's fault, and the sweep cannot go on: Ctrl-C or SIGTERM, strict tracking that lost
# its server, a database unreachable past sweep.storage_retry_s. The run is queued again as is.
_STOPS = (KeyboardInterrupt, TrackingError, StorageUnreachable)
# The user's input or machine (a missing file, the scorer's weights, a full disk, a file in the
# way): every run would meet it whatever its settings, so the sweep stops at the first instead of
# spending its budget, and the run is queued again for after the fix.
_USER_ERRORS = (HarnessError, MetricsError, OSError)


class RunFailed(Exception):
    """A training run failed; recorded with its reason, the sweep goes on."""


class NotRun(Exception):
    """The trial trained nothing: its configuration is another trial's run (a duplicate), or
    the budget was spent by other workers meanwhile. Recorded as such; costs no budget."""


def run_key(cfg: HarnessConfig) -> str:
    """Stable id of a training run: what it trains on and how (not the inference settings)."""
    payload = {
        "model": identity_dump("model", cfg.model, {"device", "cache_dir"}),
        "data": identity_dump("data", cfg.data),
        "train": identity_dump("train", cfg.train, {"output_dir", *VALIDATION_KEYS}),
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


class _Stops:
    """SIGINT and SIGTERM as a KeyboardInterrupt, held back while a run's end is recorded.

    A stop that lands in the middle of the record (the tables rewritten, the artifact
    uploaded) turned a completed run into a failed trial, or lost an interrupted run's retry;
    ``sweep launch --local`` workers even get each Ctrl-C twice (the terminal's and the one the
    launcher passes on). Held back, it is raised once Optuna has the trial's state.
    """

    def __init__(self) -> None:
        self.holding = False
        self.pending: str | None = None

    def handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.holding:
            self.pending = self.pending or name
            return
        raise KeyboardInterrupt(name)

    def hold(self) -> None:
        """Hold stops back until :meth:`release` (a run's end is being recorded)."""
        self.holding = True

    def release(self) -> str | None:
        """Stop holding; the signal that arrived meanwhile, if any (its name)."""
        pending, self.holding, self.pending = self.pending, False, None
        return pending


@contextmanager
def _sigterm_as_interrupt(stops: _Stops) -> Iterator[None]:
    """SIGTERM (cluster pre-emption, ``kill``) ends the run like Ctrl-C: recorded, re-queued;
    both are held back while a run's end is recorded (:class:`_Stops`).

    A worker of ``harness sweep launch --local`` also takes Ctrl-C when the launcher was
    started in the background: such a process inherits SIGINT ignored, so the SIGINT the
    launcher passes on did nothing (the launcher's own Ctrl-C is what the user meant).
    """
    from harness.sweep.launch import LOCAL_LAUNCH_ENV

    try:
        previous = signal.signal(signal.SIGTERM, stops.handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is not signal.SIG_IGN or os.environ.get(LOCAL_LAUNCH_ENV):
        signal.signal(signal.SIGINT, stops.handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


class _Objective:
    """The function Optuna optimises on ``S.runs``: one training run and its evaluation."""

    def __init__(
        self,
        cfg: HarnessConfig,
        root: Path,
        backend: SweepBackend,
        studies: StudySink,
        recorder: Recorder,
        claims: Claims,
        worker: str,
        budget: _Budget,
    ) -> None:
        self.cfg, self.root, self.backend = cfg, root, backend
        self.studies, self.recorder = studies, recorder
        self.claims, self.worker, self.budget = claims, worker, budget
        self.settings = inference_settings(cfg)
        self.environment = software_versions()  # recorded on every run this worker makes
        self.started = 0
        self.stops = _Stops()  # installed as the signal handlers by _optimize
        self.duplicates_in_a_row = 0
        self.failures_in_a_row = 0  # unexpected errors of this worker's runs, in a row

    def __call__(self, trial: optuna.Trial) -> list[float] | float:
        run = self._new_run(trial)
        self._claim(run)
        # Which worker ran this attempt (the claim moves to a retry's worker; status counts
        # each attempt for its own).
        trial.set_user_attr(WORKER_ATTR, self.worker)
        trial.set_user_attr(ENVIRONMENT_ATTR, self.environment)
        self.started += 1
        self.duplicates_in_a_row = 0
        logger.info("run %d (%s): %s", run.number, run.key, run.params)
        unexpected = False
        try:
            self.recorder.run_started(run)
            end = self._train_and_evaluate(run)
            self.stops.hold()  # until Optuna has the trial's state (_optimize releases)
        except _STOPS as exc:
            self.stops.hold()  # a second Ctrl-C must not cut the retry's record short
            self.recorder.run_finished(run, RunEnd("interrupted", _reason(exc)))
            raise
        except _USER_ERRORS as exc:
            self.stops.hold()
            self.recorder.run_finished(run, RunEnd("interrupted", _reason(exc)))
            raise SweepError(
                f"run {run.number} ({run.key}): {error_text(exc)}\nthe sweep stopped: any run "
                "would meet this error; fix it and run the sweep again (finished runs are "
                f"kept; run {run.number} runs first)"
            ) from exc
        except Exception as exc:  # a bug: its traceback is the report
            self.stops.hold()
            logger.exception("run %d failed", run.number)
            end, unexpected = RunEnd("failed", _reason(exc)), True
        finally:
            # Only after a run that trained (Optuna's gc_after_trial would also collect after
            # every skipped duplicate draw).
            self.backend.release()
        self.recorder.run_finished(run, end)
        self._count_failures(run, end, unexpected)
        if end.status == "pruned":
            raise optuna.TrialPruned(end.reason)
        if end.status != "completed" or end.best is None:
            raise RunFailed(end.reason)
        return end.best.values if len(end.best.values) > 1 else end.best.values[0]

    def _count_failures(self, run: RunSpec, end: RunEnd, unexpected: bool) -> None:
        """Stop after ``sweep.max_failures_in_a_row`` unexpected failures in a row (the run is
        recorded as failed first): a bug or a broken setup would spend the whole budget."""
        self.failures_in_a_row = self.failures_in_a_row + 1 if unexpected else 0
        limit = self.cfg.sweep.max_failures_in_a_row
        if limit is None or self.failures_in_a_row < limit:
            return
        raise SweepError(
            f"{self.failures_in_a_row} runs in a row failed with an unexpected error (the last, "
            f"run {run.number}: {end.reason}); the sweep stopped, as this looks like a bug or a "
            "broken setup rather than bad settings: see the tracebacks above "
            "(sweep.max_failures_in_a_row sets how many; null never stops)"
        )

    def _claim(self, run: RunSpec) -> None:
        """Own ``run.key`` before training, or raise :class:`NotRun` (see harness.sweep.claims)."""
        # A retry of a run that never claimed (its worker died first, or an old study) must
        # not be refused for budget: queued retries always run.
        retry = _is_retry(run.trial)
        if not retry and self.budget.past_deadline():  # checked again here: no claim after it
            run.trial.set_user_attr("not_run", "time budget spent")
            raise NotRun("the time budget (sweep.timeout_s) is spent")
        limit = None if retry else self.budget.limit
        outcome = self.claims.claim(run.key, run.number, self.worker, limit)
        if outcome.status == "claimed":
            return
        if outcome.status == "budget":
            run.trial.set_user_attr("not_run", "budget spent by other workers")
            raise NotRun("the budget was spent by other workers meanwhile")
        holder = outcome.holder
        assert holder is not None
        if holder.trial == run.number:  # our own claim, committed before a lost connection
            return
        # A queued retry of the holder: its run has ended (it is queued when the run stops),
        # even while the trial still shows RUNNING for the moment before Optuna marks it.
        ended = run.trial.user_attrs.get("retry_of") == holder.trial
        if (ended or self._is_dead(holder.trial)) and self.claims.take_over(
            run.key, holder.trial, run.number, self.worker
        ):
            logger.info("run %d takes over run %d (%s)", run.number, holder.trial, run.key)
            return
        # The grid proposes every combination, unused (conditional) parameters included, and
        # ends when its budget (the distinct configurations) is spent: its repeats are no sign
        # of a space exhausted.
        if self.cfg.sweep.sampler != "grid":
            self.duplicates_in_a_row += 1
        run.trial.set_user_attr("duplicate_of", holder.trial)
        run.trial.set_user_attr("run_key", run.key)
        raise NotRun(f"configuration {run.key} is run {holder.trial}'s (trained once per study)")

    def _is_dead(self, number: int) -> bool:
        """Did trial ``number`` stop without a result (interrupted, or its worker died)?"""
        trial = _trial_by_number(self.studies.studies.runs, number)
        if trial is None:
            return True
        if trial.state == TrialState.WAITING:
            return True
        if trial.state != TrialState.FAIL or _recorded_outcome(trial):
            return False
        # A run given up after its worker died too often failed for good: not to be retrained.
        return number not in given_up_runs(self.studies.studies.runs)

    def _new_run(self, trial: optuna.Trial) -> RunSpec:
        params = sample_training_params(trial, self.cfg)
        run_cfg = with_training_params(self.cfg, params)
        key = run_key(run_cfg)
        run_dir = run_folder(self.root / self.cfg.sweep.dir, self.studies.studies.name, key)
        return RunSpec(trial.number, key, params, run_cfg, run_dir, trial)

    def _train_and_evaluate(self, run: RunSpec) -> RunEnd:
        proxy_s: dict[int, float] = {}

        def on_checkpoint(ckpt: CheckpointInfo) -> bool:
            started = time.perf_counter()
            out_dir = run.run_dir / "proxy" / f"step-{ckpt.step}"
            scores = self.backend.proxy_scores(run.cfg, ckpt.path, out_dir)
            self.recorder.proxy_scored(run, ckpt.step, scores, scalarize(self.cfg, scores))
            proxy_s[ckpt.step] = time.perf_counter() - started
            return self.studies.should_prune(run)

        def on_log(values: Mapping[str, Any], step: int) -> None:
            self.recorder.log(run, values, step)

        def on_validation(images: ValidationImages) -> None:
            self.recorder.validated(run, images)

        started = time.perf_counter()
        outcome = self.backend.train(run.cfg, run.run_dir, on_checkpoint, on_log, on_validation)
        train_s = time.perf_counter() - started - sum(proxy_s.values())
        if outcome.status == "pruned":
            return RunEnd("pruned", outcome.reason or "proxy score below the pruner's bar")
        if outcome.status == "failed":  # NaN loss, out of memory: what some settings do
            reason = outcome.reason or "training failed"
            logger.warning("run %d failed: %s", run.number, reason)
            return RunEnd("failed", reason)
        best = self._evaluate(run, outcome.checkpoints, train_s, proxy_s)
        return RunEnd("completed", best=best, score=scalarize(self.cfg, best.measured.scores))

    def _evaluate(
        self,
        run: RunSpec,
        checkpoints: Sequence[CheckpointInfo],
        train_s: float,
        proxy_s: Mapping[int, float],
    ) -> ScoredPoint:
        """Evaluate every checkpoint under every setting (``sweep.evaluation``: all of them at
        the full protocol, or adaptively); return the representative point, the best
        full-fidelity one.

        Each point's ``seconds`` get the run's training time and its checkpoint's proxy time
        (this call trained the run; a resumed run counts what this call trained)."""
        best: tuple[float, ScoredPoint] | None = None

        def evaluate(
            ckpt: CheckpointInfo,
            settings: Sequence[InferenceSetting],
            rung: Rung | None,
            reuse: Sequence[PointScores],
        ) -> list[PointScores]:
            out_dir = run.run_dir / "eval" / f"step-{ckpt.step:06d}"
            # Only adaptive evaluation passes these (a backend may implement only the full
            # protocol, for exhaustive sweeps).
            extra: dict[str, Any] = {"rung": rung} if rung is not None else {}
            if reuse:
                extra["reuse"] = reuse
            started = time.perf_counter()
            measured_all = self.backend.evaluate(run.cfg, ckpt, settings, out_dir, **extra)
            evaluate_s = (time.perf_counter() - started) / max(1, len(measured_all))
            for measured in measured_all:
                measured.seconds = dict(measured.seconds or {"evaluate": evaluate_s})
            return measured_all

        def record(ckpt: CheckpointInfo, measured: PointScores) -> None:
            nonlocal best
            measured.seconds = {
                "train": train_s,
                "proxy": proxy_s.get(ckpt.step, 0.0),
                **measured.seconds,
            }
            point = self._point(run, ckpt, measured)
            self.recorder.point_scored(point)
            score = scalarize(self.cfg, measured.scores)
            if measured.rung is None and (best is None or score > best[0]):
                best = (score, point)

        settings = run_inference_settings(run.cfg, self.settings)
        evaluate_points(self.cfg, checkpoints, settings, evaluate, record)
        if best is None:
            raise RuntimeError("training produced no checkpoint to evaluate")
        return best[1]

    def _point(self, run: RunSpec, ckpt: CheckpointInfo, measured: PointScores) -> ScoredPoint:
        return ScoredPoint(run, ckpt, measured, objective_values(self.cfg, measured.scores))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C says nothing; SIGTERM names itself
        return f"KeyboardInterrupt: {exc or 'Ctrl-C'}"
    return f"{type(exc).__name__}: {exc}"


def _recorded_outcome(trial: optuna.trial.FrozenTrial) -> bool:
    """A failed trial that is final: failed for a reason, a duplicate, or not run."""
    return any(k in trial.user_attrs for k in ("fail_reason", "duplicate_of", "not_run"))


def _is_retry(trial: optuna.Trial) -> bool:
    """Is ``trial`` the retry of an interrupted or dead run?"""
    if "retry_of" in trial.user_attrs:
        return True
    frozen = trial.study._storage.get_trial(trial._trial_id)
    return "failed_trial" in frozen.system_attrs


def _trial_by_number(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial | None:
    trials = study.get_trials(deepcopy=False)
    return trials[number] if 0 <= number < len(trials) else None


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
    """``sweep.n_trials`` and ``sweep.timeout_s``, held across every worker of the study.

    A run costs one unit when its worker claims the run key (harness.sweep.claims), so racing
    workers cannot exceed ``n_trials``; a finite search space (a grid, or only choices) caps it
    at its size. The time budget counts from the study's first start, whoever started it.
    A queued run (the retry of an interrupted or dead run) always runs, even past the budget.
    """

    def __init__(self, cfg: HarnessConfig, studies: Studies, claims: Claims) -> None:
        self.claims = claims
        limit = run_budget(cfg)
        if limit is not None and limit != cfg.sweep.n_trials:
            logger.info(
                "the search space has %d configurations: the budget is %d runs", limit, limit
            )
        self.limit = limit
        studies.runs.set_user_attr(BUDGET_ATTR, limit)  # for `harness sweep status`
        started = studies.runs.user_attrs.get("started_at")
        if started is None:
            started = time.time()
            studies.runs.set_user_attr("started_at", started)
        self.deadline = _deadline(cfg, started)

    def past_deadline(self) -> bool:
        """``sweep.timeout_s`` has passed since the study's first start."""
        return _past(self.deadline)

    def spent(self) -> bool:
        """No new run may start (queued retries still may)."""
        return _budget_spent(self.deadline, self.limit, self.claims)


def _deadline(cfg: HarnessConfig, started: float | None) -> float | None:
    """When ``sweep.timeout_s`` runs out for a study first started at ``started``."""
    if cfg.sweep.timeout_s is None or started is None:
        return None
    return started + cfg.sweep.timeout_s


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


def _budget_spent(deadline: float | None, limit: int | None, claims: Claims) -> bool:
    """No new run may start: the deadline has passed or ``limit`` runs are claimed."""
    return _past(deadline) or (limit is not None and claims.used() >= limit)


def run_sweep(
    cfg: HarnessConfig,
    root: Path,
    backend: SweepBackend,
    tracker: Tracker | None = None,
    *,
    studies: Studies | None = None,
    sinks: Sequence[SweepSink] = (),
    summary_task: bool = True,
    model: Mapping[str, str] | None = None,
) -> SweepSummary:
    """Run (or continue) the sweep until its budget is spent; record everything on the way.

    Events go to the Optuna studies, the tracker (``None``: not tracked; ``summary_task=False``,
    a plain worker: its runs only, no summary task), the results table and any extra
    ``sinks``. Re-running continues the same study: finished runs are not repeated;
    interrupted and dead runs are retried first with the same parameters (the trainer resumes
    from the last checkpoint). ``model`` is the identity of the loaded model's weights
    (:func:`harness.models.identity.model_identity`; None: none loaded, nothing checked).

    Raises:
        SweepError: when the stored study was created with a different configuration or
            other model weights.
    """
    studies = studies or open_studies(cfg, root)
    claims = open_claims(studies.storage_url, studies.name, cfg.sweep.storage_retry_s)
    claims.adopt(_runs_before_claims(studies.runs, cfg))
    join_environment(studies.runs, claims)  # settles the first worker's versions, warns on others
    if model is not None:  # before the worker joins: a refused one leaves no trace
        join_model(studies.runs, model, claims)  # settles the first weights, refuses others
    worker = Worker.join(cfg, studies, claims)
    study_sink = StudySink(cfg, root, studies)
    tracker_sink = TrackerSink(cfg, tracker or NullTracker(), summary_task=summary_task)
    recorder = Recorder([study_sink, tracker_sink, ResultsTable(cfg, root, studies), *sinks])
    for problem in never_sampled(cfg):
        logger.warning("%s; search the parent too, or drop the parameter", problem)
    budget = _Budget(cfg, studies, claims)
    objective = _Objective(cfg, root, backend, study_sink, recorder, claims, worker.name, budget)
    try:
        with worker.alive():
            _optimize(cfg, studies, objective, budget, worker)
    except BaseException as exc:
        recorder.sweep_stopped(exc)
        raise
    finally:
        fail_orphan_proxies(studies)
    remove_unkept_adapters(cfg, root, studies)
    references = _study_references(
        studies, lambda: backend.references(cfg, root / cfg.sweep.dir / "references")
    )
    summary = summarize(cfg, root, studies, references)
    summary.started_runs_this_call = objective.started
    recorder.sweep_finished(summary)
    return summary


_REFERENCES_ATTR = "references"


def has_work(cfg: HarnessConfig, studies: Studies) -> bool:
    """Whether a worker joining ``studies`` now could need the models: the run budget or the
    time budget is not spent, a run is queued or still going (its worker may die, and this one
    would retry it), or the study's reference scores are not stored yet. False only when every
    one is certain, so a late worker of an array job, or ``dvc repro`` on a finished study,
    summarises it without loading a pipeline (minutes and gigabytes on a GPU)."""
    runs = studies.runs
    if _stored_references(studies) is None:
        return True
    if runs.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        return True
    started = runs.user_attrs.get("started_at")
    deadline = _deadline(cfg, started if isinstance(started, (int, float)) else None)
    # A study from before the claims table has none yet (run_sweep adopts its runs): work.
    claims = open_claims(studies.storage_url, studies.name, cfg.sweep.storage_retry_s)
    return not _budget_spent(deadline, run_budget(cfg), claims)


def _stored_references(studies: Studies) -> dict[str, dict[str, float]] | None:
    """The reference scores a worker stored in the study (None: not computed yet)."""
    stored = studies.runs.user_attrs.get(_REFERENCES_ATTR)
    return stored if isinstance(stored, dict) and stored else None


def _study_references(
    studies: Studies, compute: Callable[[], dict[str, dict[str, float]]]
) -> dict[str, dict[str, float]]:
    """The base model's and the real photos' scores, computed once per study and kept in it:
    the study's identity fixes the model, the data settings and the protocol, so every worker's
    summary shows the same bounds without generating them again."""
    stored = _stored_references(studies)
    if stored is not None:
        return stored
    references = compute()
    studies.runs.set_user_attr(_REFERENCES_ATTR, references)
    return references


def _runs_before_claims(study: optuna.Study, cfg: HarnessConfig) -> dict[str, int]:
    """``{run key: trial}`` of the runs a study holds (claimed again once, for old studies).

    A run is held under its recorded key and under the key this code gives its parameters:
    a study from before the conditional space recorded (and keyed) children its run never
    used, e.g. ``text_encoder_lr`` without text-encoder training, and must not train that
    configuration a second time."""
    held: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("run_key")
        skipped = "duplicate_of" in t.user_attrs or "not_run" in t.user_attrs
        final = t.state != TrialState.FAIL or "fail_reason" in t.user_attrs
        if key and not skipped and final:
            held.setdefault(str(key), t.number)
            current = _current_key(cfg, t.params)
            if current is not None:
                held.setdefault(current, t.number)
    return held


def _current_key(cfg: HarnessConfig, params: Mapping[str, Any]) -> str | None:
    """The run key of a stored trial's training parameters without the unused ones (None: it
    recorded none, or they no longer make a valid configuration, e.g. a dropped parameter)."""
    training = {
        k.removeprefix(TRAIN_PREFIX): v for k, v in params.items() if k.startswith(TRAIN_PREFIX)
    }
    used = active_training_params(training, cfg.train)
    if used == training:  # every trial since the conditional space: its recorded key
        return None
    try:
        return run_key(with_training_params(cfg, used))
    except (ValueError, TypeError):  # ConfigError is a ValueError
        return None


_MAX_DUPLICATES_IN_A_ROW = 25
_OPTUNA_FILTER_INSTALLED = False


def _optuna_failure_line(record: logging.LogRecord) -> bool:
    """Optuna's warning for a trial whose objective raised: the sweep logs each run's end
    itself (a duplicate is no failure; a bug's traceback is logged once, not twice; Ctrl-C is
    one line, not Optuna's traceback of the KeyboardInterrupt)."""
    message = record.getMessage()
    return message.startswith("Trial ") and (
        "failed with parameters" in message or message.endswith("failed with value None.")
    )


def _quiet_optuna_failures() -> None:
    global _OPTUNA_FILTER_INSTALLED
    if not _OPTUNA_FILTER_INSTALLED:
        # On the logger that logs them: a parent logger's filters never see its children's
        # records.
        for name in ("optuna", optuna.study._optimize.__name__):
            optuna.logging.get_logger(name).addFilter(
                lambda record: not _optuna_failure_line(record)
            )
        _OPTUNA_FILTER_INSTALLED = True


def _log_budget_spent(budget: _Budget) -> None:
    if budget.past_deadline():
        assert budget.deadline is not None
        logger.info(
            "the time budget is spent: sweep.timeout_s ran out at %s (counted from the "
            "study's first start, by any worker)",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(budget.deadline)),
        )
    else:
        # What the study holds, which an earlier sweep with a larger budget may have raised.
        logger.info(
            "the run budget is spent: %s claimed, budget %s",
            counted(budget.claims.used(), "run"),
            budget.limit,
        )


def _optimize(
    cfg: HarnessConfig, studies: Studies, objective: _Objective, budget: _Budget, worker: Worker
) -> None:
    """Pull runs of the shared study until the budget (every worker's runs) is spent.

    Between runs the worker fails the runs of dead workers (stale heartbeats), which queues
    their retry, and runs queued retries first. With the budget spent it waits while other
    workers' runs are still going: if one of those workers dies, this one finishes its run.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_optuna_failures()
    started = time.perf_counter()
    poll = min(5.0, max(0.5, cfg.sweep.heartbeat_interval_s / 2))
    with _sigterm_as_interrupt(objective.stops):
        while True:
            running = worker.running(studies.runs)  # one look per turn: one claims query
            recover_dead_runs(studies, running.dead)
            if _queued_runs(studies.runs) == 0 and budget.spent():
                if not running.live:
                    _log_budget_spent(budget)
                    break
                time.sleep(poll)  # other workers' runs: finish them if their workers die
                continue
            try:
                studies.runs.optimize(
                    objective, n_trials=1, catch=(RunFailed, NotRun), gc_after_trial=False
                )
            except Exception as exc:
                # Optuna, failing to record the stopped trial on a database that is down, may
                # raise an error of its own from the StorageUnreachable: the user's is the one.
                unreachable = unreachable_in(exc)
                if unreachable is None or unreachable is exc:
                    raise
                raise unreachable from None
            finally:
                held = objective.stops.release()
            if held is not None:  # arrived while the run's end was recorded: stop now
                raise KeyboardInterrupt(held)
            if objective.duplicates_in_a_row >= _MAX_DUPLICATES_IN_A_ROW:
                logger.warning(
                    "the sampler proposed %d configurations in a row that already ran; "
                    "stopping (widen sweep.space or lower sweep.n_trials)",
                    objective.duplicates_in_a_row,
                )
                break
    logger.info("sweep loop finished in %.1fs", time.perf_counter() - started)
