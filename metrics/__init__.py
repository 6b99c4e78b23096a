"""DreamBooth metrics: DINO, CLIP-I, CLIP-T, real ceiling, prior preservation, DIV (LPIPS).

Standalone (never imports ``harness``). The scoring entry point is :class:`Scorer`::

    from metrics import Scorer, ScorerConfig

    scorer = Scorer(ScorerConfig())  # DINO ViT-S/16 + CLIP ViT-B/32 (OpenAI), as in the paper
    result = scorer.score(real_paths, generated_paths, prompts, token="sks", class_name="dog")
    print(result.dino, result.ci["dino"], result.to_dict()["per_prompt"])

Command line: ``python -m metrics score --real DIR --generated DIR [--prompts FILE] [--json OUT]
[--lpips-weights FILE]``; ``python -m metrics lpips-convert --out lpips_alex.safetensors`` builds
the LPIPS weights file of DIV.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Loaded on first use (PEP 562): `metrics.errors` or `metrics.prompts` alone does not import
# torch, timm or open_clip (a light command of a caller stays light).
_EXPORTS = {
    "ImageScore": "api",
    "PromptScore": "api",
    "Scorer": "api",
    "ScorerConfig": "api",
    "ScoreResult": "api",
    "EmbeddingCache": "cache",
    "encode_cached": "cache",
    "ClipEncoder": "encoders",
    "DinoEncoder": "encoders",
    "ImageEncoder": "encoders",
    "load_clip": "encoders",
    "load_dino": "encoders",
    "MetricsError": "errors",
    "MetricsInputError": "errors",
    "WeightsUnavailableError": "errors",
    "ImageInput": "images",
    "load_image": "images",
    "LpipsEncoder": "lpips",
    "LpipsNetwork": "lpips",
    "load_lpips": "lpips",
    "match_prompts": "manifest",
    "read_prompts_file": "manifest",
    "dino_crop_box": "preprocess",
    "dino_transform": "preprocess",
    "IDENTIFIER_POLICIES": "prompts",
    "IdentifierPolicy": "prompts",
    "text_for_clip": "prompts",
    "all_pairs_mean": "scores",
    "bootstrap_ci": "scores",
    "diversity": "scores",
    "per_row_mean": "scores",
    "self_pairs_mean": "scores",
}

if TYPE_CHECKING:
    from metrics.api import ImageScore, PromptScore, Scorer, ScorerConfig, ScoreResult
    from metrics.cache import EmbeddingCache, encode_cached
    from metrics.encoders import ClipEncoder, DinoEncoder, ImageEncoder, load_clip, load_dino
    from metrics.errors import MetricsError, MetricsInputError, WeightsUnavailableError
    from metrics.images import ImageInput, load_image
    from metrics.lpips import LpipsEncoder, LpipsNetwork, load_lpips
    from metrics.manifest import match_prompts, read_prompts_file
    from metrics.preprocess import dino_crop_box, dino_transform
    from metrics.prompts import IDENTIFIER_POLICIES, IdentifierPolicy, text_for_clip
    from metrics.scores import (
        all_pairs_mean,
        bootstrap_ci,
        diversity,
        per_row_mean,
        self_pairs_mean,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"metrics.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "IDENTIFIER_POLICIES",
    "ClipEncoder",
    "DinoEncoder",
    "EmbeddingCache",
    "IdentifierPolicy",
    "ImageEncoder",
    "ImageInput",
    "ImageScore",
    "LpipsEncoder",
    "LpipsNetwork",
    "MetricsError",
    "MetricsInputError",
    "PromptScore",
    "ScoreResult",
    "Scorer",
    "ScorerConfig",
    "WeightsUnavailableError",
    "all_pairs_mean",
    "bootstrap_ci",
    "dino_crop_box",
    "dino_transform",
    "diversity",
    "encode_cached",
    "load_clip",
    "load_dino",
    "load_image",
    "load_lpips",
    "match_prompts",
    "per_row_mean",
    "read_prompts_file",
    "self_pairs_mean",
    "text_for_clip",
]
