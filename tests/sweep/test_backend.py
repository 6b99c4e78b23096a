"""The real backend on tiny models: proxy scores see the checkpoint, scale 0 equals the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.config import HarnessConfig, InferenceSetting
from harness.data import load_prepared, prepare_subject
from harness.evaluate import evaluate_adapter, make_scorer
from harness.sweep.backend import HarnessBackend, evaluation_templates
from harness.train import CheckpointInfo


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd15: Any
) -> tuple[HarnessConfig, HarnessBackend, Path]:
    root = tmp_path_factory.mktemp("project")
    cfg = HarnessConfig.model_validate(
        {
            "preset": "test",
            "data": {"sample_images": 5, "class_name": "toy"},
            "train": {"max_steps": 4, "checkpoint_steps": [2, 4], "learning_rate": 5e-2, "rank": 4},
            "eval": {
                "prompts": [
                    "a photo of {token} {class_name}",
                    "a {token} {class_name} in the snow",
                ],
                "images_per_prompt": 1,
                "num_inference_steps": 2,
                "scheduler": "ddim",
                "prior_preservation_images": 1,
            },
            "metrics": {
                "dino_model": "tiny://dino",
                "clip_model": "tiny://clip",
                "clip_pretrained": None,
                "bootstrap_samples": 20,
            },
            "sweep": {"proxy": {"prompts": 1, "images_per_prompt": 1}},
        }
    )
    prepare_subject(cfg.data, root, progress=False)
    subject = load_prepared(root / "data/prepared/sample")
    backend = HarnessBackend(cfg, tiny_sd15, subject, make_scorer(cfg), progress=False)
    return cfg, backend, root


def base_scores(
    cfg: HarnessConfig, backend: HarnessBackend, out: Path, templates: list[str]
) -> dict[str, float]:
    (result,) = evaluate_adapter(
        cfg,
        backend.loaded,
        backend.scorer,
        reference=backend.subject.reference,
        token="sks",
        class_name="toy",
        adapter=None,
        settings=[
            InferenceSetting(
                guidance_scale=cfg.eval.guidance_scale, num_inference_steps=2, scheduler="ddim"
            )
        ],
        templates=templates,
        seeds=[cfg.eval.seed],
        out_dir=out,
    )
    return result.scores


def test_proxy_scores_the_checkpoint_and_full_eval_scales(setup: Any, tmp_path: Path) -> None:
    cfg, backend, _ = setup
    proxies: dict[int, dict[str, float]] = {}
    logs: list[int] = []

    def on_checkpoint(ckpt: CheckpointInfo) -> bool:
        proxies[ckpt.step] = backend.proxy_scores(cfg, ckpt.path, tmp_path / f"proxy-{ckpt.step}")
        return False

    outcome = backend.train(
        cfg, tmp_path / "run", on_checkpoint, lambda values, step: logs.append(step)
    )
    assert outcome.status == "completed"
    assert [c.step for c in outcome.checkpoints] == [2, 4]
    assert sorted(proxies) == [2, 4] and logs == [1, 2, 3, 4]
    base = base_scores(
        cfg, backend, tmp_path / "base", evaluation_templates(cfg, backend.subject)[:1]
    )
    # The proxy really evaluates the checkpoint, not the (suspended-adapter) base model.
    assert proxies[4]["dino"] != pytest.approx(base["dino"], abs=1e-6)

    zero = InferenceSetting(
        guidance_scale=cfg.eval.guidance_scale,
        lora_scale=0.0,
        num_inference_steps=2,
        scheduler="ddim",
    )
    full = InferenceSetting(
        guidance_scale=cfg.eval.guidance_scale,
        lora_scale=1.0,
        num_inference_steps=2,
        scheduler="ddim",
    )
    points = backend.evaluate(cfg, outcome.checkpoints[-1], [zero, full], tmp_path / "eval")
    assert [p.setting for p in points] == [zero, full]
    assert all(p.n_images == 2 for p in points)
    assert {"dino", "clip_i", "clip_t", "dino_lo", "dino_hi", "pres"} <= set(points[0].scores)
    base_all = base_scores(
        cfg, backend, tmp_path / "base-all", evaluation_templates(cfg, backend.subject)
    )
    assert points[0].scores["dino"] == pytest.approx(base_all["dino"], abs=1e-6)  # scale 0 = base
    assert points[1].scores["dino"] != pytest.approx(base_all["dino"], abs=1e-6)
    assert (points[1].images_dir / "manifest.jsonl").is_file()
    # The backend writes the records' files; it tracks nothing itself.
    assert points[1].grid is not None and points[1].grid.is_file()
    assert points[1].grid.parent != points[1].images_dir  # never mixed with the scored images
    assert [row["prompt"] for row in points[1].per_prompt]
    assert not hasattr(backend, "track")


def test_dataset_prompts_need_a_dataset(setup: Any) -> None:
    from harness.errors import HarnessError

    cfg, backend, _ = setup
    data = cfg.to_dict()
    data["eval"]["prompt_source"] = "dataset"
    with pytest.raises(HarnessError, match="ships no prompts"):
        evaluation_templates(HarnessConfig.model_validate(data), backend.subject)


def test_references_baseline_and_real_ceiling(setup: Any, tmp_path: Path) -> None:
    cfg, backend, _ = setup
    refs = backend.references(cfg, tmp_path / "refs")
    templates = evaluation_templates(cfg, backend.subject)
    base = base_scores(cfg, backend, tmp_path / "base", templates)
    assert refs["baseline"]["dino"] == pytest.approx(base["dino"], abs=1e-6)
    ceiling = backend.scorer.real_ceiling(list(backend.subject.reference))
    assert refs["real_ceiling"] == {"dino": ceiling["dino"], "clip_i": ceiling["clip_i"]}
    assert -1.0 <= refs["real_ceiling"]["dino"] <= 1.0
