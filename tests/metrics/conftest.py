"""Fixtures for the metrics tests: tiny random encoders and procedural images (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metrics import Scorer, ScorerConfig
from metrics.encoders import ClipEncoder, DinoEncoder, load_clip, load_dino
from metrics.lpips import LpipsEncoder, load_lpips

TINY_CONFIG = ScorerConfig(
    dino_model="tiny://dino",
    clip_model="tiny://clip",
    clip_pretrained=None,
    batch_size=4,
    bootstrap_samples=200,
    lpips_weights="tiny",
)


def make_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A seeded image of coloured blocks (structure, so embeddings differ between seeds)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    small = Image.fromarray(blocks)
    return small.resize(size, Image.Resampling.NEAREST)


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never write embeddings into the user's ~/.cache from tests.
    monkeypatch.setenv("METRICS_CACHE_DIR", str(tmp_path_factory.mktemp("metrics-cache")))


@pytest.fixture(scope="session")
def tiny_dino() -> DinoEncoder:
    return load_dino("tiny://dino", batch_size=4)


@pytest.fixture(scope="session")
def tiny_clip() -> ClipEncoder:
    return load_clip("tiny://clip", None, batch_size=4)


@pytest.fixture(scope="session")
def tiny_lpips() -> LpipsEncoder:
    return load_lpips("tiny", batch_size=4)


@pytest.fixture
def scorer_factory(
    tiny_dino: DinoEncoder, tiny_clip: ClipEncoder, tiny_lpips: LpipsEncoder, tmp_path: Path
) -> Callable[..., Scorer]:
    """Scorer on the shared tiny encoders (LPIPS: tiny unless ``lpips_weights`` is overridden)
    with a per-test cache folder."""

    def factory(**overrides: object) -> Scorer:
        fields = {**TINY_CONFIG.__dict__, "cache_dir": str(tmp_path / "cache"), **overrides}
        config = ScorerConfig(**fields)
        lpips = tiny_lpips if config.lpips_weights == "tiny" else None
        return Scorer(config, dino=tiny_dino, clip=tiny_clip, lpips=lpips)

    return factory


@pytest.fixture(name="make_image")
def _make_image_fixture() -> Callable[..., Image.Image]:
    """The :func:`make_image` helper, as a fixture (test modules do not import conftest)."""
    return make_image


@pytest.fixture
def image_dir(tmp_path: Path) -> Callable[[str, list[int]], Path]:
    """Write seeded PNGs ``img_<seed>.png`` into ``tmp_path/<name>``."""

    def write(name: str, seeds: list[int]) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            make_image(seed).save(folder / f"img_{seed:03d}.png")
        return folder

    return write
