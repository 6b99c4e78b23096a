"""The packages a sweep's images and scores depend on: stored in the study, compared on joining.

A study keeps its points across code changes, so that it resumes. A worker whose packages
differ from those the study was started with (a cluster node with another diffusers, an
upgrade between two ``dvc repro`` runs) adds points generated or scored by other code, which
may not compare with the study's. The first worker stores its versions in the study; every
later worker compares its own and logs one warning naming each package that differs; every
run records the versions that made it (trial user attribute ``environment``). Nothing is
refused: other versions often give the same images, and the evaluate stage checks the effect
itself (:func:`harness.sweep.confirm.reproduction`).

Versions are read from the installed distributions' metadata: nothing is imported.

The model's weights are another matter: other weights never give the same images. A worker
whose weights differ from the study's (:func:`harness.models.identity.model_identity`: the hub
commit, a digest of local files) is refused before it trains (:func:`join_model`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:
    from harness.sweep.claims import Claims

__all__ = [
    "ENVIRONMENT_ATTR",
    "MODEL_ATTR",
    "PACKAGES",
    "differences",
    "join_environment",
    "join_model",
    "software_versions",
    "study_provenance",
]

logger = logging.getLogger(__name__)

ENVIRONMENT_ATTR = "environment"
MODEL_ATTR = "model"
# What generates the images (torch, diffusers, peft, transformers, accelerate) and what scores
# them (timm's DINO, open_clip's CLIP, lpips' DIV). The harness itself is not listed: its
# package version does not follow its commits, and a change of the tiny models it makes is in
# every identity already (harness.config.schema.TINY_VERSION).
PACKAGES = (
    "torch",
    "diffusers",
    "peft",
    "transformers",
    "accelerate",
    "timm",
    "open_clip_torch",
    "lpips",
)
ABSENT = "absent"


def _name(study: optuna.Study) -> str:
    """The study's name as the user knows it (``runs/sweep/metrics.json``'s ``study``), without
    the ``.runs`` suffix of the Optuna study that holds its runs."""
    return study.study_name.removesuffix(".runs")


def software_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{package: installed version}``, ``"absent"`` for one not installed."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = ABSENT
    return found


def differences(study: Mapping[str, str], mine: Mapping[str, str]) -> list[str]:
    """``"diffusers 0.42.1 (the study's: 0.41.0)"`` for each package whose version differs;
    a package only one side records is not compared (an older harness listed fewer)."""
    return [
        f"{name} {mine[name]} (the study's: {study[name]})"
        for name in PACKAGES
        if name in study and name in mine and study[name] != mine[name]
    ]


def _settled(
    study: optuna.Study, claims: Claims, key: str, mine: Mapping[str, str]
) -> dict[str, str]:
    """The study's value of ``key``: its attribute's, or else the first worker's (settled
    through ``claims``: of workers joining at once exactly one value stands), mirrored into
    the study's attributes for the summaries."""
    attr = study.user_attrs.get(key)  # a study from before the claim holds it here
    first = attr if isinstance(attr, dict) else dict(mine)
    stored = json.loads(claims.settle(key, json.dumps(first, sort_keys=True)))
    if attr != stored:
        study.set_user_attr(key, stored)
    return dict(stored)


def join_environment(
    study: optuna.Study, claims: Claims, mine: Mapping[str, str] | None = None
) -> list[str]:
    """Settle the study's package versions (the first worker's) and compare this worker's
    with them; return (and log as one warning) the differences."""
    mine = dict(mine or software_versions())
    found = differences(_settled(study, claims, ENVIRONMENT_ATTR, mine), mine)
    if found:
        logger.warning(
            "this worker's packages differ from those study %s was started with: %s; the "
            "images and scores of its runs may not compare with the study's (for results "
            "of one environment, sweep in a new study: -S sweep.study_name=<new name>)",
            _name(study),
            ", ".join(found),
        )
    return found


def join_model(study: optuna.Study, identity: Mapping[str, str], claims: Claims) -> None:
    """Settle the identity of the study's model weights (the first worker's with work: of
    workers joining at the same moment exactly one stands, through ``claims``), store it in
    ``study``'s attributes for the summaries, and compare this worker's with it.

    Raises:
        SweepError: the weights differ from those the study was started with; the message says
            how to go on with the study's weights or sweep the new ones in a new study.
    """
    from harness.models.identity import identity_change
    from harness.sweep.study import SweepError

    stored = _settled(study, claims, MODEL_ATTR, identity)
    change = identity_change(stored, identity)
    if change is None:
        return
    # The study's name follows the configuration, model.revision included: pinning the old
    # commit now would open another study, so the advice for hub models is for the next one.
    hub = (
        f" (the study's commit: {stored['commit']}; a model.revision pinned to a commit keeps "
        "a study on one)"
        if "commit" in stored
        else ""
    )
    raise SweepError(
        f"model.pretrained {identity.get('model')!r}: these weights are not those study "
        f"{_name(study)} was started with ({change}); runs made with them would not "
        "compare with the study's, so this worker trains none (the study's results stay as "
        "they are). To go on with the study, give this worker the study's weights again"
        f"{hub}; to sweep these weights, start a new study: -S sweep.study_name=<new name>"
    )


def study_provenance(study: optuna.Study) -> dict[str, dict[str, str]]:
    """``{"environment": versions, "model": weights identity}``: what the study was started
    with, those stored (``summary.json`` and the tracker's summary task show them)."""
    attrs = study.user_attrs
    return {
        key: dict(attrs[key])
        for key in (ENVIRONMENT_ATTR, MODEL_ATTR)
        if isinstance(attrs.get(key), dict)
    }
