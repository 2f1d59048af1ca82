"""What a catalog is made of: the named colours, categories, styles with their title wording,
brands, price ranges and the feed columns, shared by the renderer, the generator and the
feed writers."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Literal

import numpy as np

RGB = tuple[int, int, int]
SizeClass = Literal["small", "full"]


# Sixteen everyday fashion colour names. The RGB values are spread out so that each is at least
# ~45 apart in RGB and ~20 apart in CIELAB from every other, so naming tests have one right answer
# even after JPEG, shading and a few levels of per-product jitter. The names are basic colour
# terms of the XKCD survey (as models/colour.py uses), and each value sits nearer its own XKCD
# swatch than any other term's: yellow is lemon, not gold; green is not teal.
COLOURS: dict[str, RGB] = {
    "black": (28, 28, 30),
    "white": (252, 252, 250),
    "grey": (128, 128, 128),
    "navy": (30, 42, 100),
    "light blue": (120, 180, 230),
    "teal": (20, 125, 130),
    "green": (45, 155, 50),
    "olive": (115, 120, 40),
    "yellow": (252, 238, 40),
    "orange": (240, 130, 30),
    "red": (215, 25, 30),
    "burgundy": (115, 20, 45),
    "pink": (245, 140, 185),
    "purple": (110, 50, 150),
    "brown": (115, 70, 35),
    "beige": (232, 216, 172),
}

CATEGORIES: tuple[str, ...] = ("dress", "top", "trousers", "skirt", "jacket", "shoe", "bag")

# Share of each category in a generated catalog: tops and dresses dominate real women's-wear
# catalogs; every class still shows up in a few dozen products.
_CATEGORY_WEIGHTS: tuple[float, ...] = (0.18, 0.20, 0.14, 0.10, 0.12, 0.14, 0.12)

# Styles per category, with the product-title wording. The drawn silhouette follows the style, so
# a "Wide-Leg Trousers" title really shows wide legs.
VARIANTS: dict[str, dict[str, str]] = {
    "dress": {
        "a-line": "A-Line Mini Dress",
        "wrap": "Wrap Midi Dress",
        "slip": "Satin Slip Dress",
        "shift": "Shift Dress",
        "shirt": "Belted Shirt Dress",
        "maxi": "Tiered Maxi Dress",
    },
    "top": {
        "tee": "Crew Neck T-Shirt",
        "long-sleeve": "Long Sleeve Top",
        "tank": "Ribbed Tank Top",
        "blouse": "Button-Up Blouse",
        "jumper": "Knit Jumper",
    },
    "trousers": {
        "wide-leg": "Wide-Leg Trousers",
        "straight": "Straight Leg Chinos",
        "slim": "Slim Fit Trousers",
        "joggers": "Cuffed Joggers",
        "cargo": "Cargo Trousers",
    },
    "skirt": {
        "a-line": "A-Line Mini Skirt",
        "pencil": "Pencil Skirt",
        "pleated": "Pleated Midi Skirt",
        "wrap": "Wrap Skirt",
    },
    "jacket": {
        "blazer": "Tailored Blazer",
        "bomber": "Bomber Jacket",
        "puffer": "Quilted Puffer Jacket",
        "trench": "Belted Trench Coat",
    },
    "shoe": {
        "sneaker": "Leather Trainers",
        "pump": "Pointed Court Shoes",
        "boot": "Chelsea Ankle Boots",
        "loafer": "Penny Loafers",
    },
    "bag": {
        "tote": "Canvas Tote Bag",
        "handbag": "Top Handle Bag",
        "crossbody": "Crossbody Camera Bag",
        "clutch": "Envelope Clutch",
        "backpack": "Mini Backpack",
    },
}

# Fictional brands; one accent and one ampersand because real feeds have them.
BRANDS: tuple[str, ...] = (
    "Northwind", "Maison Lumière", "Atelier Nord", "Kestrel & Co", "Field Study", "Ossa",
    "Blue Harbour", "Marlow", "Studio Sable", "Verdant", "Ashby Row", "Lune", "Copperleaf",
    "Halden", "Oak & Ivy", "Parade", "Saltmarsh", "Tessellate", "Wren", "Zephyr Lane",
)  # fmt: skip

# Price range per category (currency units); prices are drawn log-uniformly inside it.
_PRICE_RANGE: dict[str, tuple[float, float]] = {
    "dress": (25, 180),
    "top": (8, 70),
    "trousers": (25, 130),
    "skirt": (20, 95),
    "jacket": (45, 320),
    "shoe": (30, 240),
    "bag": (20, 420),
}
# Occasional title suffixes, as merchants append fit/material notes (note the en dash).
_TITLE_SUFFIXES: tuple[str, ...] = ("Petite", "Tall", "Organic Cotton", "Recycled", "Regular Fit")

FEED_COLUMNS: tuple[str, ...] = ("product_id", "image_url", "title", "brand", "category", "price")


def _rgb_distance(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


@cache
def colour_family(name: str) -> str:
    """The everyday colour family of one of :data:`COLOURS` ("teal" -> "blue", "burgundy" ->
    "red"), as flickd names it (models/colour.py): the ground truth a shopper's "a blue skirt"
    is judged by. Every family but multicolour has at least one of the sixteen colours."""
    from models.colour import name_rgb

    return name_rgb(COLOURS[name]).family


def nearest_colour(rgb: Sequence[float]) -> str:
    """Name of the :data:`COLOURS` entry nearest (in RGB) to ``rgb``."""
    return min(COLOURS, key=lambda name: _rgb_distance(COLOURS[name], rgb))
