"""The sweep's vocabulary: one record type per concept, the backend protocol and the sink base.

A sweep point's way through the code::

    config/            HarnessConfig, InferenceSetting (the one definition of a setting)
    sweep/runner.py    asks Optuna for a run, drives the backend, emits events
    sweep/backend.py   trains and evaluates; returns the records below, calls no tracker
    sweep/recorder.py  fans every event out to the sinks: Optuna studies, tracker, results

The training records are the trainer's own (:class:`harness.train.TrainResult`,
:class:`harness.train.CheckpointInfo`), never converted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from harness.config import HarnessConfig, InferenceSetting, Rung
from harness.train import CheckpointInfo, TrainResult

if TYPE_CHECKING:
    import optuna

    from harness.train.validation import ValidationCallback, ValidationImages

__all__ = [
    "LazyBackend",
    "PointScores",
    "RunEnd",
    "RunSpec",
    "ScoredPoint",
    "SweepBackend",
    "SweepSink",
    "run_folder",
]


def run_folder(sweep_dir: Path, study: str, key: str) -> Path:
    """The folder of run ``key`` of ``study`` under ``sweep_dir`` (``<root>/<sweep.dir>``).

    Per study: another configuration's run of the same training settings keeps its own
    evaluation outputs. Always rebuilt from the root at hand, never read back from the study:
    copies of a project on one shared study (``dvc exp run --temp``, a moved project) each
    own the folders under their root, whichever copy trained the run.
    """
    return sweep_dir / "runs" / (study or "study") / key


@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep: its trial, sampled parameters and resolved config."""

    number: int  # the trial number in ``S.runs``
    key: str  # stable id of what is trained (see :func:`harness.sweep.runner.run_key`)
    params: dict[str, Any]  # sampled ``train.*`` values, without the prefix
    cfg: HarnessConfig  # the config with ``params`` applied
    run_dir: Path
    trial: optuna.Trial = field(repr=False, compare=False)


@dataclass
class PointScores:
    """What the backend measured for one checkpoint under one inference setting."""

    setting: InferenceSetting
    scores: dict[str, float]  # metric -> value, with ``<metric>_lo``/``_hi`` intervals
    images_dir: Path
    n_images: int
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    grid: Path | None = None  # a prompts x seeds image grid, when the backend wrote one
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the identifier policy
    # One row per scored image, in generation order: ``template``, ``prompt``, ``seed``,
    # ``image`` (its path), ``dino``, ``clip_i``, ``clip_t`` (see harness.sweep.per_image).
    per_image: list[dict[str, Any]] = field(default_factory=list)
    # Wall seconds per phase; the backend gives ``generate`` and ``score`` (or ``evaluate``),
    # the runner adds ``train`` (the run's, shared by its points) and ``proxy`` (the
    # checkpoint's). The results table's ``seconds.*`` columns.
    seconds: dict[str, float] = field(default_factory=dict)
    # Adaptive evaluation (``sweep.evaluation``): the share of the full protocol's images the
    # scores rest on (1: the full protocol), the rung that measured them (None: the full
    # protocol), the scores of the point's earlier rungs, and the backend's own image records,
    # which the next rung reuses instead of generating them again.
    fidelity: float = 1.0
    rung: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    generated: list[Any] = field(default_factory=list, repr=False)
    # A multi-subject sweep (``data.subjects``): each subject's own record of the point, whose
    # mean the scores are (see harness.sweep.subjects).
    subjects: dict[str, PointScores] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ScoredPoint:
    """An evaluated point: training run x checkpoint step x inference setting, with its
    objective values. What the studies, the tracker and the results table record."""

    run: RunSpec
    checkpoint: CheckpointInfo
    measured: PointScores
    values: list[float]  # the study's objective values

    @property
    def key(self) -> str:
        """``<run key>/<step>/<setting id>``: unique per point, across workers and resumes."""
        return f"{self.run.key}/{self.checkpoint.step}/{self.measured.setting.id}"


@dataclass(frozen=True)
class RunEnd:
    """How a training run ended, with its representative point when it was evaluated."""

    status: Literal["completed", "pruned", "failed", "interrupted"]
    reason: str | None = None
    best: ScoredPoint | None = None  # highest objective sum (or weighted objective)
    score: float | None = None  # the scalarised value of ``best``


