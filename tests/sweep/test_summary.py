"""The sweep summary's parameter importances rank for *high* scores (all objectives are
maximised), not for the low values PED-ANOVA looks at by default (issue 17, item 12)."""

from __future__ import annotations

import random
import warnings

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from harness.sweep.summary import figures, param_importances


def _study() -> optuna.Study:
    """``band`` alone raises DINO (a narrow band of it scores 1); ``tail`` alone lowers it
    (its bottom decile costs 0.5): ranking for low values would name ``tail`` instead."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    rng = random.Random(0)
    dists = {"band": FloatDistribution(0, 1), "tail": FloatDistribution(0, 1)}
    for _ in range(200):
        band, tail = rng.random(), rng.random()
        dino = (1.0 if 0.45 < band < 0.55 else 0.0) - (0.5 if tail < 0.1 else 0.0)
        clip_t = 0.3 + 0.001 * rng.random()
        study.add_trial(
            create_trial(
                params={"band": band, "tail": tail},
                distributions=dists,
                values=[dino + 0.001 * rng.random(), clip_t],
            )
        )
    return study


def test_importance_ranks_the_parameter_that_raises_the_objective() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "computes importances for low values" warning
        ranked = param_importances(_study(), ["dino", "clip_t"])
    dino = ranked["dino"]
    assert set(dino) == {"band", "tail"}
    assert max(dino, key=dino.__getitem__) == "band", dino
    assert dino["band"] > 2 * dino["tail"], dino


def test_importance_figure_uses_the_same_ranking() -> None:
    study = _study()
    figs = figures(study, ["dino", "clip_t"])
    bars = figs["importance dino"].data[0]
    # plotly's horizontal bar chart lists the most important parameter last.
    assert list(bars.y)[-1] == "band"
