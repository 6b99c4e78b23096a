"""The scoring API: :class:`ScorerConfig`, :class:`Scorer` and :class:`ScoreResult`.

Example:
    >>> scorer = Scorer(ScorerConfig(dino_model="tiny://dino", clip_model="tiny://clip"))
    >>> result = scorer.score(real_paths, image_paths, prompts, token="sks", class_name="dog")
    >>> result.dino, result.ci["dino"]  # doctest: +SKIP

Protocol (DreamBooth, Ruiz et al. 2023):

* DINO: mean cosine over all (generated, real) pairs of DINO ViT-S/16 [CLS] embeddings.
* CLIP-I: the same with CLIP ViT-B/32 (OpenAI) projected image embeddings.
* CLIP-T: mean cosine between each generated image and the text of its prompt, with the
  identifier token treated by ``identifier_policy`` (see :mod:`metrics.prompts`).
* Real ceiling: DINO / CLIP-I among the real photos, self-pairs excluded.
* PRES: DINO all-pairs mean between images generated for the bare class prompt and the real
  photos (lower = the prior is better preserved).
* DIV (the paper's): per prompt, the mean LPIPS distance (:mod:`metrics.lpips`, AlexNet)
  over the unordered pairs of its generated images; the reported DIV is the mean over prompts
  with at least two images. Needs LPIPS weights (``lpips_weights``); without them ``div`` is
  ``None`` and ``metadata["div_unmeasured"]`` says why.
* DIV-DINO (``div_dino``, this package's DIV before it followed the paper): per prompt,
  ``1 - mean pairwise DINO similarity`` among its generated images (self-pairs excluded),
  averaged over prompts the same way.

Means come with 95% percentile-bootstrap intervals that resample prompts (see
:func:`metrics.scores.bootstrap_ci`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from metrics import scores
from metrics.cache import EmbeddingCache, encode_cached
from metrics.encoders import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    DEFAULT_DINO_MODEL,
    TINY_CLIP,
    ClipEncoder,
    DinoEncoder,
    ImageEncoder,
    load_clip,
    load_dino,
)
from metrics.errors import MetricsInputError
from metrics.images import ImageInput, image_name
from metrics.lpips import LpipsEncoder, load_lpips
from metrics.prompts import IDENTIFIER_POLICIES, IdentifierPolicy, text_for_clip

__all__ = ["ImageScore", "PromptScore", "ScoreResult", "Scorer", "ScorerConfig"]

CI_LEVEL = 0.95
DIV_METRIC = "lpips"
DIV_DINO_EMBEDDING = "dino"
NO_LPIPS_WEIGHTS = (
    "no LPIPS weights configured (lpips_weights: a file from `python -m metrics lpips-convert`)"
)


@dataclass(frozen=True)
class ScorerConfig:
    """Models and protocol options. Defaults reproduce the DreamBooth paper's setup.

    Attributes:
        dino_model: ``"timm/vit_small_patch16_224.dino"``, a ``.safetensors`` file, or
            ``"tiny://dino"``.
        clip_model: open_clip architecture (``"ViT-B-32"``) or ``"tiny://clip"``.
        clip_pretrained: pretrained tag (``"openai"``), a ``.safetensors`` file, or ``None``.
        identifier_policy: ``"remove"`` | ``"keep"`` | ``"replace_with_class"`` (CLIP-T text).
        batch_size: images/texts per forward pass.
        bootstrap_samples: bootstrap resamples for the 95% intervals (0: no intervals).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        bf16_autocast: bf16 autocast on CUDA (ignored on CPU, where fp32 is deterministic).
        cache_dir: embedding cache for real photos (default ``$METRICS_CACHE_DIR`` or
            ``~/.cache/harness-metrics``).
        use_cache: read/write the embedding cache for real photos.
        seed: bootstrap seed (and init seed of tiny models).
        lpips_weights: the LPIPS weights of DIV: a ``.safetensors`` file (see
            :mod:`metrics.lpips`), ``"tiny"`` (random, for tests), or ``None`` (no DIV).
    """

    dino_model: str = DEFAULT_DINO_MODEL
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    identifier_policy: IdentifierPolicy = "remove"
    batch_size: int = 16
    bootstrap_samples: int = 1000
    device: str = "cpu"
    bf16_autocast: bool = False
    cache_dir: str | None = None
    use_cache: bool = True
    seed: int = 0
    lpips_weights: str | None = None

    def __post_init__(self) -> None:
        if self.identifier_policy not in IDENTIFIER_POLICIES:
            raise ValueError(
                f"identifier_policy must be one of {IDENTIFIER_POLICIES}, "
                f"got {self.identifier_policy!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.bootstrap_samples < 0:
            raise ValueError(f"bootstrap_samples must be >= 0, got {self.bootstrap_samples}")


@dataclass(frozen=True)
class ImageScore:
    """Scores of one generated image (DINO / CLIP-I: mean over the real photos)."""

    index: int
    name: str
    prompt: str | None
    text: str | None
    dino: float
    clip_i: float
    clip_t: float | None


@dataclass(frozen=True)
class PromptScore:
    """Scores of the images of one prompt (means over its images; ``div`` (LPIPS) and
    ``div_dino`` need >= 2 images, ``div`` also LPIPS weights)."""

    prompt: str
    text: str
    n_images: int
    dino: float
    clip_i: float
    clip_t: float
    div: float | None
    div_dino: float | None


@dataclass(frozen=True)
class ScoreResult:
    """Means, 95% bootstrap intervals over prompts, per-image/per-prompt rows and metadata.

    ``clip_t`` is ``None`` without prompts; ``div`` and ``div_dino`` are ``None`` when no
    prompt has two images, ``div`` also without LPIPS weights (``metadata["div_unmeasured"]``
    says why). ``ci[name]`` is ``(lo, hi)`` or ``None`` (no bootstrap samples / no value).
    """

    dino: float
    clip_i: float
    clip_t: float | None
    div: float | None
    div_dino: float | None
    ci: dict[str, tuple[float, float] | None]
    images: tuple[ImageScore, ...]
    prompts: tuple[PromptScore, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def means(self) -> dict[str, float | None]:
        """``{"dino", "clip_i", "clip_t", "div", "div_dino"}`` -> mean (``None``: not computed)."""
        return {
            "dino": self.dino,
            "clip_i": self.clip_i,
            "clip_t": self.clip_t,
            "div": self.div,
            "div_dino": self.div_dino,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (lists instead of tuples, plain floats)."""
        return {
            "means": self.means(),
            "ci95": {k: list(v) if v is not None else None for k, v in self.ci.items()},
            "per_prompt": [dataclasses.asdict(row) for row in self.prompts],
            "per_image": [dataclasses.asdict(row) for row in self.images],
            "metadata": dict(self.metadata),
        }


