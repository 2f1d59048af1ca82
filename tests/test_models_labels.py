from __future__ import annotations

import pytest

from models.labels import (
    FASHIONPEDIA_NAMES,
    KEPT_IDS,
    LABELS,
    NUM_LABELS,
    Coarse,
    label_by_name,
    label_for_feed_category,
)

GARMENT_PARTS = {
    "hood", "collar", "lapel", "epaulette", "sleeve", "pocket", "neckline", "buckle", "zipper",
    "applique", "bead", "bow", "flower", "fringe", "ribbon", "rivet", "ruffle", "sequin", "tassel",
}  # fmt: skip

# The prototype's 18 kept categories and their coarse classes (SEED_NOTES).
PROTOTYPE = {
    "shirt, blouse": "top", "top, t-shirt, sweatshirt": "top", "sweater": "top",
    "cardigan": "top", "vest": "top", "pants": "bottom", "shorts": "bottom", "skirt": "bottom",
    "dress": "dress", "jumpsuit": "dress", "jacket": "jacket", "coat": "jacket", "shoe": "shoes",
    "bag, wallet": "bag", "watch": "accessory", "glasses": "accessory", "hat": "accessory",
    "headband, head covering, hair accessory": "accessory",
}  # fmt: skip


def test_fashionpedia_order() -> None:
    assert NUM_LABELS == 46
    assert FASHIONPEDIA_NAMES[0] == "shirt, blouse"
    assert FASHIONPEDIA_NAMES[23] == "shoe"
    assert FASHIONPEDIA_NAMES[24] == "bag, wallet"
    assert FASHIONPEDIA_NAMES[27] == "hood"
    assert FASHIONPEDIA_NAMES[45] == "tassel"
    assert [label.id for label in LABELS] == list(range(46))


def test_garment_parts_dropped_everything_else_kept() -> None:
    dropped = {label.name for label in LABELS if not label.kept}
    assert dropped == GARMENT_PARTS
    assert len(KEPT_IDS) == 46 - len(GARMENT_PARTS)
    for label in LABELS:
        assert (label.coarse is None) == (not label.kept)


def test_prototype_coarse_map_is_preserved() -> None:
    for name, coarse in PROTOTYPE.items():
        assert label_by_name(name).coarse == Coarse(coarse), name


def test_newly_kept_categories() -> None:
    for name in ("tie", "glove", "belt", "scarf", "umbrella", "sock", "tights, stockings"):
        assert label_by_name(name).kept, name
    assert label_by_name("cape").coarse is Coarse.JACKET


@pytest.mark.parametrize(
    ("name", "noun", "grammar"),
    [
        ("shirt, blouse", "shirt", "count"),
        ("top, t-shirt, sweatshirt", "top", "count"),
        ("bag, wallet", "bag", "count"),
        ("pants", "pants", "plural"),
        ("shorts", "shorts", "plural"),
        ("tights, stockings", "tights", "plural"),
        ("glasses", "glasses", "pair"),
        ("shoe", "shoes", "pair"),
        ("glove", "gloves", "pair"),
        ("sock", "socks", "pair"),
    ],
)
def test_display_nouns(name: str, noun: str, grammar: str) -> None:
    label = label_by_name(name)
    assert (label.noun, label.grammar) == (noun, grammar)


def test_display_nouns_are_single_clean_nouns() -> None:
    for label in LABELS:
        assert "," not in label.noun and label.noun == label.noun.strip().lower()


@pytest.mark.parametrize(
    ("category", "expected"),
    [
        ("Dress", "dress"),
        ("Trousers", "pants"),
        ("jeans", "pants"),
        ("Sneakers", "shoe"),
        ("Handbag", "bag, wallet"),
        ("T-Shirt", "top, t-shirt, sweatshirt"),
        ("T-Shirts", "top, t-shirt, sweatshirt"),
        # the synthetic feed's categories
        ("top", "top, t-shirt, sweatshirt"),
        ("trousers", "pants"),
        ("skirt", "skirt"),
        ("jacket", "jacket"),
        ("shoe", "shoe"),
        ("bag", "bag, wallet"),
        # breadcrumbs, plurals and modifiers
        ("Women > Clothing > Dresses", "dress"),
        ("Women's Leather Handbags", "bag, wallet"),
        ("Dress Shoes", "shoe"),
        ("Shirt Dress", "dress"),
        ("  SUNGLASSES ", "glasses"),
    ],
)
def test_feed_category_mapping(category: str, expected: str) -> None:
    label = label_for_feed_category(category)
    assert label is not None and label.name == expected


@pytest.mark.parametrize("category", [None, "", "   ", "Clothing", "Gift card", "Sale"])
def test_unknown_feed_category(category: str | None) -> None:
    assert label_for_feed_category(category) is None
