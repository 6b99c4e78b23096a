"""The evaluate stage's core with a stub scoring backend: fresh seeds disjoint from the sweep's,
confirmation next to sweep scores with their shrinkage, metrics.json, and its clear errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.config import ConfigError, HarnessConfig, InferenceSetting, seed_spans, validate_config
from harness.generate import eval_seeds
from harness.sweep import PointScores
from harness.sweep.confirm import (
    EvaluateError,
    base_setting,
    confirm_points,
    confirmation_config,
    confirmation_seeds,
    point_setting,
    read_sweep_results,
    selected_points,
    write_confirmation,
)
from harness.train import CheckpointInfo

SETTINGS = [
    InferenceSetting(guidance_scale=3.0, lora_scale=1.0, num_inference_steps=2),
    InferenceSetting(guidance_scale=7.5, lora_scale=0.6, num_inference_steps=2),
]
DROP = {"dino": 0.10, "clip_i": 0.05, "clip_t": 0.02}  # what the stub's fresh seeds lose
# What the base model itself loses from the sweep's seeds to the fresh ones (no selection).
BASE_DROP = {"dino": 0.06, "clip_i": 0.05, "clip_t": -0.01}
SWEPT = [10, 11, 12]  # make_cfg's sweep seeds


def make_cfg(**evaluate: Any) -> HarnessConfig:
    return validate_config(
        {
            "preset": "test",
            "eval": {"images_per_prompt": 3, "seed": 10, "prior_preservation_images": 1},
            "sweep": {"proxy": {"images_per_prompt": 2}},
            "evaluate": {"top_k": 3, **evaluate},
        }
    )


# --- seeds ---------------------------------------------------------------------------------


def test_default_confirmation_seeds_follow_every_sweep_seed() -> None:
    cfg = make_cfg()
    swept, fresh = seed_spans(cfg)
    assert list(swept) == [10, 11, 12] and eval_seeds(cfg) == [10, 11, 12]
    assert confirmation_seeds(cfg) == [13, 14, 15]
    assert not set(swept) & set(fresh)
    more = make_cfg(images_per_prompt=5)  # more confirmation images: still after the sweep's
    assert confirmation_seeds(more) == [13, 14, 15, 16, 17]
    pres = validate_config({"preset": "t", "eval": {"seed": 0, "prior_preservation_images": 6}})
    assert seed_spans(pres)[0] == range(0, 6) and confirmation_seeds(pres)[0] == 6


@pytest.mark.parametrize("seed", [8, 10, 12])
def test_overlapping_user_seed_is_a_config_error_naming_the_key(seed: int) -> None:
    with pytest.raises(ConfigError) as err:
        make_cfg(seed=seed)
    assert "evaluate.seed" in str(err.value) and "overlap" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("seed", [13, 100, 7, -50])
def test_disjoint_user_seed_is_used(seed: int) -> None:
    assert confirmation_seeds(make_cfg(seed=seed)) == [seed, seed + 1, seed + 2]


def test_seeds_are_checked_where_they_are_used() -> None:
    cfg = make_cfg()
    # model_copy skips validation: the check at the point of use still refuses it.
    sneaky = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"seed": 11})})
    with pytest.raises(EvaluateError, match=r"evaluate\.seed"):
        confirmation_seeds(sneaky)


def test_confirmation_config_swaps_only_seeds_and_prompts() -> None:
    cfg = make_cfg(prompts=["a {token} {class_name} on the moon"])
    fresh = confirmation_config(cfg)
    assert eval_seeds(fresh) == confirmation_seeds(cfg)
    assert fresh.eval.prompts == ["a {token} {class_name} on the moon"]
    assert fresh.eval.prompt_source == "config"
    assert fresh.eval.setting == cfg.eval.setting and fresh.train == cfg.train
    assert confirmation_config(make_cfg()).eval.prompts == cfg.eval.prompts


# --- a sweep's results table and a stub backend ---------------------------------------------


def sweep_table(root: Path, cfg: HarnessConfig) -> pd.DataFrame:
    """Four points of one run (two checkpoints x two settings) with adapters on disk;
    point 3 is dominated, the others are on the (dino, clip_t) front."""
    scores = [(0.9, 0.8, 0.20), (0.7, 0.7, 0.30), (0.5, 0.6, 0.40), (0.4, 0.5, 0.25)]
    rows = []
    for point, (dino, clip_i, clip_t) in enumerate(scores):
        step, setting = (10, 20)[point // 2], SETTINGS[point % 2]
        adapter = f"runs/sweep/runs/s/key/checkpoints/step-{step:06d}"
        (root / adapter).mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {
            "point": point,
            "run_key": "key",
            "checkpoint_step": step,
            "train.learning_rate": 1e-4,
            **{f"eval.{k}": v for k, v in setting.dimensions().items()},
            "setting_id": setting.id,
            "scheduler": setting.scheduler,
            "adapter": adapter,
            "adapter_removed": False,
            "pareto": point != 3,
        }
        for metric, value in (("dino", dino), ("clip_i", clip_i), ("clip_t", clip_t)):
            row.update({f"score.{metric}": value, f"score.{metric}_lo": value - 0.05})
            row[f"score.{metric}_hi"] = value + 0.05
        rows.append(row)
    frame = pd.DataFrame(rows)
    (root / cfg.sweep.dir).mkdir(parents=True, exist_ok=True)
    frame.to_parquet(root / cfg.sweep.dir / "results.parquet", index=False)
    return frame


class StubBackend:
    """Confirmation scores = the sweep's minus :data:`DROP`; records what it was asked."""

    def __init__(self, table: pd.DataFrame, root: Path) -> None:
        self.table, self.root = table, root
        self.calls: list[dict[str, Any]] = []
        self.sweep_seeds = [10, 11, 12]  # make_cfg's; confirm() sets its config's
        self.point_change: dict[str, float] = {}  # a point's scores moved since the sweep

    def evaluate(
        self,
        cfg: HarnessConfig,
        checkpoint: CheckpointInfo,
        settings: Sequence[InferenceSetting],
        out_dir: Path,
    ) -> list[PointScores]:
        (setting,) = settings
        self.calls.append(
            {"seeds": eval_seeds(cfg), "prompts": cfg.eval.prompts, "setting": setting.id}
        )
        rel = str(checkpoint.path.relative_to(self.root))
        row = self.table[(self.table["adapter"] == rel) & (self.table["setting_id"] == setting.id)]
        assert len(row) == 1 and int(row["checkpoint_step"].item()) == checkpoint.step
        # On the sweep's seeds a point gives its sweep scores again (unless the code changed).
        again = eval_seeds(cfg) == self.sweep_seeds
        scores = {}
        for metric, drop in DROP.items():
            change = self.point_change.get(metric, 0.0) if again else -drop
            value = float(row[f"score.{metric}"].item()) + change
            scores.update(
                {metric: value, f"{metric}_lo": value - 0.01, f"{metric}_hi": value + 0.01}
            )
        images = out_dir / "images" / setting.id
        images.mkdir(parents=True)
        return [PointScores(setting, scores, images, n_images=6)]

    def references(self, cfg: HarnessConfig, out_dir: Path) -> dict[str, dict[str, float]]:
        """The base model under ``cfg.eval``'s setting: its CLIP-T grows with guidance; on
        the sweep's seeds it scores :data:`BASE_DROP` higher."""
        setting, seeds = cfg.eval.setting, eval_seeds(cfg)
        self.calls.append(
            {"seeds": seeds, "base_prompts": cfg.eval.prompts, "baseline": setting.id}
        )
        base = {"dino": 0.2, "clip_i": 0.3, "clip_t": 0.3 + setting.guidance_scale / 100}
        if seeds == self.sweep_seeds:
            base = {m: value + BASE_DROP[m] for m, value in base.items()}
        return {"baseline": base, "real_ceiling": {"dino": 0.77, "clip_i": 0.88}}