class Scorer:
    """Scores generated images against a subject's real photos.

    Encoders are loaded lazily, once per scorer, and real-photo embeddings go through the
    content-hash cache, so one scorer can serve a whole sweep.
    """

    def __init__(
        self,
        config: ScorerConfig | None = None,
        *,
        dino: DinoEncoder | None = None,
        clip: ClipEncoder | None = None,
        lpips: LpipsEncoder | None = None,
    ) -> None:
        """Args: ``config``; ``dino``/``clip``/``lpips``: ready encoders instead of loading."""
        self.config = config or ScorerConfig()
        self._dino = dino
        self._clip = clip
        self._lpips = lpips
        self._cache = EmbeddingCache(self.config.cache_dir) if self.config.use_cache else None

    @property
    def dino(self) -> DinoEncoder:
        """The DINO encoder (loaded on first use)."""
        if self._dino is None:
            c = self.config
            self._dino = load_dino(
                c.dino_model,
                c.device,
                batch_size=c.batch_size,
                bf16_autocast=c.bf16_autocast,
                seed=c.seed,
            )
        return self._dino

    @property
    def clip(self) -> ClipEncoder:
        """The CLIP encoder (loaded on first use)."""
        if self._clip is None:
            c = self.config
            self._clip = load_clip(
                c.clip_model,
                c.clip_pretrained,
                c.device,
                batch_size=c.batch_size,
                bf16_autocast=c.bf16_autocast,
                seed=c.seed,
            )
        return self._clip

    @property
    def lpips(self) -> LpipsEncoder | None:
        """The LPIPS encoder of DIV (loaded on first use; ``None`` without LPIPS weights)."""
        c = self.config
        if self._lpips is None and c.lpips_weights is not None:
            self._lpips = load_lpips(
                c.lpips_weights, c.device, batch_size=c.batch_size, seed=c.seed
            )
        return self._lpips

    def load_encoders(self) -> None:
        """Load the encoders now (they load lazily otherwise).

        A long job calls this first, so that missing or unsafe weights fail in seconds
        (:class:`~metrics.errors.WeightsUnavailableError`) rather than after hours of work.
        """
        _ = self.dino, self.clip, self.lpips

    def _embed_real(self, encoder: ImageEncoder, real: Sequence[ImageInput]) -> torch.Tensor:
        if self._cache is None:
            return encoder.encode_images(real)
        return encode_cached(encoder.encode_images, encoder.id, real, self._cache)

    def _interval(self, groups: Sequence[Sequence[float]]) -> tuple[float, float] | None:
        if self.config.bootstrap_samples == 0 or not groups:
            return None
        return scores.bootstrap_ci(
            groups, n=self.config.bootstrap_samples, seed=self.config.seed, level=CI_LEVEL
        )

    def _model_metadata(self) -> dict[str, Any]:
        c = self.config
        return {
            "dino_model": c.dino_model,
            "clip_model": c.clip_model,
            "clip_pretrained": None if c.clip_model == TINY_CLIP else c.clip_pretrained,
            "dino_encoder_id": self.dino.id,
            "clip_encoder_id": self.clip.id,
            # Which LPIPS weights made DIV: "tiny:seed=<n>" or "<file>@sha256:<12 hex>".
            "lpips_weights": self.lpips.id if self.lpips is not None else None,
        }

    def score(
        self,
        real: Sequence[ImageInput],
        generated: Sequence[ImageInput],
        prompts: Sequence[str] | None = None,
        token: str | None = None,
        class_name: str | None = None,
    ) -> ScoreResult:
        """DINO, CLIP-I, CLIP-T, DIV (LPIPS) and DIV-DINO of ``generated`` against ``real``.

        Args:
            real: the subject's real photos (paths or PIL images).
            generated: generated images; ``prompts[i]`` is the prompt of ``generated[i]``.
            prompts: one prompt per generated image, or ``None`` to skip CLIP-T and both DIVs
                (the intervals then resample single images).
            token: the identifier token (e.g. ``"sks"``); needed unless the policy is ``keep``.
            class_name: the class noun; needed by ``replace_with_class``.

        Raises:
            MetricsInputError: empty inputs, prompts not matching the images, unreadable images.
        """
        _check_inputs(real, generated, prompts)
        texts = self._clip_texts(prompts, token, class_name)
        dino_real = self._embed_real(self.dino, real)
        clip_real = self._embed_real(self.clip, real)
        dino_gen = self.dino.encode_images(generated)
        clip_gen = self.clip.encode_images(generated)
        rows = _Rows(
            dino=scores.per_row_mean(dino_gen, dino_real),
            clip_i=scores.per_row_mean(clip_gen, clip_real),
            clip_t=self._clip_t_rows(clip_gen, prompts, texts),
        )
        names = [image_name(image, i) for i, image in enumerate(generated)]
        members = _members_by_prompt(prompts)
        lpips_divs = self._lpips_divs(generated, members)
        prompt_rows = _prompt_scores(members, texts, dino_gen, rows, lpips_divs)
        divs = _DivValues(
            div=[row.div for row in prompt_rows if row.div is not None],
            div_dino=[row.div_dino for row in prompt_rows if row.div_dino is not None],
        )
        metadata = self._score_metadata(
            token=token,
            class_name=class_name,
            texts=texts,
            n_real=len(real),
            n_generated=len(generated),
            n_prompts=len(prompt_rows) if prompts is not None else None,
        )
        metadata["div_unmeasured"] = None if divs.div else self._div_reason(members)
        return ScoreResult(
            dino=scores.all_pairs_mean(dino_gen, dino_real),
            clip_i=scores.all_pairs_mean(clip_gen, clip_real),
            clip_t=float(rows.clip_t.mean()) if rows.clip_t is not None else None,
            div=_mean(divs.div),
            div_dino=_mean(divs.div_dino),
            ci=self._intervals(rows, _bootstrap_groups(members, names), divs),
            images=_image_scores(names, prompts, texts, rows),
            prompts=tuple(prompt_rows),
            metadata=metadata,
        )

    def _lpips_divs(
        self, generated: Sequence[ImageInput], members: Mapping[str, list[int]]
    ) -> dict[str, float]:
        """DIV of each prompt with two or more images: its mean pairwise LPIPS distance
        (``{}`` without LPIPS weights). Features are computed once per image."""
        encoder = self.lpips
        if encoder is None:
            return {}
        return {
            prompt: encoder.mean_pair_distance([generated[i] for i in idx])
            for prompt, idx in members.items()
            if len(idx) >= 2
        }

    def _div_reason(self, members: Mapping[str, list[int]]) -> str:
        """Why DIV was not measured (one line)."""
        if not members:
            return "no prompts (DIV compares images of the same prompt)"
        if all(len(idx) < 2 for idx in members.values()):
            return "no prompt has two or more images"
        return NO_LPIPS_WEIGHTS

    def _clip_texts(
        self, prompts: Sequence[str] | None, token: str | None, class_name: str | None
    ) -> dict[str, str]:
        """The CLIP-T text of each distinct prompt under the identifier policy (``{}``: none)."""
        if prompts is None:
            return {}
        policy = self.config.identifier_policy
        try:
            return {p: text_for_clip(p, token, class_name, policy) for p in dict.fromkeys(prompts)}
        except ValueError as exc:
            raise MetricsInputError(str(exc)) from None

    def _clip_t_rows(
        self, clip_gen: torch.Tensor, prompts: Sequence[str] | None, texts: Mapping[str, str]
    ) -> torch.Tensor | None:
        """CLIP-T per generated image: cosine with its prompt's text (each text encoded once)."""
        if prompts is None:
            return None
        unique_texts = list(dict.fromkeys(texts.values()))
        text_emb = self.clip.encode_texts(unique_texts)
        row_of_text = {t: i for i, t in enumerate(unique_texts)}
        matched = text_emb[[row_of_text[texts[p]] for p in prompts]]
        return (clip_gen.double() * matched.double()).sum(dim=1)

    def _intervals(
        self, rows: _Rows, groups: Sequence[Sequence[int]], divs: _DivValues
    ) -> dict[str, tuple[float, float] | None]:
        """Bootstrap intervals of every mean; the DIVs resample their per-prompt values."""

        def grouped(values: torch.Tensor) -> list[list[float]]:
            return [[float(values[i]) for i in group] for group in groups]

        return {
            "dino": self._interval(grouped(rows.dino)),
            "clip_i": self._interval(grouped(rows.clip_i)),
            "clip_t": self._interval(grouped(rows.clip_t)) if rows.clip_t is not None else None,
            "div": self._interval([[v] for v in divs.div]) if divs.div else None,
            "div_dino": self._interval([[v] for v in divs.div_dino]) if divs.div_dino else None,
        }

    def _score_metadata(
        self,
        *,
        token: str | None,
        class_name: str | None,
        texts: Mapping[str, str],
        n_real: int,
        n_generated: int,
        n_prompts: int | None,
    ) -> dict[str, Any]:
        """Models, protocol options and counts of one :meth:`score` call (``n_prompts``:
        ``None`` without prompts, when the intervals resample images)."""
        return {
            **self._model_metadata(),
            "identifier_policy": self.config.identifier_policy,
            "token": token,
            "class_name": class_name,
            "encoded_texts": dict(sorted(texts.items())),
            "div_metric": DIV_METRIC,
            "div_dino_embedding": DIV_DINO_EMBEDDING,
            "n_real": n_real,
            "n_generated": n_generated,
            "n_prompts": n_prompts,
            "bootstrap_samples": self.config.bootstrap_samples,
            "ci_level": CI_LEVEL,
            "ci_resamples": "prompts" if n_prompts is not None else "images",
            "seed": self.config.seed,
        }

    def real_ceiling(self, real: Sequence[ImageInput]) -> dict[str, Any]:
        """The "Real images" row: DINO and CLIP-I among the real photos, self-pairs excluded.

        Returns ``{"dino", "clip_i", "n_real"}``. Needs at least two photos.
        """
        if len(real) < 2:
            raise MetricsInputError(
                f"the real ceiling needs at least 2 real images, got {len(real)}"
            )
        return {
            "dino": scores.self_pairs_mean(self._embed_real(self.dino, real)),
            "clip_i": scores.self_pairs_mean(self._embed_real(self.clip, real)),
            "n_real": len(real),
        }

    def prior_preservation(
        self, class_images: Sequence[ImageInput], real: Sequence[ImageInput]
    ) -> float:
        """PRES (lower is better): DINO all-pairs mean, bare-class-prompt images x real photos."""
        if not class_images:
            raise MetricsInputError("no class-prompt images for prior preservation")
        if not real:
            raise MetricsInputError("no real images to score against")
        return scores.all_pairs_mean(
            self.dino.encode_images(class_images), self._embed_real(self.dino, real)
        )


