"""The runner emits events to one recorder, which fans them out to every sink (issue 10)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.sweep import Recorder, RunEnd, RunSpec, ScoredPoint, SweepSink, run_sweep
from harness.tracking.base import NullRun, Run, RunKind, Tracker, TrackingMode

from .fakes import FakeBackend
from .test_sweep_logic import make_cfg


class RecordingSink(SweepSink):
    """Writes down every event it receives, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def run_started(self, run: RunSpec) -> None:
        self.events.append(("run_started", run.number))

    def log(self, run: RunSpec, values: Mapping[str, Any], step: int) -> None:
        self.events.append(("log", run.number, step))

    def proxy_scored(
        self, run: RunSpec, step: int, scores: Mapping[str, float], value: float
    ) -> None:
        self.events.append(("proxy_scored", run.number, step))

    def point_scored(self, point: ScoredPoint) -> None:
        setting = point.measured.setting
        self.events.append(
            ("point_scored", point.run.number, point.checkpoint.step, setting.lora_scale)
        )

    def run_finished(self, run: RunSpec, end: RunEnd) -> None:
        self.events.append(("run_finished", run.number, end.status))

    def validated(self, run: RunSpec, images: Any) -> None:
        self.events.append(("validated", run.number, images.step))

    def sweep_finished(self, summary: Any) -> None:
        self.events.append(("sweep_finished", summary.points))


class RecordingTracker(Tracker):
    """A tracker typed on :class:`harness.tracking.base.Tracker` that remembers its runs."""

    def __init__(self) -> None:
        self.started: list[tuple[str, RunKind]] = []
        self.scalars: list[tuple[str, str, int]] = []

    @property
    def mode(self) -> TrackingMode:
        return TrackingMode("off", "test")

    def start_run(
        self,
        name: str,
        *,
        config: Mapping[str, Any],
        tags: Sequence[str] = (),
        kind: RunKind = "train",
        project: str | None = None,
    ) -> Run:
        self.started.append((name, kind))
        tracker = self

        class _Run(NullRun):
            def log_scalar(self, title: str, series: str, value: float, step: int) -> None:
                tracker.scalars.append((title, series, step))

        return _Run()


def test_one_run_emits_the_events_of_its_life_in_order(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, n_trials=1, inference={"guidance_scale": [3.0], "lora_scale": [0.5, 1.0]}
    )
    sink = RecordingSink()
    summary = run_sweep(cfg, tmp_path, FakeBackend(), sinks=[sink])
    assert sink.events == [
        ("run_started", 0),
        ("log", 0, 10),
        ("proxy_scored", 0, 10),
        ("log", 0, 20),
        ("proxy_scored", 0, 20),
        ("point_scored", 0, 10, 0.5),
        ("point_scored", 0, 10, 1.0),
        ("point_scored", 0, 20, 0.5),
        ("point_scored", 0, 20, 1.0),
        ("run_finished", 0, "completed"),
        ("sweep_finished", 4),
    ]
    assert summary.points == 4


def test_a_failed_run_still_finishes_in_every_sink(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, n_trials=1, space={"learning_rate": {"choices": [2e-4]}})
    sink = RecordingSink()
    run_sweep(cfg, tmp_path, FakeBackend(fail_lr=2e-4), sinks=[sink])
    assert sink.events == [
        ("run_started", 0),
        ("run_finished", 0, "failed"),
        ("sweep_finished", 0),
    ]


def test_the_tracker_hears_the_same_events(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, n_trials=1, inference={"guidance_scale": [3.0], "lora_scale": [1.0]})
    tracker = RecordingTracker()
    run_sweep(cfg, tmp_path, FakeBackend(), tracker)
    assert [kind for _, kind in tracker.started] == ["train", "summary"]
    assert tracker.started[0][0].startswith("t/run-0000-")
    titles = {(title, step) for title, _, step in tracker.scalars}
    assert {("proxy", 10), ("proxy", 20)} <= titles
    assert any(title.startswith("eval/g3-u1") and step == 20 for title, step in titles)


def test_run_finished_reaches_every_sink_when_one_raises() -> None:
    class Boom(SweepSink):
        def run_finished(self, run: RunSpec, end: RunEnd) -> None:
            raise RuntimeError("sink failed")

    after = RecordingSink()
    recorder = Recorder([Boom(), after])
    run = RunSpec(7, "k", {}, None, Path(), None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="sink failed"):
        recorder.run_finished(run, RunEnd("failed", "x"))
    assert after.events == [("run_finished", 7, "failed")]


