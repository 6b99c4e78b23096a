"""DreamBooth metrics: DINO, CLIP-I, CLIP-T, real ceiling, prior preservation, diversity.

Standalone (never imports ``harness``). The scoring entry point is :class:`Scorer`::

    from metrics import Scorer, ScorerConfig

    scorer = Scorer(ScorerConfig())  # DINO ViT-S/16 + CLIP ViT-B/32 (OpenAI), as in the paper
    result = scorer.score(real_paths, generated_paths, prompts, token="sks", class_name="dog")
    print(result.dino, result.ci["dino"], result.to_dict()["per_prompt"])

Command line: ``python -m metrics score --real DIR --generated DIR [--prompts FILE] [--json OUT]``.
"""

from metrics.api import ImageScore, PromptScore, Scorer, ScorerConfig, ScoreResult
from metrics.cache import EmbeddingCache, encode_cached
from metrics.encoders import ClipEncoder, DinoEncoder, ImageEncoder, load_clip, load_dino
from metrics.errors import MetricsError, MetricsInputError, WeightsUnavailableError
from metrics.images import ImageInput, load_image
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

__all__ = [
    "IDENTIFIER_POLICIES",
    "ClipEncoder",
    "DinoEncoder",
    "EmbeddingCache",
    "IdentifierPolicy",
    "ImageEncoder",
    "ImageInput",
    "ImageScore",
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
    "match_prompts",
    "per_row_mean",
    "read_prompts_file",
    "self_pairs_mean",
    "text_for_clip",
]