@dataclass(frozen=True)
class _DivValues:
    """Per-prompt values of the two DIVs (prompts with a value only), in prompt order."""

    div: list[float]
    div_dino: list[float]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class _Rows:
    """Per-generated-image similarities, in input order (``clip_t``: ``None`` without prompts)."""

    dino: torch.Tensor
    clip_i: torch.Tensor
    clip_t: torch.Tensor | None


def _check_inputs(
    real: Sequence[ImageInput], generated: Sequence[ImageInput], prompts: Sequence[str] | None
) -> None:
    """Refuse empty inputs and a prompt list that does not match the generated images."""
    if not real:
        raise MetricsInputError("no real images to score against")
    if not generated:
        raise MetricsInputError("no generated images to score")
    if prompts is not None and len(prompts) != len(generated):
        raise MetricsInputError(
            f"{len(prompts)} prompts for {len(generated)} generated images: "
            "need exactly one prompt per image"
        )


def _members_by_prompt(prompts: Sequence[str] | None) -> dict[str, list[int]]:
    """Indices of the generated images of each prompt (``{}`` without prompts)."""
    members: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts or ()):
        members.setdefault(prompt, []).append(i)
    return members


def _bootstrap_groups(members: Mapping[str, list[int]], names: Sequence[str]) -> list[list[int]]:
    """What the bootstrap resamples: prompts in sorted order, else single images by name.

    Never file order, so the intervals do not depend on how the images were listed.
    """
    if members:
        return [members[p] for p in sorted(members)]
    return [[i] for i in sorted(range(len(names)), key=lambda i: names[i])]