def test_sweep_progress_bar_counts_runs_and_points(tmp_path: Path) -> None:
    import io

    from harness.sweep.progress import SweepProgress

    cfg = make_cfg(tmp_path, n_trials=2)
    out = io.StringIO()
    run_sweep(cfg, tmp_path, FakeBackend(), sinks=[SweepProgress(cfg, file=out)])
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "sweep t" in last and "2/2" in last, last
    assert "16 points" in last, last  # 2 runs x 2 checkpoints x 4 settings


def test_the_progress_bar_total_is_the_budget_a_small_space_caps(tmp_path: Path) -> None:
    """A space of 2 configurations (rank 2 or 4, nothing else) caps ``n_trials: 6`` at 2 runs:
    the bar showed "2/6" at the end of a finished sweep."""
    import io

    from harness.sweep.progress import SweepProgress

    cfg = make_cfg(tmp_path, n_trials=6, sampler="grid", space={"rank": {"choices": [2, 4]}})
    out = io.StringIO()
    run_sweep(cfg, tmp_path, FakeBackend(), sinks=[SweepProgress(cfg, file=out)])
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "2/2" in last, last


def test_a_worker_refused_as_it_joins_draws_no_progress_bar(tmp_path: Path) -> None:
    """Other model weights: the refusal is one line, without a bar drawn above it."""
    import io

    from harness.sweep.progress import SweepProgress
    from harness.sweep.study import SweepError

    cfg = make_cfg(tmp_path, n_trials=1)
    run_sweep(cfg, tmp_path, FakeBackend(), model={"model": "m", "weights": "a" * 64})
    out = io.StringIO()
    more = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"n_trials": 2})})
    with pytest.raises(SweepError, match="these weights"):
        run_sweep(
            more,
            tmp_path,
            FakeBackend(),
            sinks=[SweepProgress(more, done=1, file=out)],
            model={"model": "m", "weights": "b" * 64},
        )
    assert out.getvalue() == ""


def test_a_plain_worker_tracks_its_runs_but_writes_no_summary_task(tmp_path: Path) -> None:
    """``harness sweep worker`` x N gave N summary tasks in ClearML; the summary task is
    ``harness sweep``'s (the results table every worker still rewrites, atomically)."""
    cfg = make_cfg(tmp_path, n_trials=1, inference={"guidance_scale": [3.0], "lora_scale": [1.0]})
    tracker = RecordingTracker()
    summary = run_sweep(cfg, tmp_path, FakeBackend(), tracker, summary_task=False)
    assert [kind for _, kind in tracker.started] == ["train"]
    assert summary.results_parquet.is_file()


class ValidatingBackend(FakeBackend):
    """The fake backend, making ``train.validation_steps`` images as the real trainer does
    (every N steps and after the last one) and handing them to ``on_validation``."""

    def train(self, cfg: Any, run_dir: Path, *args: Any) -> Any:
        from harness.train.validation import ValidationImages

        on_validation = args[2] if len(args) > 2 else None
        every = cfg.train.validation_steps
        if on_validation is not None and every:
            last = cfg.train.max_steps
            for step in sorted({*range(every, last + 1, every), last}):
                folder = run_dir / "validation" / f"step-{step}"
                folder.mkdir(parents=True, exist_ok=True)
                image = folder / "000-0.png"
                image.write_bytes(b"png")
                made = ValidationImages(step, folder, (image,), ("a photo of sks toy",), 0)
                on_validation(made)
        return super().train(cfg, run_dir, *args)


class ImageTracker(RecordingTracker):
    """Also remembers every image its runs log."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, str, int, str]] = []

    def start_run(self, name: str, **kwargs: Any) -> Run:
        run = super().start_run(name, **kwargs)
        tracker = self

        def log_image(title: str, series: str, image: Path, step: int) -> None:
            tracker.images.append((title, series, step, Path(image).name))

        run.log_image = log_image  # type: ignore[method-assign]
        return run


def test_validation_images_of_a_sweep_run_reach_the_sinks_and_the_tracker(
    tmp_path: Path,
) -> None:
    """``train.validation_steps`` in a sweep: each round of images is an event of its run (the
    config promises them in the tracker, as ``harness train`` logs them)."""
    cfg = make_cfg(tmp_path, n_trials=1, inference={"guidance_scale": [3.0], "lora_scale": [1.0]})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"validation_steps": 15})})
    sink, tracker = RecordingSink(), ImageTracker()
    run_sweep(cfg, tmp_path, ValidatingBackend(), tracker, sinks=[sink])
    assert [e for e in sink.events if e[0] == "validated"] == [
        ("validated", 0, 15),
        ("validated", 0, 20),
    ]
    validation = [i for i in tracker.images if i[0] == "validation"]
    assert validation == [
        ("validation", "0: a photo of sks toy", 15, "000-0.png"),
        ("validation", "0: a photo of sks toy", 20, "000-0.png"),
    ]
