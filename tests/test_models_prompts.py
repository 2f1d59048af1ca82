from __future__ import annotations

import re

import pytest

from models.colour import COLOUR_FAMILIES
from models.labels import LABELS, label_by_name
from models.prompts import (
    FALLBACK_NOUN,
    TEMPLATES,
    crop_key,
    indefinite_article,
    make_prompt,
    noun_phrase,
    template_index,
)


@pytest.mark.parametrize(
    ("word", "article"),
    [
        ("orange", "an"),
        ("olive", "an"),
        ("umber", "an"),
        ("off-white", "an"),
        ("navy", "a"),
        ("uniform", "a"),
        ("european", "a"),
        ("hour", "an"),
        ("hot", "a"),
        ("Ivory", "an"),
    ],
)
def test_indefinite_article(word: str, article: str) -> None:
    assert indefinite_article(word) == article


@pytest.mark.parametrize(
    ("name", "colour", "phrase"),
    [
        ("cardigan", "navy blue", "a navy blue cardigan"),
        ("dress", "orange", "an orange dress"),
        ("umbrella", None, "an umbrella"),
        ("pants", "olive green", "olive green pants"),
        ("tights, stockings", "black", "black tights"),
        ("shoe", "black", "a pair of black shoes"),
        ("glasses", None, "a pair of glasses"),
        ("sock", "white", "a pair of white socks"),
        ("top, t-shirt, sweatshirt", "ivory", "an ivory top"),
        # colour families, the words prompts are written with
        ("jacket", "navy", "a navy jacket"),
        ("top, t-shirt, sweatshirt", "white", "a white top"),
        ("bag, wallet", "brown", "a brown bag"),
        ("pants", "grey", "grey pants"),
        ("dress", "multicolour", "a multicolour dress"),
    ],
)
def test_noun_phrase(name: str, colour: str | None, phrase: str) -> None:
    assert noun_phrase(label_by_name(name), colour) == phrase


def test_unlabelled_crop() -> None:
    assert noun_phrase(None, "red") == f"a red {FALLBACK_NOUN}"


def test_never_ungrammatical_for_any_kept_label() -> None:
    # "a shoes", "an black pants": an article directly governing a plural noun phrase
    plural_with_article = re.compile(r"^an? (?!pair of)")
    for label in LABELS:
        if not label.kept:
            continue
        for colour in (None, "umber", "navy blue", *COLOUR_FAMILIES):
            phrase = noun_phrase(label, colour)
            if label.grammar == "plural":
                assert not plural_with_article.match(phrase), phrase
            elif label.grammar == "pair":
                assert phrase.startswith("a pair of "), phrase
            else:
                first = phrase.split(" ", 2)[1]
                assert phrase.startswith(f"{indefinite_article(first)} {first}"), phrase
            for i in range(20):
                prompt = make_prompt(label, colour, crop_key("abc", i))
                assert phrase in prompt
                assert not re.search(r"\ban [b-df-hj-np-tv-z]", prompt), prompt
                assert not re.search(r"\ba [aeio]", prompt), prompt
                assert "  " not in prompt and prompt == prompt.strip()


def test_prompt_is_deterministic_per_crop() -> None:
    image_sha = "9f2c" * 16
    # Pinned: the template choice is a sha256 of the key, so it must not change between
    # processes, machines or Python versions (``hash()`` would, per process).
    assert make_prompt(label_by_name("dress"), "red", crop_key(image_sha, 3)) == (
        "a close-up photo of a red dress"
    )
    assert make_prompt(label_by_name("shoe"), "black", crop_key(image_sha, 4)) == (
        "a product photo of a pair of black shoes"
    )


def test_templates_vary_across_crops() -> None:
    used = {template_index(crop_key("img", i)) for i in range(200)}
    assert used == set(range(len(TEMPLATES)))