def _image_scores(
    names: Sequence[str],
    prompts: Sequence[str] | None,
    texts: Mapping[str, str],
    rows: _Rows,
) -> tuple[ImageScore, ...]:
    """One :class:`ImageScore` per generated image, in input order."""
    return tuple(
        ImageScore(
            index=i,
            name=name,
            prompt=prompts[i] if prompts is not None else None,
            text=texts[prompts[i]] if prompts is not None else None,
            dino=float(rows.dino[i]),
            clip_i=float(rows.clip_i[i]),
            clip_t=float(rows.clip_t[i]) if rows.clip_t is not None else None,
        )
        for i, name in enumerate(names)
    )


def _prompt_scores(
    members: Mapping[str, list[int]],
    texts: Mapping[str, str],
    dino_gen: torch.Tensor,
    rows: _Rows,
    lpips_divs: Mapping[str, float],
) -> list[PromptScore]:
    """One :class:`PromptScore` per prompt, sorted by prompt (``[]`` without prompts).

    ``div``: the prompt's LPIPS DIV from ``lpips_divs``; ``div_dino`` from its images' DINO
    embeddings. Both need at least two images.
    """
    if rows.clip_t is None:
        return []
    out = []
    for prompt in sorted(members):
        idx = members[prompt]
        out.append(
            PromptScore(
                prompt=prompt,
                text=texts[prompt],
                n_images=len(idx),
                dino=float(rows.dino[idx].mean()),
                clip_i=float(rows.clip_i[idx].mean()),
                clip_t=float(rows.clip_t[idx].mean()),
                div=lpips_divs.get(prompt),
                div_dino=scores.diversity(dino_gen[idx]) if len(idx) >= 2 else None,
            )
        )
    return out
