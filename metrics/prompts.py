"""The identifier-token policy: which text CLIP-T encodes for a DreamBooth prompt.

A DreamBooth prompt names the subject with a rare identifier token followed by its class
noun, e.g. ``"a photo of sks dog"``. The identifier means nothing to a pretrained CLIP text
encoder, so by default it is removed before encoding (the class noun is kept). The policy
used is recorded with every score because it moves CLIP-T.

Policies:
    ``remove`` (default): drop the identifier: ``"a photo of sks dog"`` -> ``"a photo of dog"``.
    ``keep``: encode the prompt unchanged.
    ``replace_with_class``: put the class noun where the identifier was, without doubling it
        when the class noun already follows: ``"a photo of sks dog"`` -> ``"a photo of dog"``,
        ``"sks on the beach"`` -> ``"dog on the beach"`` (``remove`` gives ``"on the beach"``).

Example:
    >>> text_for_clip("a photo of sks dog", "sks", "dog", "remove")
    'a photo of dog'
"""

from __future__ import annotations

import re
from typing import Literal, get_args

__all__ = ["IDENTIFIER_POLICIES", "IdentifierPolicy", "text_for_clip"]

IdentifierPolicy = Literal["remove", "keep", "replace_with_class"]
IDENTIFIER_POLICIES: tuple[str, ...] = get_args(IdentifierPolicy)


def _token_pattern(token: str) -> re.Pattern[str]:
    # Whole-word match: "sks" must not eat the "sks" inside "asks". Any case: CLIP's tokenizer
    # lowercases, so "Sks" at the start of a prompt is the identifier to it as well.
    return re.compile(rf"(?<!\w)(?i:{re.escape(token)})(?!\w)")


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ([,.;:!?])", r"\1", text)


def text_for_clip(
    prompt: str, token: str | None, class_name: str | None, policy: str = "remove"
) -> str:
    """The text CLIP-T encodes for ``prompt`` under the identifier ``policy``.

    Args:
        prompt: the generation prompt, e.g. ``"a sks dog on the beach"``.
        token: the identifier token; ``None`` only with ``policy="keep"``.
        class_name: the class noun; needed by ``replace_with_class``.
        policy: one of :data:`IDENTIFIER_POLICIES`.

    Raises:
        ValueError: an unknown policy, or a policy that lacks its token or class name.
    """
    if policy not in IDENTIFIER_POLICIES:
        raise ValueError(f"unknown identifier policy {policy!r}; choose from {IDENTIFIER_POLICIES}")
    if policy == "keep":
        return prompt
    if not token:
        raise ValueError(f"identifier policy {policy!r} needs the identifier token")
    pattern = _token_pattern(token)
    if policy == "remove":
        return _tidy(pattern.sub(" ", prompt))
    if not class_name:
        raise ValueError("identifier policy 'replace_with_class' needs the class name")
    # The class noun after the identifier, a plural included ("two sks dogs").
    followed_by_class = re.compile(
        rf"(?<!\w)(?i:{re.escape(token)})\s+(?=(?i:{re.escape(class_name)})(?:e?s)?(?!\w))"
    )
    text = followed_by_class.sub("", prompt)  # "sks dog" -> "dog"
    text = pattern.sub(class_name, text)  # a lone "sks" -> "dog"
    return _tidy(text)
