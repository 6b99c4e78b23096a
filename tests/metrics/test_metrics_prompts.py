"""The identifier-token policy for CLIP-T texts."""

from __future__ import annotations

import pytest

from metrics.prompts import text_for_clip


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo of sks dog", "a photo of dog"),
        ("a sks dog on the beach", "a dog on the beach"),
        ("sks dog, in the snow", "dog, in the snow"),
        ("a dog that asks for food", "a dog that asks for food"),  # whole words only
        ("Sks dog in the snow", "dog in the snow"),  # CLIP's tokenizer lowercases: "sks" too
    ],
)
def test_remove(prompt: str, expected: str) -> None:
    assert text_for_clip(prompt, "sks", "dog", "remove") == expected


def test_keep_is_unchanged() -> None:
    assert text_for_clip("a photo of sks dog", "sks", "dog", "keep") == "a photo of sks dog"
    assert text_for_clip("a photo of sks dog", None, None, "keep") == "a photo of sks dog"


@pytest.mark.parametrize(
    ("prompt", "class_name", "expected"),
    [
        ("a photo of sks dog", "dog", "a photo of dog"),
        ("sks on the beach", "dog", "dog on the beach"),
        ("a sks stuffed animal", "stuffed animal", "a stuffed animal"),
        ("a red sks Dog", "dog", "a red Dog"),
        ("two sks dogs on a sofa", "dog", "two dogs on a sofa"),  # a plural is the class too
        ("three sks boxes", "box", "three boxes"),
        ("a SKS dog", "dog", "a dog"),
    ],
)
def test_replace_with_class(prompt: str, class_name: str, expected: str) -> None:
    assert text_for_clip(prompt, "sks", class_name, "replace_with_class") == expected


def test_policies_differ_where_they_should() -> None:
    prompt = "sks on the beach"
    texts = {
        p: text_for_clip(prompt, "sks", "dog", p) for p in ("remove", "keep", "replace_with_class")
    }
    assert texts == {
        "remove": "on the beach",
        "keep": "sks on the beach",
        "replace_with_class": "dog on the beach",
    }


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown identifier policy"):
        text_for_clip("a sks dog", "sks", "dog", "drop")
    with pytest.raises(ValueError, match="needs the identifier token"):
        text_for_clip("a sks dog", None, "dog", "remove")
    with pytest.raises(ValueError, match="needs the class name"):
        text_for_clip("a sks dog", "sks", None, "replace_with_class")
