"""The paired bootstrap on synthetic data whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.report.stats import paired_bootstrap, paired_comparison, paired_differences


def test_a_constant_difference_has_a_zero_width_interval() -> None:
    found = paired_bootstrap([0.25] * 12, ["p1", "p2", "p3"] * 4, n_resamples=500)
    assert (found.mean, found.lo, found.hi) == pytest.approx((0.25, 0.25, 0.25))
    assert found.verdict == "real" and found.n == 12
    zero = paired_bootstrap([0.0] * 8, n_resamples=200)
    assert zero.verdict == "noise" and not zero.excludes_zero


def test_iid_differences_match_the_normal_interval() -> None:
    # One pair per cluster: the plain bootstrap; its 95% interval ~ mean +- 1.96 sd / sqrt(n).
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 1.0, size=400)
    found = paired_bootstrap(values, n_resamples=4000, seed=3)
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert found.mean == pytest.approx(values.mean())
    assert found.lo == pytest.approx(values.mean() - half, abs=0.015)
    assert found.hi == pytest.approx(values.mean() + half, abs=0.015)
    assert found.verdict == "real"  # 0.3 is ~6 standard errors from 0


def test_prompt_effects_are_resampled_as_whole_prompts() -> None:
    # Differences equal within a prompt (no seed noise): the interval is that of the prompt
    # means (~ mean +- 1.96 sd_prompts / sqrt(prompts)), much wider than 200 iid pairs'.
    rng = np.random.default_rng(2)
    effects = rng.normal(0.0, 1.0, size=50)
    values = np.repeat(effects, 4)
    prompts = np.repeat([f"p{i}" for i in range(50)], 4).tolist()
    found = paired_bootstrap(values, prompts, n_resamples=4000, seed=0)
    half = 1.96 * effects.std(ddof=1) / np.sqrt(effects.size)
    assert found.hi - found.lo == pytest.approx(2 * half, rel=0.12)
    iid = paired_bootstrap(values, n_resamples=4000, seed=0)
    assert (iid.hi - iid.lo) < 0.6 * (found.hi - found.lo)


def test_noise_and_a_shift_get_the_right_verdicts_deterministically() -> None:
    rng = np.random.default_rng(5)
    prompts = [f"p{i}" for i in range(10) for _ in range(4)]
    noise = rng.normal(0.0, 0.05, size=40)
    noise -= noise.mean()  # a true difference of 0
    assert paired_bootstrap(noise, prompts, seed=11).verdict == "noise"
    shifted = paired_bootstrap(noise + 0.2, prompts, seed=11)
    assert shifted.verdict == "real" and shifted.lo > 0.1
    again = paired_bootstrap(noise + 0.2, prompts, seed=11)
    assert again == shifted  # seeded: the same interval every time
    assert paired_bootstrap(noise + 0.2, prompts, seed=12) != shifted
    negative = paired_bootstrap(noise - 0.2, prompts, seed=11)
    assert negative.verdict == "real" and negative.hi < 0


def test_unequal_prompts_weigh_every_pair_the_same() -> None:
    values = [1.0, 1.0, 1.0, 0.0]  # three pairs of one prompt, one of another
    found = paired_bootstrap(values, ["a", "a", "a", "b"], n_resamples=300)
    assert found.mean == pytest.approx(0.75)
    assert 0.0 <= found.lo <= found.hi <= 1.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no paired differences"):
        paired_bootstrap([])
    with pytest.raises(ValueError, match="cluster labels"):
        paired_bootstrap([1.0, 2.0], ["a"])


def _images(point: int, dino: list[float], seeds: list[int]) -> pd.DataFrame:
    prompts = ["x", "y"]
    return pd.DataFrame(
        {
            "point": point,
            "prompt": [p for p in prompts for _ in seeds],
            "seed": seeds * len(prompts),
            "dino": dino,
        }
    )


def test_images_pair_by_prompt_and_seed() -> None:
    best = _images(1, [0.9, 0.8, 0.7, 0.6], [0, 1])
    other = _images(2, [0.5, 0.5, 0.5, 0.5], [1, 0])  # same images, seeds listed the other way
    per_image = pd.concat([best, other.iloc[::-1]], ignore_index=True)
    pairs = paired_differences(per_image, 1, 2, "dino")
    assert sorted(pairs["diff"].round(6)) == [0.1, 0.2, 0.3, 0.4]
    missing = per_image[~((per_image["point"] == 2) & (per_image["seed"] == 1))]
    assert len(paired_differences(missing, 1, 2, "dino")) == 2  # unmatched images drop out
    found = paired_comparison(per_image, 1, [2], ["dino"], n_resamples=200)
    row = found.iloc[0]
    assert row["point"] == 2 and row["n_pairs"] == 4
    assert row["diff.dino"] == pytest.approx(0.25) and row["verdict.dino"] == "real"


def test_numbers_are_rounded_alike_and_a_rounded_zero_has_no_sign() -> None:
    from harness.report.model import format_value

    assert format_value(0.82051, "score") == "0.821" == f"{0.82051:.3f}"
    assert format_value(-0.0004, "signed") == "+0.000"
    assert format_value(-0.0004, "score") == "0.000"
    assert format_value(0.0036, "signed") == "+0.004"
    assert format_value(np.float32(0.5), "score") == "0.500"
    assert format_value(None, "score") == format_value(float("nan"), "signed") == "–"
    assert format_value(0.00433745, "setting") == "0.00433745"
    assert format_value(True) == "yes"
