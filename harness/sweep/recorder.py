"""One recorder, many sinks: every event of the sweep goes to the recorder, which hands it to
the Optuna studies, the tracker and the results table (and any sink added later).

The runner never calls a study, a tracker or a file writer for bookkeeping itself; it emits
events (:class:`~harness.sweep._base.SweepSink` lists them) and asks :class:`StudySink` the one
question only a study can answer: should this run be pruned?
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from harness.sweep._base import RunEnd, RunSpec, ScoredPoint, SweepSink
from harness.sweep.environment import study_provenance
from harness.sweep.per_image import write_point_rows, write_score_tables
from harness.sweep.plots import write_plots
from harness.sweep.results import points_frame, write_results, write_subject_results
from harness.sweep.space import point_params
from harness.sweep.study import Studies, objective_names, train_settings
from harness.tracking.base import NullRun, Run, Tracker

if TYPE_CHECKING:
    from harness.config import HarnessConfig
    from harness.sweep.summary import SweepSummary
    from harness.train.validation import ValidationImages

__all__ = ["Recorder", "ResultsTable", "StudySink", "TrackerSink"]

logger = logging.getLogger(__name__)


class Recorder(SweepSink):
    """Fans every event out to ``sinks`` in order.

    ``run_finished`` and ``sweep_finished`` reach every sink even when one of them raises (the
    first error is raised afterwards), so a failing tracker never leaves a study trial RUNNING.
    """

    def __init__(self, sinks: Sequence[SweepSink]) -> None:
        self.sinks = list(sinks)

    def run_started(self, run: RunSpec) -> None:
        for sink in self.sinks:
            sink.run_started(run)

    def log(self, run: RunSpec, values: Mapping[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(run, values, step)

    def proxy_scored(
        self, run: RunSpec, step: int, scores: Mapping[str, float], value: float
    ) -> None:
        for sink in self.sinks:
            sink.proxy_scored(run, step, scores, value)

    def point_scored(self, point: ScoredPoint) -> None:
        for sink in self.sinks:
            sink.point_scored(point)

    def validated(self, run: RunSpec, images: ValidationImages) -> None:
        for sink in self.sinks:
            sink.validated(run, images)

    def run_finished(self, run: RunSpec, end: RunEnd) -> None:
        with _all_then_raise() as call:
            for sink in self.sinks:
                call(sink.run_finished, run, end)

    def sweep_finished(self, summary: Any) -> None:
        with _all_then_raise() as call:
            for sink in self.sinks:
                call(sink.sweep_finished, summary)

    def sweep_stopped(self, error: BaseException) -> None:
        # Never raises: ``error`` is what the user must see.
        for sink in self.sinks:
            try:
                sink.sweep_stopped(error)
            except Exception:
                logger.exception("%s could not record the stop", type(sink).__name__)


@contextmanager
def _all_then_raise() -> Iterator[Any]:
    """Call every function given to the yielded caller; raise the first error at the end."""
    errors: list[BaseException] = []

    def call(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # KeyboardInterrupt too: the other sinks still record
            errors.append(exc)

    yield call
    if errors:
        raise errors[0]


class StudySink(SweepSink):
    """The Optuna side: user attributes of the run trial in ``S.runs``, its proxy twin in
    ``S.proxy`` (reports, pruning, final state) and one completed trial per point in ``S``."""

    def __init__(self, cfg: HarnessConfig, root: Path, studies: Studies) -> None:
        from harness.sweep.space import evaluated_distributions, training_distributions

        self.root, self.studies = root, studies
        self.distributions = {**training_distributions(cfg.sweep), **evaluated_distributions(cfg)}
        self._swept_scheduler = cfg.sweep.inference.scheduler is not None
        self._proxy: dict[int, optuna.Trial] = {}
        self._recorded: dict[int, set[str]] = {}

    def run_started(self, run: RunSpec) -> None:
        run.trial.set_user_attr("run_key", run.key)
        run.trial.set_user_attr("run_dir", str(run.run_dir))
        proxy = self.studies.proxy.ask()
        proxy.set_user_attr("run_key", run.key)
        proxy.set_user_attr("run_trial", run.number)
        run.trial.set_user_attr("proxy_trial", proxy.number)
        self._proxy[run.number] = proxy
        # A retried run re-evaluates its checkpoints; points already in the study stay single.
        self._recorded[run.number] = _recorded_point_keys(self.studies.points, run.key)

    def proxy_scored(
        self, run: RunSpec, step: int, scores: Mapping[str, float], value: float
    ) -> None:
        self._proxy[run.number].report(value, step)
        run.trial.set_user_attr(f"proxy.step-{step}", value)

    def should_prune(self, run: RunSpec) -> bool:
        """The pruner's verdict on the proxy scores reported so far."""
        return self._proxy[run.number].should_prune()

    def point_scored(self, point: ScoredPoint) -> None:
        """A COMPLETE trial for a full-fidelity point; a point that stopped at an adaptive
        rung is PRUNED, with its values, so Optuna's Pareto front holds full-fidelity points
        alone."""
        recorded = self._recorded.setdefault(point.run.number, set())
        if point.key in recorded:
            return
        recorded.add(point.key)
        full = point.measured.rung is None
        params = point_params(
            point.run.params,
            point.checkpoint.step,
            point.measured.setting,
            self._swept_scheduler,
            text_encoder_adapter=point.run.cfg.train.train_text_encoder,
        )
        self.studies.points.add_trial(
            optuna.trial.create_trial(
                params=params,
                # A conditional parameter its parent left unused is not one of this point's.
                distributions={name: self.distributions[name] for name in params},
                values=point.values,
                state=TrialState.COMPLETE if full else TrialState.PRUNED,
                user_attrs=self._point_attrs(point),
            )
        )

    def _point_attrs(self, point: ScoredPoint) -> dict[str, Any]:
        measured = point.measured
        return {
            "point_key": point.key,
            "run_trial": point.run.number,
            "run_key": point.run.key,
            "adapter": relative(point.checkpoint.path, self.root),
            "images_dir": relative(measured.images_dir, self.root),
            "n_images": measured.n_images,
            "scores": measured.scores,
            "seconds": measured.seconds,
            "setting_id": measured.setting.id,
            "scheduler": measured.setting.scheduler,
            "fidelity": measured.fidelity,
            **({} if measured.rung is None else {"rung": measured.rung}),
            **({"rungs": measured.history} if measured.history else {}),
            # The run's own training settings, fixed ones too: columns of the results table.
            "train": train_settings(point.run.cfg),
            **({"subjects": self._subject_attrs(point)} if measured.subjects else {}),
            **measured.extra,
        }

    def _subject_attrs(self, point: ScoredPoint) -> dict[str, dict[str, Any]]:
        """Each subject's scores of a multi-subject point, with its adapter and images."""
        from harness.sweep.subjects import subject_adapters

        adapters = subject_adapters(point.checkpoint.path)
        return {
            name: {
                "scores": one.scores,
                "adapter": relative(adapters[name], self.root),
                "images_dir": relative(one.images_dir, self.root),
                "n_images": one.n_images,
            }
            for name, one in point.measured.subjects.items()
        }

    def run_finished(self, run: RunSpec, end: RunEnd) -> None:
        trial, proxy = run.trial, self._proxy.pop(run.number, None)
        self._recorded.pop(run.number, None)
        if end.status == "interrupted":
            # Not the run's fault: the same parameters run first next time (the trainer resumes
            # from its checkpoint). Counted neither as finished nor as failed.
            trial.set_user_attr("interrupted", True)
            if end.reason:  # e.g. the user error that stopped the sweep
                trial.set_user_attr("interrupt_reason", end.reason[:2000])
            self.studies.runs.enqueue_trial(
                {f"train.{k}": v for k, v in run.params.items()},
                user_attrs={"retry_of": run.number},
            )
        else:
            trial.set_user_attr("status", end.status)
        if end.status == "failed":
            trial.set_user_attr("fail_reason", (end.reason or "training failed")[:2000])
        if end.status == "pruned":
            trial.set_user_attr("prune_reason", end.reason or "proxy score below the pruner's bar")
        if end.best is not None:
            trial.set_user_attr("best_adapter", relative(end.best.checkpoint.path, self.root))
        if proxy is not None:
            self._tell_proxy(proxy, end)

    def _tell_proxy(self, proxy: optuna.Trial, end: RunEnd) -> None:
        if end.status == "completed" and end.score is not None:
            self.studies.proxy.tell(proxy, end.score)
        elif end.status == "pruned":
            self.studies.proxy.tell(proxy, state=TrialState.PRUNED)
        else:
            self.studies.proxy.tell(proxy, state=TrialState.FAIL)


