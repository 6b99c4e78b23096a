"""Model loading and export edge cases: a single file missing a component, weight variants of
local folders, relative paths against the project root, a hub behind an HTTP(S) proxy, and the
model card's snippet for single-file base models."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import harness.models as models
from harness.config import ModelConfig
from harness.export import usage_snippet
from harness.models import ModelLoadError, load_pipeline, load_tokenizer, parse_model_ref
from harness.models.tiny import tiny_pipeline_dir
from tests.models.single_file import save_sd15_single_file


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# 1. A single-file checkpoint without one component's weights.


def test_single_file_without_text_encoder_names_the_component(
    tiny_sd15: Any, tmp_path: Path
) -> None:
    path = save_sd15_single_file(tiny_sd15.pipeline, tmp_path / "unet_vae.safetensors")
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if not k.startswith("cond_stage_model.")}, path)
    cfg = ModelConfig(
        pretrained=str(path), device="cpu", single_file_config=str(tiny_pipeline_dir("sd15"))
    )
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"model.pretrained: {path}: "), message
    assert "CLIPTextModel" in message and "missing" in message, message
    assert "model.single_file_config" in message, message


# 4. model.variant for a local diffusers folder.


def test_local_folder_with_only_a_variant_loads_with_model_variant(
    tiny_sd15: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "fp16-only"
    tiny_sd15.pipeline.save_pretrained(folder, variant="fp16")
    assert list(folder.rglob("*.fp16.safetensors"))
    assert not [p for p in folder.rglob("*.safetensors") if ".fp16." not in p.name]
    loaded = load_pipeline(ModelConfig(pretrained=str(folder), variant="fp16", device="cpu"))
    assert loaded.ref.kind == "local_dir"
    assert _same_weights(loaded.pipeline.unet, tiny_sd15.pipeline.unet)


def test_local_folder_missing_variant_gives_no_pickle_hint(tiny_sd15: Any, tmp_path: Path) -> None:
    # Weights saved as a variant, loaded without model.variant: the files are safetensors, so
    # "only safetensors weights are accepted" would send the user the wrong way.
    folder = tmp_path / "fp16-only"
    tiny_sd15.pipeline.save_pretrained(folder, variant="fp16")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(ModelConfig(pretrained=str(folder), device="cpu"))
    assert str(info.value).startswith(f"model.pretrained: {folder}: "), info.value
    assert "only safetensors weights are accepted" not in str(info.value)
    assert str(info.value).endswith("(the folder holds 'fp16' variant weights: set model.variant)")


def test_local_folder_with_pickle_weights_keeps_the_hint(tiny_sd15: Any, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    tiny_sd15.pipeline.save_pretrained(folder, safe_serialization=False)
    with pytest.raises(ModelLoadError, match=r"only safetensors weights are accepted"):
        load_pipeline(ModelConfig(pretrained=str(folder), device="cpu"))


# 5. A relative model.pretrained starts at the project root, not the working directory.


def test_relative_local_folder_resolves_against_the_project_root(
    tiny_sd15: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "project"
    shutil.copytree(tiny_pipeline_dir("sd15"), root / "models" / "sd15")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = ModelConfig(pretrained="models/sd15", device="cpu")
    # Without the root, "models/sd15" is not a folder here, so it reads as a hub id.
    assert parse_model_ref("models/sd15").kind == "hub"
    ref = parse_model_ref("models/sd15", root=root)
    assert (ref.kind, ref.value) == ("local_dir", str(root / "models" / "sd15"))
    loaded = load_pipeline(cfg, root=root)
    assert loaded.ref == ref
    assert _same_weights(loaded.pipeline.unet, tiny_sd15.pipeline.unet)
    found = load_tokenizer(cfg, root=root)
    assert found is not None and found[1] == "models/sd15 (tokenizer)"


def test_relative_single_file_and_its_config_resolve_against_the_project_root(
    tiny_sd15: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "project"
    save_sd15_single_file(tiny_sd15.pipeline, root / "weights" / "model.safetensors")
    shutil.copytree(tiny_pipeline_dir("sd15"), root / "configs" / "sd15")
    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(
        pretrained="weights/model.safetensors", single_file_config="configs/sd15", device="cpu"
    )
    loaded = load_pipeline(cfg, root=root)
    assert loaded.ref.kind == "single_file"
    assert loaded.ref.value == str(root / "weights" / "model.safetensors")
    assert _same_weights(loaded.pipeline.text_encoder, tiny_sd15.pipeline.text_encoder)
    assert load_tokenizer(cfg, root=root) is not None


def test_absolute_and_non_path_references_ignore_the_root(tmp_path: Path) -> None:
    folder = tiny_pipeline_dir("sd15")
    assert parse_model_ref(str(folder), root=tmp_path).value == str(folder)
    assert parse_model_ref("tiny://sd15", root=tmp_path).kind == "tiny"
    assert parse_model_ref("owner/name", root=tmp_path) == models.ModelRef("hub", "owner/name")


# 6. A hub reached through an HTTP(S) proxy.


def _failing_socket(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make every direct TCP connection fail (as behind a proxy-only firewall); the calls."""
    calls: list[Any] = []

    def refuse(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        calls.append(address)
        raise OSError("direct connections are blocked")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY"])
def test_hub_behind_a_proxy_is_left_to_huggingface_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    for name in (*_PROXY_VARS, "NO_PROXY", "no_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = _failing_socket(monkeypatch)
    assert models._hub_reachable() is False and calls  # no proxy: the probe decides
    monkeypatch.setenv(variable, "http://proxy.example:3128")
    calls.clear()
    assert models._hub_reachable() is True
    assert calls == []
    # Not in the cache, but a download through the proxy may work: not an offline error.
    assert models._hub_local_only("org/model", None, str(tmp_path)) is False


def test_hub_excluded_by_no_proxy_is_probed_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*_PROXY_VARS, "no_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    calls = _failing_socket(monkeypatch)
    assert models._hub_reachable() is False
    assert calls == [("huggingface.co", 443)]


def test_proxy_is_ignored_while_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        models._hub_local_only("org/model", None, str(tmp_path))


# 3. The model card's snippet for a single-file base model.


def _info(**changes: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "base_model": "weights/model.safetensors",
        "base_model_kind": "single_file",
        "family": "sd15",
        "revision": None,
        "variant": None,
        "single_file_config": None,
        "lora_components": ["unet"],
        "instance_prompt": "a photo of sks dog",
        "example": None,
        "scheduler": "ddim",
        "lora_scale": 0.8,
        "text_encoder_lora_scale": None,
        "guidance_scale": 5.0,
        "num_inference_steps": 2,
        "resolution": 64,
    }
    return {**info, **changes}


def test_snippet_loads_a_single_file_with_its_recorded_config() -> None:
    code = usage_snippet(_info(single_file_config="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    assert (
        "pipe = StableDiffusionPipeline.from_single_file(BASE, torch_dtype=dtype, "
        "config='stable-diffusion-v1-5/stable-diffusion-v1-5').to(device)"
    ) in code
    compile(code, "snippet", "exec")


def test_snippet_without_single_file_config_is_unchanged() -> None:
    code = usage_snippet(_info())
    assert "from_single_file(BASE, torch_dtype=dtype).to(device)" in code
    assert "config=" not in code


def test_model_info_run_from_another_folder_finds_the_projects_relative_model(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``harness -p project/params.yaml -S model.pretrained=models/sd15 model-info`` from
    another folder: the model is the project's folder, as every config path starts there."""
    import json

    from typer.testing import CliRunner

    from harness.cli import app

    project = tmp_path / "project"
    shutil.copytree(repo_root / "experiments", project / "experiments")
    (project / "params.yaml").write_text("preset: tiny-cpu\n")
    shutil.copytree(tiny_pipeline_dir("sd15"), project / "models" / "sd15")
    monkeypatch.chdir(tmp_path)
    args = ["-p", "project/params.yaml", "-S", "model.pretrained=models/sd15", "model-info"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    info = json.loads(done.stdout[done.stdout.index("{") :])
    assert info["kind"] == "local_dir" and info["family"] == "sd15"


def test_rooted_model_makes_only_existing_relative_paths_absolute(tmp_path: Path) -> None:
    from harness.models import rooted_model

    (tmp_path / "models" / "sd15").mkdir(parents=True)
    rooted = rooted_model(ModelConfig(pretrained="models/sd15"), tmp_path)
    assert rooted.pretrained == str((tmp_path / "models" / "sd15").resolve())
    cached = rooted_model(ModelConfig(pretrained="owner/name", cache_dir="hf-cache"), tmp_path)
    assert cached.cache_dir == str((tmp_path / "hf-cache").resolve())  # not the bench's tmp
    for kept in ("owner/name", "tiny://sd15", "random://sd15", "/abs/model.safetensors"):
        assert rooted_model(ModelConfig(pretrained=kept), tmp_path).pretrained == kept
