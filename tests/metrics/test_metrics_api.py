"""Scorer on tiny random models: protocol properties, not model quality."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
import torch
from PIL import Image

from metrics import MetricsInputError, Scorer, ScorerConfig
from metrics.scores import all_pairs_mean, self_pairs_mean

PROMPTS = ["a photo of sks dog", "a sks dog on the beach", "a red sks dog"]


@pytest.fixture
def data(make_image: Callable[..., Image.Image]) -> dict[str, list]:
    real = [make_image(s, size=(120, 100)) for s in range(4)]
    generated = [make_image(100 + s) for s in range(9)]
    prompts = [PROMPTS[i % 3] for i in range(9)]
    return {"real": real, "generated": generated, "prompts": prompts}


def test_identical_images_score_one(
    scorer_factory: Callable[..., Scorer], make_image: Callable[..., Image.Image]
) -> None:
    image = make_image(7)
    scorer = scorer_factory()
    result = scorer.score([image], [image.copy(), image.copy()], ["a sks dog"] * 2, token="sks")
    assert result.dino == pytest.approx(1.0, abs=1e-5)
    assert result.clip_i == pytest.approx(1.0, abs=1e-5)
    assert result.div == 0.0  # LPIPS of identical images: exactly 0
    assert result.div_dino == pytest.approx(0.0, abs=1e-5)
    ceiling = scorer.real_ceiling([image, image.copy(), image.copy()])
    assert ceiling["dino"] == pytest.approx(1.0, abs=1e-5)
    assert ceiling["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert scorer.prior_preservation([image], [image.copy()]) == pytest.approx(1.0, abs=1e-5)


def test_means_match_brute_force(
    scorer_factory: Callable[..., Scorer], data: dict[str, list]
) -> None:
    scorer = scorer_factory()
    result = scorer.score(
        data["real"], data["generated"], data["prompts"], token="sks", class_name="dog"
    )
    dino_real = scorer.dino.encode_images(data["real"])
    dino_gen = scorer.dino.encode_images(data["generated"])
    clip_real = scorer.clip.encode_images(data["real"])
    clip_gen = scorer.clip.encode_images(data["generated"])
    assert result.dino == pytest.approx(all_pairs_mean(dino_gen, dino_real), abs=1e-6)
    assert result.clip_i == pytest.approx(all_pairs_mean(clip_gen, clip_real), abs=1e-6)
    assert result.dino < 0.9999  # distinct images: not trivially 1

    texts = scorer.clip.encode_texts([p.replace("sks ", "") for p in data["prompts"]])
    expected_t = [float(clip_gen[i] @ texts[i]) for i in range(9)]
    assert [row.clip_t for row in result.images] == pytest.approx(expected_t, abs=1e-5)
    assert result.clip_t == pytest.approx(sum(expected_t) / 9, abs=1e-6)

    assert len(result.images) == 9 and len(result.prompts) == 3
    assert [row.prompt for row in result.prompts] == sorted(PROMPTS)
    for row in result.prompts:
        idx = [i for i, p in enumerate(data["prompts"]) if p == row.prompt]
        assert row.n_images == 3
        assert row.dino == pytest.approx(
            float(torch.tensor([result.images[i].dino for i in idx]).mean()), abs=1e-6
        )
        assert row.div_dino == pytest.approx(1.0 - self_pairs_mean(dino_gen[idx]), abs=1e-6)
        images = [data["generated"][i] for i in idx]
        pairs = [(0, 1), (0, 2), (1, 2)]
        lpips = scorer.lpips
        assert lpips is not None
        expected_div = sum(lpips.distance(images[i], images[j]) for i, j in pairs) / 3
        assert row.div == pytest.approx(expected_div, abs=1e-6) and row.div > 0
    for name in ("div", "div_dino"):
        values = [getattr(r, name) for r in result.prompts]
        assert getattr(result, name) == pytest.approx(sum(values) / 3, abs=1e-9)

    for name, mean in result.means().items():
        interval = result.ci[name]
        assert interval is not None and mean is not None
        assert interval[0] <= mean <= interval[1], name


def test_independent_of_file_order(
    scorer_factory: Callable[..., Scorer], data: dict[str, list]
) -> None:
    scorer = scorer_factory()
    first = scorer.score(data["real"], data["generated"], data["prompts"], token="sks")
    order = list(range(9))
    random.Random(3).shuffle(order)
    real = list(reversed(data["real"]))
    second = scorer.score(
        real,
        [data["generated"][i] for i in order],
        [data["prompts"][i] for i in order],
        token="sks",
    )
    for name, mean in first.means().items():
        assert second.means()[name] == pytest.approx(mean, abs=1e-6)
        assert second.ci[name] == pytest.approx(first.ci[name], abs=1e-6)
    assert [r.prompt for r in second.prompts] == [r.prompt for r in first.prompts]
    assert [r.clip_t for r in second.prompts] == pytest.approx(
        [r.clip_t for r in first.prompts], abs=1e-6
    )


def test_identifier_policy_changes_encoded_text(
    scorer_factory: Callable[..., Scorer], data: dict[str, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    results = {}
    for policy in ("remove", "keep", "replace_with_class"):
        scorer = scorer_factory(identifier_policy=policy)
        seen: list[str] = []
        original = scorer.clip.encode_texts

        def spy(
            texts: list[str],
            original: Callable[..., torch.Tensor] = original,
            seen: list[str] = seen,
        ) -> torch.Tensor:
            seen.extend(texts)
            return original(texts)

        monkeypatch.setattr(scorer.clip, "encode_texts", spy)
        results[policy] = scorer.score(
            data["real"][:1],
            data["generated"][:2],
            ["a photo of sks dog", "sks on the beach"],
            token="sks",
            class_name="dog",
        )
        monkeypatch.undo()
        assert sorted(seen) == sorted(results[policy].metadata["encoded_texts"].values())
        assert results[policy].metadata["identifier_policy"] == policy
    assert results["remove"].metadata["encoded_texts"] == {
        "a photo of sks dog": "a photo of dog",
        "sks on the beach": "on the beach",
    }
    assert results["keep"].metadata["encoded_texts"]["sks on the beach"] == "sks on the beach"
    assert (
        results["replace_with_class"].metadata["encoded_texts"]["sks on the beach"]
        == "dog on the beach"
    )
    assert results["remove"].clip_t != pytest.approx(results["keep"].clip_t, abs=1e-6)
    assert results["remove"].dino == pytest.approx(results["keep"].dino, abs=1e-9)  # images only


def test_without_prompts_clip_t_and_div_are_skipped(
    scorer_factory: Callable[..., Scorer], data: dict[str, list]
) -> None:
    result = scorer_factory().score(data["real"], data["generated"])
    assert result.clip_t is None and result.div is None and result.div_dino is None
    assert result.prompts == () and result.metadata["div_unmeasured"].startswith("no prompts")
    assert result.ci["clip_t"] is None and result.ci["dino"] is not None
    assert result.metadata["ci_resamples"] == "images"
    assert all(row.clip_t is None for row in result.images)


def test_one_image_per_prompt_has_no_div(
    scorer_factory: Callable[..., Scorer], data: dict[str, list]
) -> None:
    result = scorer_factory().score(data["real"], data["generated"][:3], PROMPTS, token="sks")
    assert result.div is None and result.ci["div"] is None
    assert result.div_dino is None and result.ci["div_dino"] is None
    assert all(row.div is None and row.div_dino is None for row in result.prompts)
    assert result.metadata["div_unmeasured"] == "no prompt has two or more images"


def test_without_lpips_weights_div_is_not_measured_and_div_dino_is(
    scorer_factory: Callable[..., Scorer], data: dict[str, list]
) -> None:
    with_lpips = scorer_factory().score(
        data["real"], data["generated"], data["prompts"], token="sks"
    )
    result = scorer_factory(lpips_weights=None).score(
        data["real"], data["generated"], data["prompts"], token="sks"
    )
    assert result.div is None and result.ci["div"] is None
    assert all(row.div is None for row in result.prompts)
    assert result.div_dino == pytest.approx(with_lpips.div_dino, abs=1e-9)
    assert result.ci["div_dino"] is not None
    assert result.metadata["lpips_weights"] is None
    assert "no LPIPS weights" in result.metadata["div_unmeasured"]
    assert with_lpips.metadata["div_unmeasured"] is None


def test_no_bootstrap_samples_no_intervals(
    scorer_factory: Callable[..., Scorer], data: dict[str, list]
) -> None:
    result = scorer_factory(bootstrap_samples=0).score(
        data["real"], data["generated"], data["prompts"], token="sks"
    )
    assert set(result.ci.values()) == {None}


def test_to_dict_is_json_safe(scorer_factory: Callable[..., Scorer], data: dict[str, list]) -> None:
    result = scorer_factory().score(data["real"], data["generated"], data["prompts"], token="sks")
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["means"]["dino"] == pytest.approx(result.dino)
    assert len(payload["ci95"]["dino"]) == 2
    assert len(payload["per_image"]) == 9 and len(payload["per_prompt"]) == 3
    meta = payload["metadata"]
    assert meta["identifier_policy"] == "remove" and meta["token"] == "sks"
    assert meta["dino_encoder_id"] == "dino:tiny://dino:seed=0:fp32"
    assert meta["div_metric"] == "lpips" and meta["div_dino_embedding"] == "dino"
    assert meta["lpips_weights"] == "tiny:seed=0"
    assert {"div", "div_dino"} <= set(payload["per_prompt"][0])


def test_real_photos_are_embedded_once(
    scorer_factory: Callable[..., Scorer], data: dict[str, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = scorer_factory()
    counts: list[int] = []
    original = scorer.dino.encode_images

    def counting(images: list) -> torch.Tensor:
        counts.append(len(images))
        return original(images)

    monkeypatch.setattr(scorer.dino, "encode_images", counting)
    scorer.score(data["real"], data["generated"][:2])
    assert counts == [4, 2]
    scorer.score(data["real"], data["generated"][2:4])
    scorer.real_ceiling(data["real"])
    assert counts == [4, 2, 2]  # real photos came from the cache


def test_ceiling_and_prior_preservation(
    scorer_factory: Callable[..., Scorer], data: dict[str, list]
) -> None:
    scorer = scorer_factory()
    ceiling = scorer.real_ceiling(data["real"])
    dino_real = scorer.dino.encode_images(data["real"])
    assert ceiling["dino"] == pytest.approx(self_pairs_mean(dino_real), abs=1e-6)
    assert ceiling["n_real"] == 4
    pres = scorer.prior_preservation(data["generated"][:3], data["real"])
    assert pres == pytest.approx(
        all_pairs_mean(scorer.dino.encode_images(data["generated"][:3]), dino_real), abs=1e-6
    )


def test_bad_inputs(scorer_factory: Callable[..., Scorer], data: dict[str, list]) -> None:
    scorer = scorer_factory()
    with pytest.raises(MetricsInputError, match="no real images"):
        scorer.score([], data["generated"])
    with pytest.raises(MetricsInputError, match="no generated images"):
        scorer.score(data["real"], [])
    with pytest.raises(MetricsInputError, match="2 prompts for 9"):
        scorer.score(data["real"], data["generated"], PROMPTS[:2])
    with pytest.raises(MetricsInputError, match="identifier token"):
        scorer.score(data["real"], data["generated"], data["prompts"])  # remove needs a token
    with pytest.raises(MetricsInputError, match="at least 2 real"):
        scorer.real_ceiling(data["real"][:1])
    with pytest.raises(ValueError, match="identifier_policy"):
        ScorerConfig(identifier_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        ScorerConfig(batch_size=0)
