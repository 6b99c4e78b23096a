"""``data.token: auto`` under ``dvc repro``: the prompts the choice avoids are an input of the
prepare stage, so a prompt that takes up the chosen word makes DVC choose again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ._dvc_project import OVERRIDES, dvc, dvc_project, run_ok
from ._helpers import BASE_OVERRIDES, REPO, VENV_BIN, deep_merge

pytestmark = pytest.mark.slow


def test_token_auto_is_chosen_again_when_a_prompt_takes_the_chosen_word(tmp_path: Path) -> None:
    # `data.token: auto` avoids every word of the prompts a run uses, so those prompts are an
    # input of the prepare stage (its manifest records the token) although they are `eval`
    # settings: a prompt that takes up the chosen word must make `dvc repro` choose again.
    repo, env = dvc_project(tmp_path, {"data": {"token": "auto"}})
    dvc(repo, env, "repro", "prepare")
    manifest = repo / "data/prepared/sample/manifest.json"
    chosen = json.loads(manifest.read_text())["token"]
    assert chosen not in ("auto", "sks")

    config = repo / "experiments/config.yaml"
    prompts = [*BASE_OVERRIDES["eval"]["prompts"], f"a {{token}} {{class_name}} next to a {chosen}"]
    user = deep_merge(OVERRIDES, {"data": {"token": "auto"}, "eval": {"prompts": prompts}})
    config.write_text((REPO / "experiments/config.yaml").read_text() + yaml.safe_dump(user))
    run_ok([str(VENV_BIN / "harness"), "config", "compose"], repo, env)
    again = dvc(repo, env, "repro", "prepare")
    assert "Running stage 'prepare'" in again, again[-3000:]
    rechosen = json.loads(manifest.read_text())["token"]
    assert rechosen not in (chosen, "auto", "sks")

    # A setting the choice does not read leaves the prepared data alone.
    user = deep_merge(user, {"eval": {"guidance_scale": 3.0}})
    config.write_text((REPO / "experiments/config.yaml").read_text() + yaml.safe_dump(user))
    run_ok([str(VENV_BIN / "harness"), "config", "compose"], repo, env)
    assert "Running stage 'prepare'" not in dvc(repo, env, "repro", "prepare")