class SweepBackend(Protocol):
    """Training, generation and scoring (the real one in :mod:`harness.sweep.backend`; tests
    use fakes). It returns records and reports nothing itself."""

    def train(
        self,
        cfg: HarnessConfig,
        run_dir: Path,
        on_checkpoint: Callable[[CheckpointInfo], bool],
        on_log: Callable[[Mapping[str, Any], int], None],
        on_validation: ValidationCallback | None = None,
    ) -> TrainResult:
        """Train to ``cfg.train.max_steps``; stop early when ``on_checkpoint`` returns True.
        ``on_validation`` gets each round of ``train.validation_steps`` images."""
        ...

    def proxy_scores(self, cfg: HarnessConfig, adapter: Path, out_dir: Path) -> dict[str, float]:
        """Cheap scores of one checkpoint (few prompts and seeds, the ``eval`` setting)."""
        ...

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
        rung: Rung | None = None,
        reuse: Sequence[PointScores] = (),
    ) -> list[PointScores]:
        """Evaluation of one checkpoint under every setting: the full protocol, or with
        ``rung`` its first prompts and seeds only. ``reuse`` holds earlier rungs' points of
        the same checkpoint, whose images need not be generated again. Only adaptive
        evaluation passes ``rung`` and ``reuse``."""
        ...

    def references(self, cfg: HarnessConfig, out_dir: Path) -> dict[str, dict[str, float]]:
        """Scores that make the others readable: ``baseline`` (no adapter), ``real_ceiling``."""
        ...

    def release(self) -> None:
        """Free what the last run held (called after every run that trained)."""
        ...


class LazyBackend:
    """A :class:`SweepBackend` built by ``build`` on first use: given to a sweep that may have
    nothing left to do (:func:`harness.sweep.runner.has_work`), which then loads no model."""

    def __init__(self, build: Callable[[], SweepBackend]) -> None:
        self._build = build
        self._backend: SweepBackend | None = None

    @property
    def backend(self) -> SweepBackend:
        """The backend, built now if it was not yet."""
        if self._backend is None:
            self._backend = self._build()
        return self._backend

    def train(
        self,
        cfg: HarnessConfig,
        run_dir: Path,
        on_checkpoint: Callable[[CheckpointInfo], bool],
        on_log: Callable[[Mapping[str, Any], int], None],
        on_validation: ValidationCallback | None = None,
    ) -> TrainResult:
        """:meth:`SweepBackend.train` of the built backend."""
        return self.backend.train(cfg, run_dir, on_checkpoint, on_log, on_validation)

    def proxy_scores(self, cfg: HarnessConfig, adapter: Path, out_dir: Path) -> dict[str, float]:
        """:meth:`SweepBackend.proxy_scores` of the built backend."""
        return self.backend.proxy_scores(cfg, adapter, out_dir)

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
        rung: Rung | None = None,
        reuse: Sequence[PointScores] = (),
    ) -> list[PointScores]:
        """:meth:`SweepBackend.evaluate` of the built backend."""
        return self.backend.evaluate(cfg, checkpoint, settings, out_dir, rung, reuse)

    def references(self, cfg: HarnessConfig, out_dir: Path) -> dict[str, dict[str, float]]:
        """:meth:`SweepBackend.references` of the built backend."""
        return self.backend.references(cfg, out_dir)

    def release(self) -> None:
        """Nothing to free before the backend exists."""
        if self._backend is not None:
            self._backend.release()


class SweepSink:
    """Receives the sweep's events; every method is a no-op here, a sink overrides what it
    records. Subscribe new sinks (a report, a cluster status page) to the recorder instead of
    adding calls to the runner."""

    def run_started(self, run: RunSpec) -> None:
        """A training run starts (before training)."""

    def log(self, run: RunSpec, values: Mapping[str, Any], step: int) -> None:
        """A training log record (loss, learning rates, throughput) at ``step``."""

    def proxy_scored(
        self, run: RunSpec, step: int, scores: Mapping[str, float], value: float
    ) -> None:
        """The proxy evaluation of the checkpoint at ``step``; ``value`` is what prunes."""

    def point_scored(self, point: ScoredPoint) -> None:
        """One evaluated point."""

    def validated(self, run: RunSpec, images: ValidationImages) -> None:
        """A round of validation images (``train.validation_steps``) while the run trains."""

    def run_finished(self, run: RunSpec, end: RunEnd) -> None:
        """The run ended (completed, pruned, failed or interrupted)."""

    def sweep_finished(self, summary: Any) -> None:
        """This worker's sweep loop ended; ``summary`` is the :class:`SweepSummary`."""

    def sweep_stopped(self, error: BaseException) -> None:
        """This worker's sweep loop stopped early with ``error`` (Ctrl-C, a user error), which
        is raised next; no summary follows."""
