"""What a sweep's records promise (issue 17, items 11, 13, 14): a resume never mixes points of
another setup, no trial is left RUNNING, and no results row points at a deleted adapter."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from harness.config import HarnessConfig
from harness.sweep import open_studies, run_sweep
from harness.sweep.study import study_id

from .fakes import FakeBackend
from .test_sweep_logic import make_cfg


def _with(cfg: HarnessConfig, **sections: dict[str, Any]) -> HarnessConfig:
    data = cfg.to_dict()
    for name, values in sections.items():
        if name == "top":
            data.update(values)
        else:
            data[name] = {**data[name], **values}
    return HarnessConfig.model_validate(data)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"train": {"lr_scheduler": "cosine"}}, "train"),
        ({"train": {"prior_preservation": True}}, "train"),
        ({"train": {"train_text_encoder": True}}, "train"),
        ({"train": {"checkpoint_steps": [5, 20]}}, "train"),
        ({"data": {"resolution": 128, "min_side": 64}}, "data"),
        ({"data": {"token": "zwx"}}, "data"),
        ({"data": {"val_fraction": 0.5}}, "data"),
        ({"top": {"seed": 5}}, "seed"),
        ({"model": {"pretrained": "tiny://sdxl"}}, "model"),
        ({"model": {"dtype": "bfloat16"}}, "model"),
        ({"eval": {"seed": 3}}, "eval"),
        ({"eval": {"resolution": 32}}, "eval"),
    ],
)
def test_another_meaning_of_a_point_opens_a_new_study(
    tmp_path: Path,
    change: dict[str, dict[str, Any]],
    named: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = make_cfg(tmp_path, n_trials=1)
    run_sweep(cfg, tmp_path, FakeBackend())
    changed = _with(cfg, **change)
    assert study_id(changed) != study_id(cfg)
    with caplog.at_level(logging.INFO, logger="harness.sweep.study"):
        studies = open_studies(changed, tmp_path)
    assert studies.name == study_id(changed) and not studies.runs.trials
    message = caplog.text
    assert f"differs from study {study_id(cfg)}" in message
    assert any(line.strip().startswith(f"{named}") for line in message.splitlines()), message
    # The old study is untouched and comes back with the old config.
    assert len(open_studies(cfg, tmp_path).runs.trials) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"sweep": {"n_trials": 9}},  # the budget
        {"sweep": {"keep_adapters": "all"}},
        {"eval": {"batch_size": 1}},  # images never depend on their batch
        {"metrics": {"batch_size": 2}},
        {"train": {"output_dir": "elsewhere"}},
        {"model": {"device": "cpu"}},
        {"data": {"prepared_dir": "moved/prepared"}},
        {"tracking": {"mode": "offline"}},
        {"train": {"learning_rate": 0.5}},  # searched: the fixed value is never used
        {"train": {"gradient_checkpointing": True}},  # memory, not weights: a smaller GPU
        {"train": {"export_kohya": True}},  # a file format (export converts it anyway)
    ],
)
def test_resume_with_what_does_not_change_a_point_is_accepted(
    tmp_path: Path, change: dict[str, dict[str, Any]]
) -> None:
    cfg = make_cfg(tmp_path, n_trials=1)
    run_sweep(cfg, tmp_path, FakeBackend())
    assert study_id(_with(cfg, **change)) == study_id(cfg)
    assert len(open_studies(_with(cfg, **change), tmp_path).runs.trials) == 1


def _running(study: optuna.Study) -> list[int]:
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_stale_run_is_finished_even_when_the_budget_is_used_up(tmp_path: Path) -> None:
    """A run whose worker died (RUNNING, heartbeat stale) is retried by the next `harness sweep`
    although no new run may start, and its proxy twin is not left RUNNING."""
    cfg = make_cfg(tmp_path, n_trials=1, heartbeat_interval_s=1, grace_period_s=2)
    studies = open_studies(cfg, tmp_path)
    # What a killed worker leaves: a RUNNING run with parameters, and its RUNNING proxy twin.
    dead = studies.runs.ask(
        {
            "train.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True),
            "train.rank": optuna.distributions.CategoricalDistribution([2, 4]),
        }
    )
    proxy = studies.proxy.ask()
    dead.set_user_attr("proxy_trial", proxy.number)
    studies.runs._storage.record_heartbeat(dead._trial_id)  # type: ignore[attr-defined]
    run_sweep(make_cfg(tmp_path, n_trials=1), tmp_path, FakeBackend())  # uses up the budget
    time.sleep(2.5)  # past the grace period: the dead run is stale
    backend = FakeBackend()
    summary = run_sweep(cfg, tmp_path, backend)
    assert len(backend.trained) == 1, "the stale run was not retried"
    assert backend.trained[0]["learning_rate"] == pytest.approx(dead.params["train.learning_rate"])
    studies = open_studies(cfg, tmp_path)
    assert _running(studies.runs) == [] and _running(studies.proxy) == []
    assert summary.runs_completed == 2
    assert studies.proxy.trials[proxy.number].state == TrialState.FAIL


class _TrackerThatFails:
    """A tracker whose runs cannot start (e.g. strict tracking and the server went away)."""

    def preflight(self) -> str:
        return "online"

    def start_run(self, *args: Any, **kwargs: Any) -> Any:
        from harness.tracking import TrackingError

        raise TrackingError("ClearML server went away (tracking.strict is true)")


def test_tracking_failure_leaves_no_running_trial(tmp_path: Path) -> None:
    from harness.tracking import TrackingError

    cfg = make_cfg(tmp_path, n_trials=2)
    with pytest.raises(TrackingError):
        run_sweep(cfg, tmp_path, FakeBackend(), _TrackerThatFails())  # type: ignore[arg-type]
    studies = open_studies(cfg, tmp_path)
    assert _running(studies.runs) == [] and _running(studies.proxy) == []


@pytest.mark.parametrize("keep", ["pareto", "best"])
def test_no_results_row_points_at_a_deleted_adapter(tmp_path: Path, keep: str) -> None:
    cfg = make_cfg(tmp_path, n_trials=3, keep_adapters=keep)
    summary = run_sweep(cfg, tmp_path, FakeBackend())
    for path in (summary.results_parquet, summary.results_csv):
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        kept = frame[frame["adapter"].notna()]
        assert len(kept) and len(kept) < len(frame), "some adapters are kept, some removed"
        for adapter in kept["adapter"]:
            assert (tmp_path / adapter / "pytorch_lora_weights.safetensors").is_file(), adapter
        removed = frame[frame["adapter"].isna()]
        assert removed["adapter_removed"].all() and not kept["adapter_removed"].any()
    summary_json = (tmp_path / "runs/sweep/summary.json").read_text()
    for row in summary.pareto:
        assert row["adapter"] is None or (tmp_path / row["adapter"]).is_dir(), summary_json


def test_studies_name_their_objectives_for_optuna_dashboard(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, n_trials=1)
    run_sweep(cfg, tmp_path, FakeBackend())
    url = f"sqlite:///{tmp_path / 'runs/sweep/study.db'}"
    name = study_id(cfg)
    for study, metrics in ((name, ["dino", "clip_t"]), (f"{name}.runs", ["dino", "clip_t"])):
        assert optuna.load_study(study_name=study, storage=url).metric_names == metrics
    proxy = optuna.load_study(study_name=f"{name}.proxy", storage=url)
    assert proxy.metric_names == ["proxy score"]


def test_a_study_whose_stored_signature_disagrees_is_refused(tmp_path: Path) -> None:
    """Defence in depth: a study id whose stored configuration differs (a hash collision, a
    hand-edited study) is refused with every difference listed, never mixed."""
    from harness.sweep import SweepError
    from harness.sweep.study import SIGNATURE_ATTR

    cfg = make_cfg(tmp_path, n_trials=1)
    studies = open_studies(cfg, tmp_path)
    tampered = {**studies.runs.user_attrs[SIGNATURE_ATTR], "seed": 99}
    studies.runs.set_user_attr(SIGNATURE_ATTR, tampered)
    with pytest.raises(SweepError) as info:
        open_studies(cfg, tmp_path)
    assert "seed: 99 -> 0" in str(info.value)


def _photos(folder: Path, seeds: list[int]) -> None:
    """Distinct phone-sized photos (noise: no two are near duplicates)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        pixels = np.random.default_rng(seed).integers(0, 255, (96, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo-{seed}.png")


def test_other_photos_with_the_same_settings_open_a_new_study(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Photos replaced in data/raw and prepared again, every setting unchanged: the next sweep
    trains afresh instead of reporting the old photos' runs, and says why. (Bug: the study's
    identity held only settings, so the old results came back.)"""
    from harness.data import prepare_subject

    data = {"source": "folder", "subject": "toy", "class_name": "toy", "resolution": 32}
    cfg = _with(make_cfg(tmp_path, n_trials=1), data={**data, "min_side": 32})
    raw = tmp_path / "data/raw/toy"
    _photos(raw, [1, 2, 3, 4])
    prepare_subject(cfg.data, tmp_path, progress=False)
    run_sweep(cfg, tmp_path, FakeBackend())
    old = study_id(cfg, tmp_path)

    (raw / "photo-4.png").unlink()
    _photos(raw, [5])
    prepare_subject(cfg.data, tmp_path, progress=False)
    backend = FakeBackend()
    with caplog.at_level(logging.INFO, logger="harness.sweep.study"):
        summary = run_sweep(cfg, tmp_path, backend)
    assert len(backend.trained) == 1 and summary.runs_completed == 1
    assert study_id(cfg, tmp_path) != old
    assert f"differs from study {old}" in caplog.text
    assert "photos" in caplog.text.split("differs from study")[1], caplog.text
    # The same photos again: the first study, resumed.
    (raw / "photo-5.png").unlink()
    _photos(raw, [4])
    prepare_subject(cfg.data, tmp_path, progress=False)
    assert study_id(cfg, tmp_path) == old
    again = FakeBackend()
    run_sweep(cfg, tmp_path, again)
    assert again.trained == []


def test_the_study_diff_names_space_bounds_without_optuna_s_json_layout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Later checkpoint steps widen the evaluated ``checkpoint_step`` dimension: the diff said
    ``space.checkpoint_step.attributes.high``, Optuna's serialisation, not a name a user knows."""
    cfg = make_cfg(tmp_path, n_trials=1)
    run_sweep(cfg, tmp_path, FakeBackend())
    changed = _with(cfg, train={"checkpoint_steps": [10, 20, 30], "max_steps": 30})
    with caplog.at_level(logging.INFO, logger="harness.sweep.study"):
        open_studies(changed, tmp_path)
    assert "space.checkpoint_step.high: 20 -> 30" in caplog.text, caplog.text
    assert "attributes" not in caplog.text


def test_a_run_whose_worker_dies_every_time_is_given_up_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A configuration that gets its worker killed (the kernel's OOM killer sends SIGKILL) is
    queued again twice; the third death is final. Optuna then drops it without a word: the
    budget counted it, the summary called it "interrupted and retried" and no retry came."""
    from harness.sweep.study import RetryDeadRun, given_up_runs

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    retry = RetryDeadRun(max_retry=2)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for death in (1, 2, 3):
        study.tell(trial.number, state=TrialState.FAIL)
        with caplog.at_level(logging.WARNING):
            retry(study, study.get_trials(deepcopy=False)[trial.number])
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if death < 3:
            assert len(waiting) == 1 and given_up_runs(study) == {}
            trial = study.ask()  # the retry, as the next worker takes it
            continue
        assert waiting == []
    reason = given_up_runs(study)[trial.number]
    assert "died 3 times" in reason and "not retried again" in reason
    assert f"run {trial.number}: its worker died 3 times" in caplog.text
    # Each death that is retried is said, whichever way it was found (on SQLite, Optuna's
    # own heartbeat check found them without a word).
    assert caplog.text.count("its worker is gone; it is queued again") == 2


def test_the_summary_counts_runs_not_attempts(tmp_path: Path) -> None:
    """A run stopped (Ctrl-C, a dead worker) and retried is one training run, not two: the
    summary, metrics.json and the report said 19 training runs of a 12-run budget."""
    from harness.sweep.study import RetryDeadRun
    from harness.sweep.summary import summarize

    cfg = make_cfg(tmp_path, n_trials=4)
    studies = open_studies(cfg, tmp_path)
    runs = studies.runs
    dist = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}

    def finish(trial: optuna.Trial) -> None:
        runs.tell(trial, [0.5, 0.5] if len(runs.directions) == 2 else 0.5)

    finish(runs.ask(dist))  # run 1: completed at once
    stopped = runs.ask(dist)  # run 2: Ctrl-C, queued again by the recorder, then completed
    runs.tell(stopped, state=TrialState.FAIL)
    runs.enqueue_trial(stopped.params, user_attrs={"retry_of": stopped.number})
    finish(runs.ask())
    dead = runs.ask(dist)  # run 3: its worker died three times
    retry = RetryDeadRun(max_retry=2)
    for _ in range(3):
        runs.tell(dead, state=TrialState.FAIL)
        retry(runs, runs.get_trials(deepcopy=False)[dead.number])
        if runs.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            dead = runs.ask()
    running = runs.ask(dist)  # run 4: still training in another worker
    summary = summarize(cfg, tmp_path, studies)
    assert summary.runs_total == 4
    assert (summary.runs_completed, summary.runs_failed, summary.runs_open) == (2, 1, 1)
    assert summary.runs_interrupted == 3  # attempts that were retried: 1 Ctrl-C, 2 deaths
    text = summary.describe()
    assert text.startswith("4 training runs (2 completed, 0 pruned, 1 failed, 1 running or queued)")
    assert "3 interrupted attempts retried" in text
    assert running.number not in {t.number for t in runs.get_trials(states=(TrialState.FAIL,))}


def test_a_study_has_work_until_its_budget_is_spent_and_nothing_is_queued_or_running(
    tmp_path: Path,
) -> None:
    """What decides whether `harness sweep` loads the models at all (a late worker of an array
    job, or `dvc repro` on a finished study, summarises it without them)."""
    from harness.sweep.runner import has_work

    cfg = make_cfg(tmp_path, n_trials=2)
    assert has_work(cfg, open_studies(cfg, tmp_path))  # a new study
    run_sweep(cfg, tmp_path, FakeBackend())
    studies = open_studies(cfg, tmp_path)
    assert not has_work(cfg, studies)
    assert has_work(_with(cfg, sweep={"n_trials": 3}), open_studies(cfg, tmp_path))
    assert not has_work(_with(cfg, sweep={"n_trials": 1}), studies)  # over budget already
    # A queued retry (an interrupted run), or a run still going (its worker may die: this one
    # then retries it), is work.
    done = studies.runs.get_trials(deepcopy=False)[0]
    studies.runs.enqueue_trial(done.params)
    assert has_work(cfg, studies)
    (waiting,) = studies.runs.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    storage = studies.runs._storage  # type: ignore[attr-defined]
    storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)
    assert has_work(cfg, studies)
    storage.set_trial_state_values(waiting._trial_id, TrialState.FAIL)
    assert not has_work(cfg, studies)
    # The base model's reference scores are computed once per study, with the models.
    studies.runs.set_user_attr("references", {})
    assert has_work(cfg, studies)


def test_a_finished_study_is_summarised_by_a_backend_that_is_never_built(
    tmp_path: Path,
) -> None:
    from harness.sweep._base import LazyBackend

    cfg = make_cfg(tmp_path, n_trials=1)
    first = run_sweep(cfg, tmp_path, FakeBackend())
    built: list[int] = []

    def build() -> FakeBackend:
        built.append(1)
        return FakeBackend()

    again = run_sweep(cfg, tmp_path, LazyBackend(build))
    assert built == [] and again.points == first.points and again.references == first.references
    raised = _with(cfg, sweep={"n_trials": 2})
    run_sweep(raised, tmp_path, LazyBackend(build))
    assert built == [1]  # built once, for the new run
