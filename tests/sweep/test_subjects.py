"""Sweeps across subjects (``data.subjects``) with one fake backend per subject: each
configuration trained once per subject, points scored by the mean over subjects, per-subject
rows, pruning after the first subjects, and another subject list being another study."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from optuna.trial import TrialState

from harness.config import ConfigError, HarnessConfig, InferenceSetting, Rung, load_config
from harness.sweep import open_studies, run_sweep
from harness.sweep._base import PointScores
from harness.sweep.results import MEAN_SUBJECT
from harness.sweep.study import study_id
from harness.sweep.subjects import (
    SubjectsBackend,
    mean_over_subjects,
    step_stride,
    subject_adapters,
)
from harness.train import CheckpointInfo

from .fakes import FakeBackend
from .test_sweep_logic import make_cfg

SUBJECTS = ["dog", "teapot", "cat2"]
OFFSETS = {"dog": 0.0, "teapot": -0.1, "cat2": 0.05}
POINTS_PER_RUN = 2 * 4  # 2 checkpoints x (2 guidance x 2 LoRA scales)


class SubjectFake(FakeBackend):
    """The fake backend, its scores shifted by the subject's offset."""

    def __init__(self, offset: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offset = offset

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
        rung: Rung | None = None,
        reuse: Sequence[PointScores] = (),
    ) -> list[PointScores]:
        points = super().evaluate(cfg, checkpoint, settings, out_dir, rung, reuse)
        for point in points:
            point.scores = {k: v + self.offset for k, v in point.scores.items()}
        return points


def subjects_cfg(tmp_path: Path, subjects: list[str] | None = None, **sweep: Any) -> HarnessConfig:
    data = make_cfg(tmp_path, **sweep).to_dict()
    data["data"].update(source="folder", subjects=subjects or SUBJECTS)
    return HarnessConfig.model_validate(data)


def backends(**kwargs: Any) -> dict[str, SubjectFake]:
    return {name: SubjectFake(OFFSETS[name], **kwargs) for name in SUBJECTS}


def test_every_point_is_the_mean_over_subjects_and_keeps_each_subjects_scores(
    tmp_path: Path,
) -> None:
    cfg = subjects_cfg(tmp_path, n_trials=2, keep_adapters="all")
    fakes = backends()
    summary = run_sweep(cfg, tmp_path, SubjectsBackend(fakes))

    # Each configuration is trained once per subject, never more.
    assert summary.runs_completed == 2
    assert all(len(fake.trained) == 2 for fake in fakes.values())
    frame = pd.read_parquet(summary.results_parquet)
    assert len(frame) == 2 * POINTS_PER_RUN and (frame["subjects"] == 3).all()

    table = pd.read_parquet(tmp_path / cfg.sweep.dir / "subjects.parquet")
    assert len(table) == len(frame) * (len(SUBJECTS) + 1)
    for point, rows in table.groupby("point"):
        mean = rows[rows["subject"] == MEAN_SUBJECT].iloc[0]
        per = rows[rows["subject"] != MEAN_SUBJECT].set_index("subject")
        assert sorted(per.index) == sorted(SUBJECTS)
        for metric in ("dino", "clip_i", "clip_t"):
            values = per[f"score.{metric}"]
            assert mean[f"score.{metric}"] == pytest.approx(values.mean())
            # The subjects differ by their offsets: the fake's own score plus the offset.
            assert values["teapot"] == pytest.approx(values["dog"] - 0.1)
            # The interval is across subjects: a 95% t-interval around the mean.
            half = 4.302652729911275 * values.std(ddof=1) / math.sqrt(3)
            assert mean[f"score.{metric}_hi"] == pytest.approx(values.mean() + half)
        row = frame[frame["point"] == point].iloc[0]
        assert row["score.dino"] == pytest.approx(mean["score.dino"])
        # Each subject's adapter is its own training run's checkpoint.
        adapters = subject_adapters(tmp_path / row["adapter"])
        assert {
            n: str(p.resolve().relative_to(tmp_path.resolve())) for n, p in adapters.items()
        } == (per["adapter"].to_dict())
        for name, adapter in adapters.items():
            assert adapter.parent.parent.name == name
            assert (adapter / "pytorch_lora_weights.safetensors").is_file()

    images = pd.read_parquet(tmp_path / cfg.sweep.dir / "per_image.parquet")
    assert set(images["subject"]) == set(SUBJECTS)
    assert len(images) == len(frame) * 4 * len(SUBJECTS)