def relative(path: Path, root: Path) -> str:
    """``path`` relative to the project root when inside it (tables stay portable)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _recorded_point_keys(study: optuna.Study, key: str) -> set[str]:
    return {
        str(t.user_attrs.get("point_key"))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.user_attrs.get("run_key") == key
    }


class TrackerSink(SweepSink):
    """One tracker run (a ClearML task) per training run, plus the sweep's summary task.

    Tracking never stops training: the tracker's runs swallow reporting errors. Only starting a
    run under ``tracking.strict`` raises (``TrackingError``), which the runner treats like an
    interruption: the run is re-queued and the sweep stops with the error.
    """

    def __init__(self, cfg: HarnessConfig, tracker: Tracker, summary_task: bool = True) -> None:
        self.cfg, self.tracker, self.summary_task = cfg, tracker, summary_task
        self._runs: dict[int, Run] = {}

    def _run(self, run: RunSpec) -> Run:
        return self._runs.get(run.number) or NullRun("run not started")

    def run_started(self, run: RunSpec) -> None:
        from harness.tracking import default_tags

        name = self.cfg.sweep.study_name
        config = run.cfg.to_dict()
        self._runs[run.number] = self.tracker.start_run(
            f"{name}/run-{run.number:04d}-{run.key}",
            config=config,
            tags=[*default_tags(config), f"sweep:{name}"],
            project=f"{self.cfg.tracking.project}/{name}",
        )

    def log(self, run: RunSpec, values: Mapping[str, Any], step: int) -> None:
        self._run(run).log_scalars(dict(values), step, title="train")

    def proxy_scored(
        self, run: RunSpec, step: int, scores: Mapping[str, float], value: float
    ) -> None:
        for name, score in scores.items():
            self._run(run).log_scalar("proxy", name, score, step)

    def point_scored(self, point: ScoredPoint) -> None:
        track, measured, step = self._run(point.run), point.measured, point.checkpoint.step
        setting = measured.setting.id
        if measured.rung is not None:  # stopped at an adaptive rung: its scores, no media
            for name, score in measured.scores.items():
                track.log_scalar(f"eval-rung-{measured.rung}/{setting}", name, score, step)
            return
        for name, score in measured.scores.items():
            track.log_scalar(f"eval/{setting}", name, score, step)
        for subject, one in measured.subjects.items():
            for name, score in one.scores.items():
                track.log_scalar(f"eval-subject/{subject}/{setting}", name, score, step)
        if measured.grid is not None and measured.grid.is_file():
            track.log_image(f"samples/{setting}", "prompts x seeds", measured.grid, step)
        if measured.per_prompt:
            table = pd.DataFrame(measured.per_prompt)
            track.log_table(f"per-prompt/{setting}", f"step {step}", table, step)

    def validated(self, run: RunSpec, images: ValidationImages) -> None:
        images.log_to(self._run(run))  # as `harness train` logs them

    def run_finished(self, run: RunSpec, end: RunEnd) -> None:
        track = self._runs.pop(run.number, None)
        if track is None:
            return
        if end.best is not None and end.best.checkpoint.weights_path.is_file():
            track.upload_artifact("best adapter", end.best.checkpoint.weights_path)
        track.close()

    def sweep_finished(self, summary: SweepSummary) -> None:
        """The ``summary`` task: leaderboard, figures, counts, references, the results file."""
        from harness.sweep.summary import figures, leaderboard, subject_breakdown

        if not self.summary_task:
            return

        name, objectives = self.cfg.sweep.study_name, objective_names(self.cfg)
        # The packages and model weights beside the config: two sweeps' summary tasks compare
        # them in the tracker's hyperparameters view.
        with self.tracker.start_run(
            f"{name}/summary",
            config={**self.cfg.to_dict(), "provenance": summary.provenance},
            tags=[f"sweep:{name}", "summary"],
            kind="summary",
            project=f"{self.cfg.tracking.project}/{name}",
        ) as run:
            run.log_table("leaderboard", "top points", leaderboard(summary.frame, objectives))
            metric = self.cfg.sweep.subject_metric
            by_subject = subject_breakdown(summary.points_study, summary.frame, metric)
            if not by_subject.empty:  # a sweep across subjects: where each point is weak
                run.log_table("subjects", f"{metric} per subject", by_subject)
            for title, fig in figures(summary.points_study, objectives).items():
                run.log_plotly(title, "sweep", fig)
            counts = {"runs": summary.runs_total, "points": summary.points}
            run.log_scalars({**counts, "pareto": len(summary.pareto)}, 0, title="sweep")
            for kind, scores in summary.references.items():
                run.log_scalars(scores, 0, title=kind)
            run.upload_artifact("results", summary.results_parquet)


class ResultsTable(SweepSink):
    """The tidy results table (``results.{csv,parquet}``, ``summary.json``), the per-image and
    per-prompt score tables (``per_image.parquet``, ``per_prompt.parquet``:
    :mod:`harness.sweep.per_image`) and the DVC plot files (:mod:`harness.sweep.plots`),
    rewritten after every run so they are current while a sweep runs, and the metrics file for
    DVC at the end."""

    def __init__(self, cfg: HarnessConfig, root: Path, studies: Studies) -> None:
        self.cfg, self.root, self.studies = cfg, root, studies
        self.out_dir = root / cfg.sweep.dir
        # Each point's per-image rows, per study: rebuilt into the tables with the study's points.
        self.store = self.out_dir / "scores" / studies.points.study_name

    def point_scored(self, point: ScoredPoint) -> None:
        write_point_rows(self.store, point, self.root)

    def run_finished(self, run: RunSpec, end: RunEnd) -> None:
        objectives = objective_names(self.cfg)
        frame = points_frame(self.studies.points, objectives, self.root)
        provenance = study_provenance(self.studies.runs)
        write_results(frame, self.out_dir, objectives, self.studies.name, provenance)
        write_subject_results(self.studies.points, frame, self.out_dir)
        write_score_tables(frame, self.store, self.out_dir)
        write_plots(self.cfg, frame, self.studies, self.out_dir)

    def sweep_finished(self, summary: SweepSummary) -> None:
        from harness.sweep.summary import write_metrics

        objectives = objective_names(self.cfg)
        name, provenance = self.studies.name, summary.provenance
        write_results(summary.frame, self.out_dir, objectives, name, provenance)
        write_subject_results(self.studies.points, summary.frame, self.out_dir)
        write_score_tables(summary.frame, self.store, self.out_dir)
        write_plots(self.cfg, summary.frame, self.studies, self.out_dir)
        write_metrics(self.cfg, self.root, summary)
