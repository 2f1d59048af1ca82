"""The detector's label space and everything flickd derives from a label.

The Fashionpedia-trained detector predicts 46 apparel categories. flickd keeps the categories that
are a whole, sellable item (garments, shoes, bags, accessories) and drops garment *parts* (sleeve,
collar, zipper …), which are not products anyone searches a catalog for.

Compared with the prototype, which kept 18 categories, flickd also keeps cape, tie, glove, belt,
leg warmer, tights, sock, scarf and umbrella: they are sold as products in their own right, and
dropping them meant a catalog image of a scarf produced no crop at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Coarse(StrEnum):
    """The prototype's seven coarse classes, kept so results stay comparable."""

    TOP = "top"
    BOTTOM = "bottom"
    DRESS = "dress"
    JACKET = "jacket"
    SHOES = "shoes"
    BAG = "bag"
    ACCESSORY = "accessory"


# How a noun takes its determiner in a prompt:
#   "count":  "a shirt", "an orange dress"
#   "plural": no article, the noun is plural-only ("olive pants", "black tights")
#   "pair":   "a pair of black shoes"
Grammar = Literal["count", "plural", "pair"]


@dataclass(frozen=True, slots=True)
class FineLabel:
    id: int
    name: str  # the Fashionpedia category name, e.g. "top, t-shirt, sweatshirt"
    kept: bool
    coarse: Coarse | None  # None for dropped garment parts
    noun: str  # clean display noun, e.g. "top"; in plural form for "plural" and "pair" nouns
    grammar: Grammar


def _kept(name: str, coarse: Coarse, noun: str, grammar: Grammar = "count") -> tuple:
    return (name, True, coarse, noun, grammar)


def _part(name: str) -> tuple:
    return (name, False, None, name, "count")


_T, _B, _D, _J = Coarse.TOP, Coarse.BOTTOM, Coarse.DRESS, Coarse.JACKET
_S, _G, _A = Coarse.SHOES, Coarse.BAG, Coarse.ACCESSORY

# Index order is the model's class index order; do not reorder.
_TABLE: tuple[tuple, ...] = (
    _kept("shirt, blouse", _T, "shirt"),
    _kept("top, t-shirt, sweatshirt", _T, "top"),
    _kept("sweater", _T, "sweater"),
    _kept("cardigan", _T, "cardigan"),
    _kept("jacket", _J, "jacket"),
    _kept("vest", _T, "vest"),
    _kept("pants", _B, "pants", "plural"),
    _kept("shorts", _B, "shorts", "plural"),
    _kept("skirt", _B, "skirt"),
    _kept("coat", _J, "coat"),
    _kept("dress", _D, "dress"),
    _kept("jumpsuit", _D, "jumpsuit"),
    _kept("cape", _J, "cape"),  # outerwear: closest coarse class is jacket
    _kept("glasses", _A, "glasses", "pair"),
    _kept("hat", _A, "hat"),
    _kept("headband, head covering, hair accessory", _A, "headband"),
    _kept("tie", _A, "tie"),
    _kept("glove", _A, "gloves", "pair"),
    _kept("watch", _A, "watch"),
    _kept("belt", _A, "belt"),
    _kept("leg warmer", _A, "leg warmers", "pair"),
    # Hosiery is an accessory, not a bottom: it is worn *under* skirts and shorts, and grouping
    # it with them would let box merging swallow a skirt into overlapping tights.
    _kept("tights, stockings", _A, "tights", "plural"),
    _kept("sock", _A, "socks", "pair"),
    _kept("shoe", _S, "shoes", "pair"),
    _kept("bag, wallet", _G, "bag"),
    _kept("scarf", _A, "scarf"),
    _kept("umbrella", _A, "umbrella"),
    _part("hood"),
    _part("collar"),
    _part("lapel"),
    _part("epaulette"),
    _part("sleeve"),
    _part("pocket"),
    _part("neckline"),
    _part("buckle"),
    _part("zipper"),
    _part("applique"),
    _part("bead"),
    _part("bow"),
    _part("flower"),
    _part("fringe"),
    _part("ribbon"),
    _part("rivet"),
    _part("ruffle"),
    _part("sequin"),
    _part("tassel"),
)

LABELS: tuple[FineLabel, ...] = tuple(FineLabel(i, *row) for i, row in enumerate(_TABLE))
FASHIONPEDIA_NAMES: tuple[str, ...] = tuple(label.name for label in LABELS)
NUM_LABELS = len(LABELS)  # 46
KEPT_IDS: frozenset[int] = frozenset(label.id for label in LABELS if label.kept)
_BY_NAME = {label.name: label for label in LABELS}


def label_by_id(label_id: int) -> FineLabel:
    return LABELS[label_id]


def label_by_name(name: str) -> FineLabel:
    """The label with this exact Fashionpedia name (``"shoe"``, ``"bag, wallet"``)."""
    return _BY_NAME[name]


def is_kept(label_id: int) -> bool:
    return label_id in KEPT_IDS