def test_a_configuration_is_pruned_after_its_first_subject(tmp_path: Path) -> None:
    lrs = [1e-4, 2e-4, 3e-4, 0.5]
    cfg = subjects_cfg(
        tmp_path, pruner="median", n_trials=4, space={"learning_rate": {"choices": lrs}}
    )
    runs_study = open_studies(cfg, tmp_path).runs
    for lr in lrs:  # three healthy runs first (the pruner's baseline), the hopeless one last
        runs_study.enqueue_trial({"train.learning_rate": lr})
    fakes = backends(hopeless_lr=0.5, flat=True)
    summary = run_sweep(cfg, tmp_path, SubjectsBackend(fakes))

    runs = open_studies(cfg, tmp_path).runs.get_trials()
    pruned = [t for t in runs if t.state == TrialState.PRUNED]
    assert [t.params["train.learning_rate"] for t in pruned] == [0.5]
    assert "subject 'dog' (1 of 3)" in pruned[0].user_attrs["prune_reason"]
    assert summary.runs_pruned == 1 and summary.runs_completed == 3
    # The hopeless configuration trained on the first subject only, and only to step 10.
    assert [t["learning_rate"] for t in fakes["dog"].trained] == lrs
    assert [t["learning_rate"] for t in fakes["teapot"].trained] == lrs[:3]
    assert fakes["dog"].checkpoints_seen[-1] == 10
    # The proxy steps of later subjects follow the first subject's: no two meet.
    stride = step_stride(cfg)
    reported = {k for k in runs[0].user_attrs if k.startswith("proxy.step-")}
    assert reported == {
        f"proxy.step-{i * stride + s}" for i in range(len(SUBJECTS)) for s in (10, 20)
    }


