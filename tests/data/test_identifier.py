"""Issue 16, ``data.token: auto``: a rare one-piece CLIP token that is no common word, chosen
deterministically once by the prepare stage and read back from the manifest by every later
stage."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e._helpers import new_project
from typer.testing import CliRunner

from harness.cli import app
from harness.config import DataConfig, HarnessConfig
from harness.data import load_prepared, with_subject
from harness.data.captions import COMMON_WORD_MAX_ID
from harness.data.identifier import (
    BLOCKED,
    COMMON_WORDS,
    candidate_tokens,
    choose_token,
    default_tokenizer,
)
from harness.data.prepare import prepare_subject

runner = CliRunner()
Writer = Callable[..., list[Path]]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The offline CLIPTokenizer (OpenAI CLIP's ids) the tiny models use too."""
    tok = default_tokenizer()
    assert tok.model_max_length == 77
    return tok


def test_the_chosen_token_is_one_rare_piece_and_no_common_word(tokenizer: Any) -> None:
    for seed in range(20):
        choice = choose_token(tokenizer, seed)
        pieces = tokenizer.tokenize(choice.token)
        assert pieces == [f"{choice.token}</w>"]  # one whole-word BPE piece
        assert tokenizer.convert_tokens_to_ids(pieces)[0] == choice.token_id
        assert choice.token_id >= COMMON_WORD_MAX_ID  # late merge: rare in CLIP's corpus
        assert choice.token not in COMMON_WORDS | BLOCKED and choice.token != "sks"
        assert 2 <= len(choice.token) <= 3 and choice.token.isalpha()
    # Real words never qualify, even rare-id ones.
    eligible = {t for t, _ in candidate_tokens(tokenizer)}
    assert not eligible & {"dog", "the", "sks", "fez", "ewe", "jap", "tux"}
    assert len(eligible) > 100  # plenty to choose from


def test_the_choice_is_deterministic_and_depends_on_the_seed(tokenizer: Any) -> None:
    first = choose_token(tokenizer, 0)
    assert choose_token(default_tokenizer(), 0) == first  # a fresh tokenizer, same choice
    assert len({choose_token(tokenizer, s).token for s in range(10)}) > 5


def test_words_of_the_class_and_prompts_are_avoided(tokenizer: Any) -> None:
    chosen = choose_token(tokenizer, 0).token
    other = choose_token(tokenizer, 0, avoid=[chosen])
    assert other.token != chosen
    # Dropping another word leaves the choice alone (ranking by hash, not by position).
    unrelated = next(t for t, _ in candidate_tokens(tokenizer) if t not in (chosen, other.token))
    assert choose_token(tokenizer, 0, avoid=[unrelated]).token == chosen


def test_prepare_resolves_auto_avoiding_the_class_noun(
    tmp_path: Path, tokenizer: Any, add_photos: Writer
) -> None:
    raw = tmp_path / "data" / "raw" / "subj"
    raw.mkdir(parents=True)
    add_photos(raw, 3)
    chosen = choose_token(tokenizer, 0).token
    # A class noun that is the token it would pick: it picks another.
    cfg = DataConfig.model_validate(
        {
            "source": "folder",
            "subject": "subj",
            "class_name": chosen,
            "min_side": 32,
            "token": "auto",
        }
    )
    result = prepare_subject(cfg, tmp_path, progress=False)
    assert result.token not in ("auto", chosen)
    assert result.token == choose_token(tokenizer, 0, avoid=[chosen, "a", "photo", "of"]).token
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["token"] == result.token
    assert manifest["token_choice"]["requested"] == "auto"
    # A fixed token writes no token_choice (manifests as before).
    fixed = prepare_subject(cfg.model_copy(update={"token": "sks"}), tmp_path, progress=False)
    assert "token_choice" not in json.loads(fixed.manifest_path.read_text())


FOLDER = {"data": {"source": "folder", "subject": "my-dog", "class_name": "dog", "token": "auto"}}


def _invoke(project: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["-p", str(project / "params.yaml"), *args])
    return result.exit_code, result.stdout + result.stderr


def test_prepare_cli_with_auto_token_records_and_prints_it(
    tmp_path: Path, add_photos: Writer, tokenizer: Any
) -> None:
    project = new_project(tmp_path / "proj", FOLDER)
    subject = project / "data" / "raw" / "my-dog"
    subject.mkdir(parents=True)
    add_photos(subject, 5)
    (subject / "captions.txt").write_text("good_00.jpg\t{token} dog on a sofa\n")

    code, out = _invoke(project, "prepare")
    assert code == 0, out
    manifest = json.loads((project / "data/prepared/my-dog/manifest.json").read_text())
    token = manifest["token"]
    assert token != "auto" and tokenizer.tokenize(token) == [f"{token}</w>"]
    assert f"identifier token: {token} (data.token: auto, seed 0" in " ".join(out.split())
    captions = {r["source"]: r["caption"] for r in manifest["images"]}
    assert captions["good_00.jpg"] == f"{token} dog on a sofa"
    assert captions["good_01.jpg"] == f"a photo of {token} dog"
    assert all("auto" not in c for c in captions.values())
    # Deterministic: preparing again gives byte-identical output.
    before = (project / "data/prepared/my-dog/manifest.json").read_bytes()
    assert _invoke(project, "prepare")[0] == 0
    assert (project / "data/prepared/my-dog/manifest.json").read_bytes() == before
    # Later stages read it back: the config they run with carries the token, never "auto".
    from harness.config import load_config

    cfg = load_config(project / "params.yaml", root=project)
    assert cfg.data.token == "auto"
    resolved = with_subject(cfg, load_prepared(project / "data/prepared/my-dog"))
    assert resolved.data.token == token
    from harness.train.inputs import class_prompt_for

    assert token in class_prompt_for(resolved) or "{token}" not in cfg.train.class_prompt


def test_stages_refuse_an_unresolved_auto_token() -> None:
    from harness.train.inputs import class_prompt_for
    from harness.train.records import TrainingError

    cfg = HarnessConfig.model_validate(
        {
            "preset": "t",
            "data": {"token": "auto", "class_name": "dog"},
            "train": {"class_prompt": "a {token} {class_name}"},
        }
    )
    with pytest.raises(TrainingError, match=r"data\.token: auto"):
        class_prompt_for(cfg)


def test_token_seed_at_its_default_renames_nothing() -> None:
    from harness.config import identity_dump

    data = DataConfig()
    assert "token_seed" not in identity_dump("data", data)
    assert identity_dump("data", data.model_copy(update={"token_seed": 3}))["token_seed"] == 3


def test_the_models_own_tokenizer_is_used_when_on_disk(tokenizer: Any) -> None:
    from harness.config import ModelConfig
    from harness.models import load_tokenizer
    from harness.models.tiny import tiny_pipeline_dir

    assert load_tokenizer(ModelConfig(pretrained="tiny://sd15")) is None  # the offline BPE
    folder = tiny_pipeline_dir("sd15")
    found = load_tokenizer(ModelConfig(pretrained=str(folder)))
    assert found is not None
    own, source = found
    assert source.endswith("(tokenizer)")
    assert choose_token(own, 0).token == choose_token(tokenizer, 0).token  # the same ids