def confirm(
    root: Path, cfg: HarnessConfig, point_change: dict[str, float] | None = None
) -> tuple[Any, StubBackend]:
    table = sweep_table(root, cfg)
    backend = StubBackend(table, root)
    backend.sweep_seeds = eval_seeds(cfg)
    backend.point_change = point_change or {}
    selected = selected_points(cfg, root, read_sweep_results(cfg, root))
    return write_confirmation(
        cfg, root, confirm_points(cfg, root, selected, backend, False)
    ), backend


def test_confirmation_table_has_sweep_and_fresh_scores_and_shrinkage(tmp_path: Path) -> None:
    cfg = make_cfg(prompts=["a {token} {class_name} on the moon"])
    result, backend = confirm(tmp_path, cfg)
    table = pd.read_csv(tmp_path / "runs/evaluate/results.csv")
    assert result.results_csv == tmp_path / "runs/evaluate/results.csv"
    assert pd.read_parquet(result.results_parquet).shape == table.shape
    # The front (0, 1, 2) ranked by dino + clip_t: 1 (1.0), 0 (1.1)... -> 0, 1, 2.
    assert table["point"].tolist() == [0, 1, 2]
    assert table["selected_by"].tolist() == ["pareto"] * 3
    for column in ("run_key", "checkpoint_step", "setting_id", "adapter", "eval.lora_scale"):
        assert column in table.columns
    for metric, drop in DROP.items():
        for prefix in ("score", "confirm"):
            assert {f"{prefix}.{metric}{s}" for s in ("", "_lo", "_hi")} <= set(table.columns)
        shrink = table[f"score.{metric}"] - table[f"confirm.{metric}"]
        assert (table[f"shrinkage.{metric}"] - shrink).abs().max() < 1e-12
        assert (table[f"shrinkage.{metric}"] - drop).abs().max() < 1e-12
    assert (table["confirm.n_images"] == 6).all()
    assert table["confirm.images_dir"].str.startswith("runs/evaluate/point-").all()
    # Fresh seeds and the held-out prompts for every point and the baseline; the sweep's seeds
    # and prompts only for the base model's own shrinkage and the best point's reproduction
    # (the tests after the next).
    fresh = [
        c for c in backend.calls if c.get("base_prompts", c.get("prompts")) != cfg.eval.prompts
    ]
    assert {tuple(c["seeds"]) for c in fresh} == {(13, 14, 15)} and len(fresh) == 3 + 2
    assert not {13, 14, 15} & set(eval_seeds(cfg))
    points = [c for c in backend.calls if "prompts" in c]
    assert len(points) == 3 + 1
    assert all(c["prompts"] == cfg.evaluate.prompts for c in points[:3])
    best, second = SETTINGS[0].id, SETTINGS[1].id
    assert [c["setting"] for c in points] == [best, second, best, best]  # last: the reproduction
    assert points[3]["prompts"] == cfg.eval.prompts and points[3]["seeds"] == eval_seeds(cfg)
    references = json.loads((tmp_path / "runs/evaluate/references.json").read_text())
    assert references["seeds"] == [13, 14, 15]
    assert references["held_out_prompts"] == cfg.evaluate.prompts