# --- feed categories ------------------------------------------------------------------------------
# Free-text product categories from feeds, mapped to the fine label a whole-image crop gets.
# Keys are normalised (lowercase, singular where the plural is a plain "s"/"es").
FEED_SYNONYMS: dict[str, tuple[str, ...]] = {
    "shirt, blouse": ("shirt", "blouse", "button down", "button up", "oxford shirt", "tunic"),
    "top, t-shirt, sweatshirt": (
        "top",
        "t shirt",
        "tshirt",
        "tee",
        "tee shirt",
        "sweatshirt",
        "hoodie",
        "hoody",
        "tank top",
        "tank",
        "camisole",
        "cami",
        "polo",
        "polo shirt",
        "crop top",
        "bodysuit",
        "long sleeve",
    ),
    "sweater": ("sweater", "jumper", "pullover", "knitwear", "knit", "turtleneck"),
    "cardigan": ("cardigan",),
    "jacket": ("jacket", "blazer", "bomber", "windbreaker", "anorak", "denim jacket", "outerwear"),
    "vest": ("vest", "gilet", "waistcoat"),
    "pants": (
        "pant",
        "pants",
        "trouser",
        "trousers",
        "jean",
        "jeans",
        "legging",
        "leggings",
        "chino",
        "chinos",
        "jogger",
        "joggers",
        "sweatpant",
        "sweatpants",
    ),
    "shorts": ("short", "shorts", "bermuda"),
    "skirt": ("skirt", "miniskirt", "midi skirt", "maxi skirt"),
    "coat": ("coat", "overcoat", "trench", "trench coat", "parka", "raincoat", "puffer"),
    "dress": ("dress", "gown", "sundress", "maxi dress", "midi dress", "mini dress"),
    "jumpsuit": ("jumpsuit", "playsuit", "romper", "overall", "overalls", "dungaree", "onesie"),
    "cape": ("cape", "poncho", "cloak"),
    "glasses": ("glasses", "sunglasses", "eyewear", "spectacles", "eyeglasses"),
    "hat": ("hat", "cap", "beanie", "beret", "fedora", "bucket hat", "baseball cap", "headwear"),
    "headband, head covering, hair accessory": (
        "headband",
        "hair accessory",
        "hair clip",
        "scrunchie",
        "head covering",
        "headscarf",
    ),
    "tie": ("tie", "necktie", "bow tie", "bowtie"),
    "glove": ("glove", "gloves", "mitten", "mittens"),
    "watch": ("watch", "wristwatch", "smartwatch"),
    "belt": ("belt",),
    "leg warmer": ("leg warmer", "leg warmers", "legwarmer"),
    "tights, stockings": ("tight", "tights", "stocking", "stockings", "pantyhose", "hosiery"),
    "sock": ("sock", "socks"),
    "shoe": (
        "shoe",
        "shoes",
        "sneaker",
        "sneakers",
        "trainer",
        "trainers",
        "boot",
        "boots",
        "sandal",
        "sandals",
        "heel",
        "heels",
        "loafer",
        "loafers",
        "pump",
        "pumps",
        "flat",
        "flats",
        "footwear",
        "slipper",
        "slippers",
        "mule",
        "mules",
        "espadrille",
        "clog",
        "oxford",
        "oxfords",
        "slide",
        "slides",
        "flip flop",
        "flip flops",
    ),
    "bag, wallet": (
        "bag",
        "handbag",
        "backpack",
        "tote",
        "tote bag",
        "clutch",
        "purse",
        "wallet",
        "crossbody",
        "cross body",
        "shoulder bag",
        "satchel",
        "duffel",
        "duffle",
        "pouch",
        "card holder",
        "bags",
        "handbags",
    ),
    "scarf": ("scarf", "scarves", "shawl", "stole", "bandana", "snood"),
    "umbrella": ("umbrella",),
}
_FEED_LOOKUP: dict[str, str] = {
    syn: fine for fine, synonyms in FEED_SYNONYMS.items() for syn in synonyms
}
_WORD = re.compile(r"[a-z]+")
# Breadcrumb separators: "Women > Clothing > Dresses", "Shoes / Sneakers", "Bags | Totes".
_LEVELS = re.compile(r"\s*(?:>|/|\||»|::|,|;)\s*")


def _singulars(word: str) -> list[str]:
    """Candidate singular forms, tried in order: "dresses" -> "dress", "tops" -> "top"."""
    out = [word]
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


def _lookup_phrase(words: list[str]) -> str | None:
    """Longest match first, scanning from the right: English puts the head noun last
    ("Women's Running Sneakers" -> "sneakers", "Denim Jacket" -> "denim jacket")."""
    for length in range(min(3, len(words)), 0, -1):
        for start in range(len(words) - length, -1, -1):
            phrase_words = words[start : start + length]
            head_forms = _singulars(phrase_words[-1])
            for head in head_forms:
                phrase = " ".join([*phrase_words[:-1], head])
                if phrase in _FEED_LOOKUP:
                    return _FEED_LOOKUP[phrase]
    return None


def label_for_feed_category(category: str | None) -> FineLabel | None:
    """The fine label for a feed's free-text product category, or None when unrecognised.

    Handles breadcrumbs (the most specific level wins), plurals, hyphens ("T-Shirt") and extra
    words ("Women's Leather Handbags").
    """
    if not category or not category.strip():
        return None
    levels = [level for level in _LEVELS.split(category.lower()) if level.strip()]
    for level in reversed(levels):  # most specific level first
        words = _WORD.findall(level.replace("t-shirt", "t shirt").replace("-", " "))
        if words and (fine := _lookup_phrase(words)) is not None:
            return _BY_NAME[fine]
    return None
