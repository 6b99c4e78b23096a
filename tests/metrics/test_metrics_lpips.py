"""LPIPS (metrics.lpips): zero for identical images, symmetric, and equal to the reference
``lpips`` package's distances once its weights go through ``python -m metrics lpips-convert``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from metrics import WeightsUnavailableError
from metrics.cli import main
from metrics.lpips import (
    LpipsEncoder,
    LpipsNetwork,
    convert_state_dict,
    load_lpips,
    lpips_lin_state,
)


def test_lpips_of_identical_images_is_zero(
    tiny_lpips: LpipsEncoder, make_image: Callable[..., Image.Image]
) -> None:
    image = make_image(3)
    assert tiny_lpips.distance(image, image.copy()) == 0.0
    distances = tiny_lpips.pair_distances([image, image.copy(), make_image(4)])
    assert distances[0] == 0.0 and distances[1] > 0 and distances[1] == distances[2]
    # the network itself, on tensors in [-1, 1]
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        assert tiny_lpips.model(x, x.clone()).abs().max() < 1e-7


def test_lpips_is_symmetric_positive_and_batch_independent(
    tiny_lpips: LpipsEncoder, make_image: Callable[..., Image.Image]
) -> None:
    images = [make_image(s) for s in range(5)]
    assert tiny_lpips.distance(images[0], images[1]) == tiny_lpips.distance(images[1], images[0])
    pairs = tiny_lpips.pair_distances(images)
    assert pairs.shape == (10,) and bool((pairs > 0).all())
    one_at_a_time = LpipsEncoder(tiny_lpips.model, weights_id="x", device=tiny_lpips.device)
    one_at_a_time.batch_size = 1
    torch.testing.assert_close(one_at_a_time.pair_distances(images), pairs, atol=1e-6, rtol=0)
    assert tiny_lpips.mean_pair_distance(images) == pytest.approx(float(pairs.mean()))
    # differing sizes: compared at the smallest width and height
    mixed = [make_image(0, size=(96, 80)), make_image(1, size=(80, 96))]
    assert tiny_lpips.distance(*mixed) > 0


def test_backbone_is_torchvisions_alexnet_features() -> None:
    import torchvision

    reference = torchvision.models.alexnet(weights=None).features
    ours = LpipsNetwork("alex").features
    assert len(ours) == len(reference) - 1  # the final max-pool is never tapped
    for mine, theirs in zip(ours, reference, strict=False):
        assert repr(mine) == repr(theirs).replace("inplace=True", "")


def _reference_lpips(net: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The reference package's LPIPS with random trunk and lin weights, built with every
    download path of torch hub and torchvision made to fail (it must not download)."""
    lpips = pytest.importorskip("lpips")
    import torchvision.models._api as tv_api

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference LPIPS tried to download weights")

    with monkeypatch.context() as patch, warnings.catch_warnings():
        # lpips passes torchvision the deprecated `pretrained=False` (it means weights=None)
        warnings.simplefilter("ignore", UserWarning)
        patch.setattr(torch.hub, "load_state_dict_from_url", no_download)
        patch.setattr(torch.hub, "download_url_to_file", no_download)
        patch.setattr(tv_api, "load_state_dict_from_url", no_download)
        torch.manual_seed(0)
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    return model.eval()


def _torchvision_state(reference: Any) -> dict[str, torch.Tensor]:
    """The reference trunk's weights as torchvision names them (``features.<i>.*``), plus a
    classifier entry as torchvision's file has (the converter ignores it)."""
    state = {
        f"features.{key.split('.', 1)[1]}": value
        for key, value in reference.net.state_dict().items()
    }
    return {**state, "classifier.1.weight": torch.zeros(4, 4)}


def _lin_state(reference: Any) -> dict[str, torch.Tensor]:
    """The reference's lin weights as lpips' ``weights/v0.1/<net>.pth`` names them."""
    return {
        k: v for k, v in reference.state_dict().items() if k.startswith("lin") and "lins" not in k
    }


@pytest.mark.parametrize("net", ["alex", pytest.param("vgg", marks=pytest.mark.slow)])
def test_converted_weights_match_the_lpips_package(
    net: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = _reference_lpips(net, monkeypatch)
    monkeypatch.setattr("metrics.lpips.lpips_lin_state", lambda n, p: _lin_state(reference))
    monkeypatch.setattr(
        "metrics.lpips.torchvision_backbone_state", lambda n, p: _torchvision_state(reference)
    )
    out = tmp_path / f"lpips_{net}.safetensors"
    assert main(["lpips-convert", "--out", str(out), "--net", net]) == 0
    assert str(out) in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["net"] == net and handle.metadata()["version"] == "0.1"
        assert {"lin.4.weight", "features.0.weight"} <= set(handle.keys())
    ours = load_lpips(str(out))
    assert ours.id.startswith(f"lpips_{net}.safetensors@sha256:")

    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 64, 64, generator=generator) * 2 - 1
    y = torch.rand(4, 3, 64, 64, generator=generator) * 2 - 1
    with torch.inference_mode():
        expected = reference(x, y).flatten()
        torch.testing.assert_close(ours.model(x, y), expected, atol=1e-5, rtol=0)
        # from features computed once per image, as DIV computes its pairs
        feats = ours.model.layer_features(torch.cat([x, y]))
        pairs = ours.model.feature_distance([f[:4] for f in feats], [f[4:] for f in feats])
    torch.testing.assert_close(pairs, expected, atol=1e-5, rtol=0)


def test_converter_reads_the_installed_lin_weights_and_a_local_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("lpips")
    random_trunk = {k: v for k, v in LpipsNetwork().state_dict().items() if k.startswith("f")}
    lin = convert_state_dict({**random_trunk, **lpips_lin_state("alex")})
    assert [tuple(lin[f"lin.{k}.weight"].shape)[1] for k in range(5)] == [64, 192, 384, 256, 256]
    assert all(bool((lin[f"lin.{k}.weight"] >= 0).all()) for k in range(5))  # trained: >= 0
    # torchvision's file format, from a random AlexNet (the real one is downloaded by users)
    backbone = tmp_path / "alexnet.pth"
    torch.manual_seed(0)
    torch.save({**random_trunk, "classifier.1.bias": torch.zeros(4096)}, backbone)
    out = tmp_path / "lpips_alex.safetensors"
    assert main(["lpips-convert", "--out", str(out), "--backbone", str(backbone)]) == 0
    encoder = load_lpips(str(out))
    torch.testing.assert_close(encoder.model.lin[2].weight, lin["lin.2.weight"])


def test_unusable_lpips_weights_are_refused(tmp_path: Path) -> None:
    pickle = tmp_path / "alex.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(WeightsUnavailableError, match="pickled"):
        load_lpips(str(pickle))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_lpips(str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"lin.0.weight": torch.zeros(1, 64, 1, 1)}, str(wrong))
    with pytest.raises(WeightsUnavailableError, match="do not fit LPIPS"):
        load_lpips(str(wrong))
    with pytest.raises(WeightsUnavailableError, match="unexpected key"):
        convert_state_dict({"decoder.0.weight": torch.zeros(1)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lpips_on_cuda_equals_cpu(make_image: Callable[..., Image.Image]) -> None:
    images = [make_image(s) for s in range(4)]
    cpu, cuda = load_lpips("tiny"), load_lpips("tiny", device="cuda")
    torch.testing.assert_close(
        cuda.pair_distances(images), cpu.pair_distances(images), atol=1e-5, rtol=1e-4
    )
    assert cuda.distance(images[0], images[0].copy()) == 0.0