def test_another_subject_list_is_another_study(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = subjects_cfg(tmp_path, n_trials=1)
    run_sweep(cfg, tmp_path, SubjectsBackend(backends()))
    fewer = subjects_cfg(tmp_path, subjects=["dog", "teapot"], n_trials=1)
    assert study_id(fewer, tmp_path) != study_id(cfg, tmp_path)
    with caplog.at_level(logging.INFO, logger="harness.sweep.study"):
        studies = open_studies(fewer, tmp_path)
    assert not studies.runs.trials
    assert f"differs from study {study_id(cfg, tmp_path)}" in caplog.text
    assert "data.subjects" in caplog.text.split("differs from study")[1]
    assert len(open_studies(cfg, tmp_path).runs.trials) == 1  # the old study is kept


def test_keep_adapters_removes_every_subjects_adapter_of_an_unkept_point(tmp_path: Path) -> None:
    cfg = subjects_cfg(tmp_path, n_trials=2, keep_adapters="best")
    summary = run_sweep(cfg, tmp_path, SubjectsBackend(backends()))
    frame = pd.read_parquet(summary.results_parquet)
    kept = frame[~frame["adapter_removed"]]
    assert 1 <= kept["adapter"].nunique() < frame["checkpoint_step"].size
    left = sorted(tmp_path.glob("**/subjects/*/checkpoints/step-*"))
    assert len(left) == kept["adapter"].nunique() * len(SUBJECTS)


def test_mean_over_subjects_interval_and_rows() -> None:
    setting = InferenceSetting(guidance_scale=5.0)
    points = {
        name: PointScores(
            setting,
            {"dino": value, "dino_lo": 0.0, "dino_hi": 1.0},
            Path(f"/r/eval/{name}/x"),
            2,
            per_image=[{"prompt": "p", "dino": value}],
            seconds={"generate": 1.0},
        )
        for name, value in (("a", 0.1), ("b", 0.2), ("c", 0.3))
    }
    mean = mean_over_subjects(points)
    assert mean.scores["dino"] == pytest.approx(0.2)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert mean.scores["dino_lo"] == pytest.approx(0.2 - half)
    assert mean.scores["dino_hi"] == pytest.approx(0.2 + half)
    assert mean.n_images == 6 and mean.seconds == {"generate": 3.0}
    assert [r["subject"] for r in mean.per_image] == ["a", "b", "c"]
    assert mean.images_dir == Path("/r/eval") and set(mean.subjects) == {"a", "b", "c"}
    one = mean_over_subjects({"a": points["a"]})
    assert one.scores["dino"] == one.scores["dino_lo"] == one.scores["dino_hi"] == 0.1


def test_bad_subject_lists_and_protocols_are_errors_naming_the_key(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    root = Path(__file__).resolve().parents[2]
    cases = {
        "{subjects: [dog]}": r"data: data\.subjects needs source 'folder'",
        "{source: folder, subjects: [dog, dog]}": r"data\.subjects: names a subject twice: dog",
        "{source: folder, subjects: []}": r"data\.subjects: must name at least one subject",
        "{source: folder, subjects: [../etc]}": r"data\.subjects\.0: String should match",
        "{source: folder, subjects: every}": r"data\.subjects: .*'all'",
    }
    cases = {f"data: {value}": message for value, message in cases.items()}
    cases.update(
        {
            "evaluate: {protocol: dreambench}": (
                r"evaluate\.protocol 'dreambench' needs data\.source"
            ),
            "evaluate: {protocol: paper}": (
                r"evaluate\.protocol: must be one of 'sweep' or 'dreambench'"
            ),
            (
                "data: {source: dreambench, dreambench_dir: b}\n"
                "evaluate: {protocol: dreambench, prompts: ['a {token}']}"
            ): r"leave evaluate\.prompts unset",
        }
    )
    for value, message in cases.items():
        params.write_text(f"preset: tiny-cpu\n{value}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=message) as err:
            load_config(params, root=root)
        assert str(params) in str(err.value)


def test_the_tracker_gets_each_subjects_scores_and_the_summary_a_breakdown(
    tmp_path: Path,
) -> None:
    from harness.sweep.summary import subject_breakdown
    from harness.tracking.base import NullRun, Run

    from .test_recorder import RecordingTracker

    tables: dict[str, pd.DataFrame] = {}

    class TablesTracker(RecordingTracker):
        def start_run(self, name: str, **kwargs: Any) -> Run:
            inner = super().start_run(name, **kwargs)

            class _Run(type(inner)):  # type: ignore[misc]
                def log_table(self, title: str, series: str, table: Any, step: int = 0) -> None:
                    tables[title] = table

            assert isinstance(inner, NullRun)
            return _Run()

    cfg = subjects_cfg(tmp_path, n_trials=1)
    tracker = TablesTracker()
    summary = run_sweep(cfg, tmp_path, SubjectsBackend(backends()), tracker)
    # The summary task's per-subject table: where each top point is weak.
    assert list(tables["subjects"].columns) == ["point", MEAN_SUBJECT, *sorted(SUBJECTS)]
    titles = {title for title, _, _ in tracker.scalars}
    for name in SUBJECTS:
        assert any(t.startswith(f"eval-subject/{name}/") for t in titles), titles
    # The proxy of the second subject is logged after the first one's steps.
    proxy_steps = sorted({step for title, _, step in tracker.scalars if title == "proxy"})
    assert proxy_steps == [i * step_stride(cfg) + s for i in range(3) for s in (10, 20)]

    board = subject_breakdown(summary.points_study, summary.frame, "dino")
    assert list(board.columns) == ["point", MEAN_SUBJECT, *sorted(SUBJECTS)]
    assert len(board) == POINTS_PER_RUN
    row = board.iloc[0]
    assert row[MEAN_SUBJECT] == pytest.approx(sum(row[n] for n in SUBJECTS) / 3)
    assert row["teapot"] == pytest.approx(row["dog"] - 0.1)


def test_the_dreambench_protocol_confirms_on_each_subjects_prompts_with_four_images(
    tmp_path: Path,
) -> None:
    from harness.sweep.confirm import confirmation_config

    data = subjects_cfg(tmp_path).to_dict()
    data["data"].update(source="dreambench", dreambench_dir="bench")
    data["evaluate"]["protocol"] = "dreambench"
    cfg = HarnessConfig.model_validate(data)
    fresh = confirmation_config(cfg)
    assert fresh.eval.prompt_source == "dataset"
    assert fresh.eval.images_per_prompt == 4 and fresh.eval.seed > cfg.eval.seed
    data["evaluate"]["images_per_prompt"] = 2
    assert confirmation_config(HarnessConfig.model_validate(data)).eval.images_per_prompt == 2


def test_adaptive_evaluation_promotes_on_the_mean_and_reuses_each_subjects_images(
    tmp_path: Path,
) -> None:
    data = subjects_cfg(tmp_path, n_trials=1).to_dict()
    data["sweep"]["evaluation"] = {"rungs": [{"prompts": 1}], "keep_fraction": 0.25}
    data["eval"].update(prompts=["a photo of {token} {class_name}", "a {token} on a beach"])
    data["eval"]["images_per_prompt"] = 2
    cfg = HarnessConfig.model_validate(data)
    fakes = backends()
    summary = run_sweep(cfg, tmp_path, SubjectsBackend(fakes))

    frame = pd.read_parquet(summary.results_parquet)
    full = frame[frame["fidelity"] == 1.0]
    assert len(frame) == POINTS_PER_RUN and len(full) == 2  # ceil(0.25 x 8)
    assert (full["n_images"] == 4 * len(SUBJECTS)).all()
    # Every subject generated 1 image per point at the rung, then the 3 each promoted point
    # lacked: the rung's image was reused on every subject.
    assert all(f.generated_images == POINTS_PER_RUN + 2 * 3 for f in fakes.values())
    table = pd.read_parquet(tmp_path / cfg.sweep.dir / "subjects.parquet")
    for point in full["point"]:
        rows = table[(table["point"] == point) & (table["subject"] != MEAN_SUBJECT)]
        row = full[full["point"] == point].iloc[0]
        assert row["score.dino"] == pytest.approx(rows["score.dino"].mean())


def test_each_subjects_validation_images_are_tracked_under_its_name_after_its_steps(
    tmp_path: Path,
) -> None:
    from .test_recorder import ImageTracker, ValidatingBackend

    class ValidatingSubject(ValidatingBackend, SubjectFake):
        pass

    cfg = subjects_cfg(tmp_path, n_trials=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"validation_steps": 20})})
    tracker = ImageTracker()
    fakes = {name: ValidatingSubject(OFFSETS[name]) for name in SUBJECTS}
    run_sweep(cfg, tmp_path, SubjectsBackend(fakes), tracker)
    stride = step_stride(cfg)
    assert [(t, step) for t, _, step, _ in tracker.images if t.startswith("validation")] == [
        (f"validation/{name}", i * stride + 20) for i, name in enumerate(SUBJECTS)
    ]