def test_metrics_json_has_best_point_sweep_confirmation_shrinkage_and_references(
    tmp_path: Path,
) -> None:
    result, _ = confirm(tmp_path, make_cfg())
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert result.metrics_path == tmp_path / "reports/metrics.json"
    assert metrics["best_point"] == 0 and metrics["best_checkpoint_step"] == 10
    assert metrics["points_confirmed"] == 3
    assert metrics["sweep"] == pytest.approx({"dino": 0.9, "clip_i": 0.8, "clip_t": 0.2})
    assert metrics["confirm"]["dino"] == pytest.approx(0.8)
    assert {"dino_lo", "dino_hi", "clip_i", "clip_t_hi"} <= set(metrics["confirm"])
    assert metrics["shrinkage"] == pytest.approx(DROP)
    assert metrics["shrinkage_mean"] == pytest.approx(DROP)
    assert metrics["baseline"]["dino"] == 0.2 and metrics["real_ceiling"]["clip_i"] == 0.88
    lines = result.describe()
    assert "fresh seeds 13..15" in lines[0] and "shrinkage +0.100" in lines[1]
    assert len(lines) == 1 + 3 + 1 and lines[-1].startswith("baseline")


def test_a_failed_write_leaves_the_previous_outputs_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results table, references.json and reports/metrics.json are replaced together: a
    full disk while writing the last one left a new table beside old references (the report
    then mixed two confirmations)."""
    cfg = make_cfg()
    confirm(tmp_path, cfg)
    names = ("runs/evaluate/results.csv", "runs/evaluate/results.parquet")
    names += ("runs/evaluate/references.json", "reports/metrics.json")
    before = {name: (tmp_path / name).read_bytes() for name in names}
    table = sweep_table(tmp_path, cfg)
    confirmation = confirm_points(
        cfg, tmp_path, selected_points(cfg, tmp_path, table), StubBackend(table, tmp_path), False
    )
    confirmation.table["point"] = confirmation.table["point"][::-1].to_numpy()  # another table
    import harness.sweep.confirm as module

    def full_disk(cfg: HarnessConfig, confirmation: Any, root: Path) -> dict[str, Any]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "metrics_summary", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_confirmation(cfg, tmp_path, confirmation)
    assert {name: (tmp_path / name).read_bytes() for name in names} == before
    assert not list((tmp_path / "runs/evaluate").glob(".*.tmp"))


def test_each_point_is_compared_with_the_base_model_under_its_own_guidance_and_steps(
    tmp_path: Path,
) -> None:
    """The base model's scores move with guidance (CLIP-T above all): a baseline under
    eval's setting (guidance 7.5 here) against a point at guidance 3 mixed the adapter's
    effect with the guidance's. One baseline per distinct (guidance, steps, scheduler) of the
    confirmed points; the LoRA scales do not apply to the base model."""
    cfg = make_cfg()
    assert cfg.eval.guidance_scale == 7.5  # what the baseline used before
    result, backend = confirm(tmp_path, cfg)
    made = [c["baseline"] for c in backend.calls if "baseline" in c and c["seeds"][0] == 13]
    g3, g7 = (s.model_copy(update={"lora_scale": 1.0}) for s in SETTINGS)
    assert made == [g3.id, g7.id]  # the best point's first; point 2 shares point 0's
    table = pd.read_csv(tmp_path / "runs/evaluate/results.csv")
    assert table["baseline_setting"].tolist() == [g3.id, g7.id, g3.id]
    assert table["baseline.clip_t"].tolist() == pytest.approx([0.33, 0.375, 0.33])
    references = json.loads((tmp_path / "runs/evaluate/references.json").read_text())
    assert references["baseline"]["clip_t"] == pytest.approx(0.33)
    assert references["baseline_setting"] == g3.id
    assert references["baselines"][g7.id]["clip_t"] == pytest.approx(0.375)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["baseline"]["clip_t"] == pytest.approx(0.33)  # the best point's guidance
    assert any(g3.id in line for line in result.describe() if line.startswith("baseline"))


def test_selection_bias_is_the_shrinkage_less_the_base_models_own(tmp_path: Path) -> None:
    """Fresh seeds (and held-out prompts) can be harder for every model, selected or not: in
    the tiny demo the base model lost 0.16 DINO from the sweep's seeds to the fresh ones, as
    much as the best point did, and `shrinkage` alone read as selection bias that was not
    there. The base model on the sweep's own prompts and seeds, under each point's guidance,
    steps and scheduler, measures that drop; `selection_bias` is the rest."""
    cfg = make_cfg(prompts=["a {token} {class_name} on the moon"])
    result, backend = confirm(tmp_path, cfg)
    g3, g7 = (s.model_copy(update={"lora_scale": 1.0}) for s in SETTINGS)
    swept = [c for c in backend.calls if "baseline" in c and c["seeds"] == eval_seeds(cfg)]
    assert [c["baseline"] for c in swept] == [g3.id, g7.id]
    assert all(c["base_prompts"] == cfg.eval.prompts for c in swept)  # not the held-out one
    table = pd.read_csv(tmp_path / "runs/evaluate/results.csv")
    for m in DROP:
        assert table[f"baseline_sweep.{m}"].tolist() == pytest.approx(
            (table[f"baseline.{m}"] + BASE_DROP[m]).tolist()
        )
        assert table[f"shrinkage_base.{m}"].tolist() == pytest.approx([BASE_DROP[m]] * 3)
        assert table[f"selection_bias.{m}"].tolist() == pytest.approx([DROP[m] - BASE_DROP[m]] * 3)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    expected = {m: DROP[m] - BASE_DROP[m] for m in DROP}
    assert metrics["selection_bias"] == pytest.approx(expected)
    assert metrics["selection_bias_mean"] == pytest.approx(expected)
    assert metrics["baseline_sweep"]["dino"] == pytest.approx(0.2 + BASE_DROP["dino"])
    references = json.loads((tmp_path / "runs/evaluate/references.json").read_text())
    assert references["baselines_sweep"][g7.id]["clip_t"] == pytest.approx(0.375 - 0.01)
    lines = result.describe()
    assert "selection +0.040" in lines[1] and "selection +0.030" in lines[1]
    assert "on the sweep's seeds dino 0.260" in lines[-1]


def _sweep_baseline(root: Path, cfg: HarnessConfig, **changed: float) -> dict[str, float]:
    """Write the sweep's ``metrics.json`` with the base model's scores the sweep stored (at
    eval's setting, on its seeds): the stub's, with ``changed`` ones."""
    eval_base = cfg.eval.setting
    stored = {"dino": 0.2, "clip_i": 0.3, "clip_t": 0.3 + eval_base.guidance_scale / 100}
    stored = {m: value + BASE_DROP[m] for m, value in stored.items()} | changed
    (root / cfg.sweep.dir).mkdir(parents=True, exist_ok=True)
    (root / cfg.sweep.dir / "metrics.json").write_text(json.dumps({"baseline": stored}))
    return stored


def test_the_base_model_must_reproduce_the_sweeps_own_baseline(tmp_path: Path) -> None:
    """A study keeps its points' scores across code changes (to resume): after an upgrade that
    changed the models or the scorer (the tiny VAE, here, a moved hub revision or a diffusers
    upgrade elsewhere) `dvc repro` reported the old study's scores next to today's
    confirmation, and the shrinkage (0.16 DINO in the demo) was that change. The base model is
    regenerated on the sweep's seeds under eval's setting, where the study stored it: equal
    within 0.01, the sweep's scores are today's; else a warning and sweep_reproduced false."""
    cfg = make_cfg()
    eval_base = base_setting(cfg.eval.setting)
    _sweep_baseline(tmp_path, cfg)
    result, backend = confirm(tmp_path, cfg)
    swept = [c["baseline"] for c in backend.calls if "baseline" in c and c["seeds"] == SWEPT]
    g3, g7 = (s.model_copy(update={"lora_scale": 1.0}) for s in SETTINGS)
    assert swept == [g3.id, g7.id, eval_base.id]  # the points' settings, then eval's
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["sweep_reproduced"] is True
    assert metrics["sweep_baseline_difference"] == pytest.approx({m: 0.0 for m in DROP})
    assert not any("WARNING" in line for line in result.describe())

    _sweep_baseline(tmp_path, cfg, dino=0.42)  # the study's scores came from other models
    result, _ = confirm(tmp_path, cfg)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["sweep_reproduced"] is False
    assert metrics["sweep_baseline_difference"]["dino"] == pytest.approx(0.26 - 0.42)
    (warning,) = [line for line in result.describe() if "WARNING" in line]
    assert "dino 0.420 in the study, 0.260 now" in warning and eval_base.id in warning
    assert "sweep.study_name" in warning
    references = json.loads((tmp_path / "runs/evaluate/references.json").read_text())
    assert references["reproduction"]["reproduced"] is False
    assert references["reproduction"]["setting"] == eval_base.id


def test_the_warning_names_the_weights_that_changed_since_the_study_began(tmp_path: Path) -> None:
    """The study's summary records its weights (harness.models.identity): when the base model
    no longer reproduces the study, the warning says whether the weights are the cause."""
    from harness.models.identity import model_identity
    from harness.sweep.results import SUMMARY_JSON

    cfg = make_cfg()
    summary = tmp_path / cfg.sweep.dir / SUMMARY_JSON
    _sweep_baseline(tmp_path, cfg, dino=0.42)
    today = model_identity(cfg.model, tmp_path)
    summary.write_text(json.dumps({"model": today}))
    result, _ = confirm(tmp_path, cfg)
    (warning,) = [line for line in result.describe() if "WARNING" in line]
    assert "weights changed" not in warning  # the same weights: another cause
    references = json.loads((tmp_path / "runs/evaluate/references.json").read_text())
    assert references["reproduction"]["model"] is None
    summary.write_text(json.dumps({"model": {**today, "weights": "0" * 64}}))
    result, _ = confirm(tmp_path, cfg)
    (warning,) = [line for line in result.describe() if "WARNING" in line]
    change = f"weights {today['weights'][:12]} (the study's: {'0' * 12})"
    assert f"the model's weights changed since the study began: {change}" in warning
    references = json.loads((tmp_path / "runs/evaluate/references.json").read_text())
    assert references["reproduction"]["model"] == change


def test_without_a_stored_sweep_baseline_only_the_best_point_is_checked(tmp_path: Path) -> None:
    cfg = make_cfg()
    _, backend = confirm(tmp_path, cfg)  # no runs/sweep/metrics.json
    swept = [c["baseline"] for c in backend.calls if "baseline" in c and c["seeds"] == SWEPT]
    assert len(swept) == 2  # the points' settings only: nothing to compare eval's with
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert "sweep_baseline_difference" not in metrics
    assert metrics["sweep_reproduced"] is True  # the best point's own scores, always recorded
    assert metrics["sweep_point_difference"] == pytest.approx({m: 0.0 for m in DROP})


def test_the_best_point_must_reproduce_its_sweep_scores(tmp_path: Path) -> None:
    """The base model reproduces the study, but the best point does not: something on the
    adapter's way changed since the sweep (PEFT, the LoRA loading, a replaced adapter file),
    which the base model cannot show. Its shrinkage and selection bias then measure that
    change, not selection: a warning says so, naming the point."""
    cfg = make_cfg()
    _sweep_baseline(tmp_path, cfg)
    result, _ = confirm(tmp_path, cfg, point_change={"clip_t": -0.05})
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["sweep_reproduced"] is False
    assert metrics["sweep_baseline_difference"] == pytest.approx({m: 0.0 for m in DROP})
    assert metrics["sweep_point_difference"] == pytest.approx(
        {"dino": 0, "clip_i": 0, "clip_t": -0.05}
    )
    (warning,) = [line for line in result.describe() if "WARNING" in line]
    assert warning.startswith(
        f"WARNING: the sweep's best point (point 0, run key step 10) on the sweep's seeds "
        f"({SETTINGS[0].id}) no longer gives the study's scores (dino 0.900 in the study, 0.900 now"
    )
    assert "clip_t 0.200 in the study, 0.150 now" in warning
    references = json.loads((tmp_path / "runs/evaluate/references.json").read_text())
    assert references["point_reproduction"]["reproduced"] is False
    assert references["reproduction"]["reproduced"] is True
    result, _ = confirm(tmp_path, cfg, point_change={"clip_t": -0.005})  # within 0.01: noise
    assert not [line for line in result.describe() if "WARNING" in line]


def test_weighted_sweep_adds_the_weighted_score(tmp_path: Path) -> None:
    cfg = validate_config(
        {"preset": "t", "sweep": {"weights": {"clip_i": 1.0}}, "evaluate": {"top_k": 1}}
    )
    result, _ = confirm(tmp_path, cfg)
    (row,) = result.table.to_dict(orient="records")
    assert row["point"] == 0 and row["selected_by"] == "pareto+weighted"
    assert row["score.weighted"] == pytest.approx(0.8)
    assert row["confirm.weighted"] == pytest.approx(0.75)
    assert row["shrinkage.weighted"] == pytest.approx(0.05)
    assert row["shrinkage_base.weighted"] == pytest.approx(BASE_DROP["clip_i"])
    assert row["selection_bias.weighted"] == pytest.approx(0.0)
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["shrinkage"]["weighted"] == pytest.approx(0.05)


def test_rerun_starts_each_point_folder_clean(tmp_path: Path) -> None:
    cfg = make_cfg()
    confirm(tmp_path, cfg)
    stale = tmp_path / "runs/evaluate/point-00000/manifest.jsonl"
    stale.write_text("old\n")
    confirm(tmp_path, cfg)  # the stub would fail on an existing images folder
    assert not stale.exists()


# --- errors ---------------------------------------------------------------------------------


def test_missing_or_empty_results_table(tmp_path: Path) -> None:
    cfg = make_cfg()
    with pytest.raises(EvaluateError, match=r"no sweep results table; run `harness sweep`"):
        read_sweep_results(cfg, tmp_path)
    table = sweep_table(tmp_path, cfg)
    table.iloc[:0].to_parquet(tmp_path / "runs/sweep/results.parquet")
    with pytest.raises(EvaluateError, match="no evaluated points"):
        read_sweep_results(cfg, tmp_path)
    table.drop(columns=["checkpoint_step"]).to_parquet(tmp_path / "runs/sweep/results.parquet")
    with pytest.raises(EvaluateError, match=r"lacks columns.*checkpoint_step"):
        read_sweep_results(cfg, tmp_path)


def test_results_of_another_configurations_study_are_refused(tmp_path: Path) -> None:
    """A config changed after the sweep ran (no `harness sweep` since) must not confirm the old
    configuration's points under the new params."""
    from harness.sweep.study import study_id

    cfg = make_cfg()
    sweep_table(tmp_path, cfg)
    summary = tmp_path / "runs/sweep/metrics.json"
    summary.write_text(json.dumps({"study": study_id(cfg)}))
    assert not read_sweep_results(cfg, tmp_path).empty
    summary.write_text(json.dumps({"study": "dreambooth-00000000"}))
    with pytest.raises(EvaluateError, match=r"holds study 'dreambooth-00000000'.*harness sweep"):
        read_sweep_results(cfg, tmp_path)


def test_a_deleted_adapter_of_a_selected_point_fails_fast(tmp_path: Path) -> None:
    cfg = make_cfg()
    table = sweep_table(tmp_path, cfg)
    shutil.rmtree(tmp_path / table.loc[2, "adapter"])  # step 20: points 2 and 3
    with pytest.raises(EvaluateError, match=r"1 selected point\(s\) were deleted: point 2"):
        selected_points(cfg, tmp_path, read_sweep_results(cfg, tmp_path))
    table.loc[2, ["adapter", "adapter_removed"]] = [None, True]
    table.to_parquet(tmp_path / "runs/sweep/results.parquet")
    with pytest.raises(EvaluateError, match=r"point 2 \(removed\)"):
        selected_points(cfg, tmp_path, read_sweep_results(cfg, tmp_path))
    # Fewer points re-scored: the kept ones suffice.
    fewer = make_cfg(top_k=2)
    assert selected_points(fewer, tmp_path, read_sweep_results(fewer, tmp_path))[
        "point"
    ].tolist() == [0, 1]


def test_point_setting_comes_from_the_row_and_must_match_its_id(tmp_path: Path) -> None:
    cfg = make_cfg()
    row = sweep_table(tmp_path, cfg).iloc[1].to_dict()
    assert point_setting(cfg, row) == SETTINGS[1]
    row["eval.lora_scale"] = 0.9
    with pytest.raises(EvaluateError, match="setting_id"):
        point_setting(cfg, row)


def test_point_setting_of_a_run_without_text_encoder_lora(tmp_path: Path) -> None:
    """Such a point has no eval.text_encoder_lora_scale (NaN): any scale gives its images, the
    sweep generated them at 1 (its setting_id says so)."""
    cfg = make_cfg()
    row = sweep_table(tmp_path, cfg).iloc[1].to_dict()
    row["eval.text_encoder_lora_scale"] = float("nan")
    row["setting_id"] = SETTINGS[1].model_copy(update={"text_encoder_lora_scale": 1.0}).id
    assert point_setting(cfg, row).text_encoder_lora_scale == 1.0


def test_cli_without_sweep_results_is_one_line_exit_2(repo_root: Path, tmp_path: Path) -> None:
    shutil.copytree(repo_root / "experiments", tmp_path / "experiments")
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny-cpu\ndata:\n  sample_images: 5\ntracking:\n  mode: 'off'\n")
    runner = CliRunner()
    assert runner.invoke(app, ["-p", str(params), "prepare"]).exit_code == 0
    result = runner.invoke(app, ["-p", str(params), "evaluate"])
    assert result.exit_code == 2
    assert "no sweep results table" in result.stderr and "harness sweep" in result.stderr
    assert "Traceback" not in result.stderr


# --- harness export ---------------------------------------------------------------------------


def test_export_picks_the_confirmed_best_or_a_chosen_point_and_refuses_what_it_cannot(
    tmp_path: Path,
) -> None:
    from harness.export import ExportError, choose_point

    cfg = make_cfg()
    confirm(tmp_path, cfg)  # the evaluate stage's table: point 0 first
    row = choose_point(cfg, tmp_path)
    assert row["point"] == 0 and row["confirm.dino"] == pytest.approx(0.8)
    assert row["baseline_setting"] == SETTINGS[0].model_copy(update={"lora_scale": 1.0}).id
    assert choose_point(cfg, tmp_path, 3)["point"] == 3  # not confirmed: sweep scores only
    with pytest.raises(ExportError, match=r"--point 9: no such point .* \(points 0\.\.3\)"):
        choose_point(cfg, tmp_path, 9)
    shutil.rmtree(tmp_path / "runs/evaluate")  # no evaluate stage: the sweep's best
    assert choose_point(cfg, tmp_path)["point"] == 0
    shutil.rmtree(tmp_path / choose_point(cfg, tmp_path, 2)["adapter"])
    with pytest.raises(ExportError, match="point 2: its adapter was removed"):
        choose_point(cfg, tmp_path, 2)
