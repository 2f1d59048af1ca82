"""A synthetic fashion catalog that tests, benchmarks and the demo share.

It makes three things:

* **Packshot-like JPEGs** of seven coarse garment classes (:data:`CATEGORIES`), each in one of
  :data:`COLOURS`. A garment is a few polygons drawn with Pillow, then shaded with light, drape
  folds, seams, ambient occlusion and fabric grain, on a plain or faintly patterned light
  backdrop with a soft drop shadow. The garment covers roughly 35-70 % of the frame, so its colour
  is the image's dominant colour once the backdrop (which touches the border) is discounted.
* **A ground-truth manifest** (``catalog.json``): per product its category, colour, style and
  per image the garment's bounding box and coverage.
* **Feeds** in the shapes merchants send them (:func:`write_feed`), and a streaming writer for
  million-row CSV feeds with realistic junk rows (:func:`write_big_feed`).

Everything is a pure function of the seed. Product ``i`` draws from ``default_rng([seed, i])``, so
the first N products of a larger catalog equal a catalog of N products, and the bytes do not
depend on how many worker processes rendered them.

CLI: ``python -m synthetic.catalog OUT_DIR --products N --seed S --size small|full``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
Point = tuple[float, float]
SizeClass = Literal["small", "full"]
BackgroundStyle = Literal["plain", "gradient", "stripes", "checks", "noise"]
FeedFormat = Literal["csv", "tsv", "jsonl", "parquet", "xlsx"]
FeedLayout = Literal["rows", "list"]
_Field = np.ndarray | float  # a per-pixel field, or one value for every pixel

__all__ = [
    "BAD_ROW_KINDS",
    "BRANDS",
    "CATEGORIES",
    "COLOURS",
    "FEED_COLUMNS",
    "VARIANTS",
    "Background",
    "BigFeedStats",
    "Catalog",
    "CatalogImage",
    "GarmentStyle",
    "Product",
    "Rendering",
    "View",
    "feed_format",
    "feed_frame",
    "frame_size",
    "generate_catalog",
    "main",
    "nearest_colour",
    "random_background",
    "random_view",
    "render_garment",
    "render_garment_detailed",
    "sample_style",
    "write_big_feed",
    "write_feed",
]

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

# Packshot sizes: long sides of common e-commerce exports, and the frame shapes per category.
_FULL_LONG_SIDES: tuple[int, ...] = (600, 720, 800, 900, 1000, 1080, 1200)
_SMALL_LONG_SIDES: tuple[int, ...] = (160, 192, 224, 256)
_FRAME_ASPECTS: dict[str, tuple[float, ...]] = {  # width / height
    "apparel": (2 / 3, 3 / 4, 4 / 5, 1.0),
    "shoe": (4 / 5, 1.0, 4 / 3, 3 / 2),
    "bag": (4 / 5, 1.0, 4 / 3),
}

# Coverage (garment share of the frame) the placement aims to keep inside.
_COVERAGE_MIN, _COVERAGE_MAX = 0.38, 0.66
_MARGIN = 0.05  # canonical gap between garment box and frame edge, as a fraction of each side
_MIN_MARGIN = 0.02  # rotated/shifted views may come this close to the edge, never closer

# Shade map encoding: a part's brightness multiplier times this is stored in an 8-bit layer, so
# 1.0 maps to 100 and highlights up to 2.55 fit.
_SHADE_ONE = 100.0
# Dark garments barely change under multiplicative shading; this additive term (grey levels per
# unit of shade) keeps folds visible on black and navy.
_LIFT = 32.0

_LIGHT_BACKDROPS: tuple[RGB, ...] = (
    (246, 246, 244), (242, 240, 236), (238, 240, 242), (244, 242, 238), (236, 236, 236),
    (243, 236, 232), (232, 237, 242), (234, 239, 232), (248, 247, 245),
)  # fmt: skip
# Mid-light greys for garments that would vanish on a near-white backdrop (white, cream...).
_CONTRAST_BACKDROPS: tuple[RGB, ...] = ((198, 201, 206), (206, 203, 198), (192, 196, 201))
_MIN_BACKDROP_DISTANCE = 70.0  # RGB distance below which a backdrop is swapped for a contrast one

_METAL: RGB = (168, 166, 160)
_GOLD: RGB = (196, 164, 96)


# --------------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------------


@dataclass
class CatalogImage:
    product_id: str
    filename: str  # relative to the catalog's images/ folder, e.g. "p000123_1.jpg"
    category: str
    colour_name: str
    rgb: tuple[int, int, int]  # the garment's base colour (the named colour, lightly jittered)
    width: int
    height: int
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # garment box x0, y0, x1, y1 (exclusive)
    coverage: float = 0.0  # garment share of the frame, 0..1


@dataclass
class Product:
    product_id: str
    title: str
    brand: str
    category: str
    price: float
    images: list[CatalogImage]
    colour_name: str = ""
    variant: str = ""  # key of VARIANTS[category]


@dataclass(frozen=True)
class GarmentStyle:
    """What is drawn: category, style and a seed for its proportions. Views of one product share
    it, so every photo shows the same garment."""

    category: str
    variant: str
    shape_seed: int


@dataclass(frozen=True)
class View:
    """How one photo frames the garment; the default is the canonical front packshot."""

    rotation: float = 0.0  # degrees, counter-clockwise
    scale: float = 1.0  # relative to the canonical fit
    shift: tuple[float, float] = (0.0, 0.0)  # of the image width/height
    mirror: bool = False


@dataclass(frozen=True)
class Background:
    style: BackgroundStyle = "plain"
    rgb: RGB = (244, 244, 242)
    contrast: float = 5.0  # pattern amplitude in grey levels; low so the garment dominates
    period: float = 0.05  # stripe/check/noise scale, fraction of the long side
    angle: float = 0.0  # stripe direction, degrees
    shadow: float = 0.12  # drop-shadow darkening, 0 for none


@dataclass(frozen=True, eq=False)  # holds an array: compare fields explicitly
class Rendering:
    image: Image.Image
    mask: np.ndarray  # float32 (height, width), garment alpha in 0..1
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of mask > 0.5
    coverage: float
    style: GarmentStyle
    background: Background


@dataclass
class Catalog:
    root: Path
    products: list[Product]
    seed: int = 0
    size: SizeClass = "full"

    MANIFEST = "catalog.json"

    @property
    def images(self) -> list[CatalogImage]:
        return [image for product in self.products for image in product.images]

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def image_path(self, image: CatalogImage) -> Path:
        return self.images_dir / image.filename

    def save(self) -> Path:
        path = self.root / self.MANIFEST
        meta = {
            "format": "flickd-synthetic-catalog",
            "version": 1,
            "seed": self.seed,
            "size": self.size,
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        }
        path.write_text(_manifest_json(meta, [asdict(p) for p in self.products]), encoding="utf-8")
        return path

    @classmethod
    def load(cls, out_dir: Path | str) -> Catalog:
        root = Path(out_dir)
        payload = json.loads((root / cls.MANIFEST).read_text(encoding="utf-8"))
        products = [_product_from_json(p) for p in payload["products"]]
        return cls(root=root, products=products, seed=payload["seed"], size=payload["size"])


def _manifest_json(meta: dict[str, Any], products: list[dict[str, Any]]) -> str:
    """JSON with one product per line: compact, yet diffs and greps stay readable."""
    head = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in meta.items()]
    rows = ",\n".join(f"  {json.dumps(p, ensure_ascii=False)}" for p in products)
    return "{\n" + "\n".join(head) + '\n "products": [\n' + rows + "\n ]\n}\n"


def _product_from_json(data: dict[str, Any]) -> Product:
    """JSON has no tuples; restore them so a loaded catalog equals the generated one."""
    images = [
        CatalogImage(**{**img, "rgb": tuple(img["rgb"]), "bbox": tuple(img["bbox"])})
        for img in data["images"]
    ]
    return Product(**{**data, "images": images})


# --------------------------------------------------------------------------------------------
# Garment geometry. Shapes are designed in isotropic units (height about 1, x centred on 0,
# y pointing down), then normalised to a unit box so placement only needs the box's aspect.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One polygon or polyline. Solid parts make up the silhouette; the others are details
    (seams, insides, buttons) that only recolour pixels already inside it."""

    points: tuple[Point, ...]
    shade: float = 1.0  # brightness multiplier on the base colour
    width: float = 0.0  # > 0: a polyline this thick (same units as points' y)
    solid: bool = True
    rgb: RGB | None = None  # own colour (soles, hardware) instead of a shade of the base colour


@dataclass(frozen=True)
class _Silhouette:
    parts: tuple[_Part, ...]
    fabric: Literal["drape", "pleat", "woven", "knit", "quilt", "leather"]
    aspect: float = 1.0  # width / height of the box (set by _normalise)
    drape_from: float = 0.3  # y where drape folds start (the waist)
    period: float = 0.12  # quilt band height
    gloss: Point = (0.35, 0.3)  # leather highlight centre
    phases: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # fold phases, fixed per garment
    grain: float = 2.0  # per-pixel fabric noise, grey levels
    fill: float = 0.5  # share of the box the silhouette covers (set by _silhouette_for)


def _pts(seq: Sequence[Sequence[float]]) -> tuple[Point, ...]:
    return tuple((float(x), float(y)) for x, y in seq)


def _quad(p0: Point, p1: Point, p2: Point, n: int = 16) -> list[Point]:
    """Quadratic Bézier from p0 to p2, pulled towards p1: smooth outlines from three points."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    curve = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [(float(x), float(y)) for x, y in curve]


def _arc(
    cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 40
) -> list[Point]:
    """Points on an elliptical arc; angles in degrees, 90 points down (y grows downwards)."""
    angles = np.radians(np.linspace(a0, a1, n))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _circle(cx: float, cy: float, r: float) -> list[Point]:
    return _arc(cx, cy, r, r, 0, 360, 20)


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _mirror(points: Sequence[Point]) -> list[Point]:
    return [(-x, y) for x, y in points]


def _symmetric(left: Sequence[Point]) -> list[Point]:
    """A left-right symmetric outline from its left half, traced from the top centre down to the
    bottom centre: halves the hand-placed points and keeps garments symmetric."""
    return list(left) + _mirror(left)[::-1]


def _fill(
    points: Sequence[Point], shade: float = 1.0, *, solid: bool = True, rgb: RGB | None = None
) -> _Part:
    return _Part(_pts(points), shade=shade, solid=solid, rgb=rgb)


def _line(
    points: Sequence[Point],
    width: float,
    shade: float = 0.8,
    *,
    solid: bool = False,
    rgb: RGB | None = None,
) -> _Part:
    return _Part(_pts(points), shade=shade, width=width, solid=solid, rgb=rgb)


def _both_sides(part: _Part) -> list[_Part]:
    """A detail and its mirror image (pockets, darts, lapels)."""
    return [part, replace(part, points=_pts(_mirror(part.points)))]


def _hem_curve(half: float, y: float, sag: float) -> list[Point]:
    """A hem seen slightly from above: the centre hangs lower than the sides."""
    return _quad((-half, y), (0.0, y + 2 * sag), (half, y))


def _phases(rng: np.random.Generator) -> tuple[float, ...]:
    return tuple(float(p) for p in rng.uniform(0, 2 * math.pi, 4))


# --- dresses --------------------------------------------------------------------------------

# Per style: length (shoulder to hem) and hem half-width, in units of a midi dress's length.
_DRESS_SHAPES: dict[str, tuple[float, float]] = {
    "a-line": (0.82, 0.42),
    "shift": (0.86, 0.27),
    "wrap": (1.05, 0.37),
    "slip": (1.0, 0.31),
    "shirt": (1.0, 0.35),
    "maxi": (1.35, 0.45),
}


@dataclass(frozen=True)
class _Bodice:
    """Proportions shared by a dress's outline and its details."""

    neck: float  # half-widths...
    shoulder: float
    bust: float
    waist: float
    waist_y: float
    length: float
    hem: float


def _dress(variant: str, rng: np.random.Generator) -> _Silhouette:
    u = rng.uniform
    length, hem = _DRESS_SHAPES[variant]
    bust, waist = u(0.19, 0.21), u(0.15, 0.17)
    b = _Bodice(
        neck=u(0.075, 0.095),
        shoulder=u(0.15, 0.17),
        bust=bust,
        waist=bust - 0.01 if variant == "shift" else waist,  # a shift dress has no waist
        waist_y=u(0.3, 0.34),
        length=length * u(0.95, 1.05),
        hem=hem * u(0.93, 1.07),
    )
    sleeves = variant in ("a-line", "shirt") or (variant == "wrap" and u() < 0.5)
    parts = [_fill(_dress_outline(variant, b, sleeves)), *_neckline(variant, b, rng)]
    parts += _dress_details(variant, b)
    return _Silhouette(tuple(parts), "drape", drape_from=b.waist_y, phases=_phases(rng))


def _dress_outline(variant: str, b: _Bodice, sleeves: bool) -> list[Point]:
    if variant == "slip":  # straight neckline held by straps (drawn as details)
        top = (-b.bust + 0.03, 0.12)
        left = [(0.0, 0.15), top, *_quad(top, (-b.bust, 0.15), (-b.bust, 0.2))]
    elif sleeves:
        left = [(0.0, 0.0), (-b.neck, 0.0), (-b.shoulder, 0.02)]
        sleeve = [(-b.shoulder - 0.08, 0.08), (-b.shoulder - 0.11, 0.19)]
        left += [*sleeve, (-b.bust - 0.03, 0.225), (-b.bust, 0.18)]
    else:
        shoulder = (-b.shoulder, 0.02)
        armhole = _quad(shoulder, (-b.shoulder + 0.025, 0.13), (-b.bust, 0.18))
        left = [(0.0, 0.0), (-b.neck, 0.0), *armhole]
    waist = (-b.waist, b.waist_y)
    left += _quad(left[-1], (-b.bust - 0.005, 0.26), waist)
    if variant in ("maxi", "a-line"):  # fitted over the hips, then flaring
        flare = (-b.waist - 0.02, b.waist_y + 0.2)
    else:
        flare = ((-b.waist - b.hem) / 2 - 0.01, (b.waist_y + b.length) / 2)
    left += _quad(waist, flare, (-b.hem, b.length))
    left += _quad((-b.hem, b.length), (-b.hem * 0.5, b.length + 0.035), (0.0, b.length + 0.035))
    return _symmetric(left)


def _neckline(variant: str, b: _Bodice, rng: np.random.Generator) -> list[_Part]:
    """The front neckline, filled dark: through it one sees the inside of the back."""
    if variant == "slip":
        straps = _both_sides(_line([(-0.12, 0.125), (-0.11, 0.0)], 0.008, 1.0, solid=True))
        edge = [(-b.bust + 0.03, 0.125), (0.0, 0.155), (b.bust - 0.03, 0.125)]
        return [*straps, _line(edge, 0.005, 0.85)]
    if variant in ("wrap", "shirt"):
        depth = 0.2 if variant == "wrap" else 0.09
        return [_fill([(-b.neck, 0.0), (0.0, depth), (b.neck, 0.0)], 0.6)]
    scoop = _arc(0.0, 0.0, b.neck, rng.uniform(0.06, 0.1), 180, 0)
    return [_fill(scoop, 0.6), _line(_arc(0.0, 0.0, b.neck, 0.08, 180, 0), 0.006, 0.88)]


def _dress_details(variant: str, b: _Bodice) -> list[_Part]:
    wy, waist, hem, ln = b.waist_y, b.waist, b.hem, b.length
    parts = []
    if variant != "shift":  # waist seam and bust darts
        parts.append(_line(_quad((-waist, wy), (0.0, wy + 0.015), (waist, wy)), 0.004, 0.8))
        parts += _both_sides(_line([(-0.08, wy), (-0.09, wy - 0.09)], 0.003, 0.85))
    if variant == "wrap":  # the crossing front edge, down to the hem, and the tie
        parts.append(_line(_quad((-b.neck, 0.0), (-0.02, 0.15), (waist * 0.8, wy)), 0.005, 0.76))
        skirt_edge = _quad((waist * 0.6, wy), (hem * 0.3, (wy + ln) / 2), (hem * 0.55, ln + 0.02))
        parts.append(_line(skirt_edge, 0.005, 0.74))
        parts.append(_line([(waist, wy), (waist + 0.04, wy + 0.15)], 0.014, 0.9, solid=True))
        parts.append(
            _line([(waist - 0.01, wy), (waist - 0.005, wy + 0.17)], 0.014, 0.92, solid=True)
        )
    if variant == "shirt":
        parts += [*_collar_and_buttons(b.neck, wy), *_belt(waist, wy)]
    if variant == "maxi":  # tier seams
        for frac in (0.35, 0.68):
            y, half = wy + (ln - wy) * frac, waist + (hem - waist) * frac
            parts.append(_line(_quad((-half, y), (0.0, y + 0.025), (half, y)), 0.004, 0.76))
    parts.append(_line(_hem_curve(hem * 0.98, ln - 0.02, 0.017), 0.003, 0.86))
    return parts


def _collar_and_buttons(neck: float, bottom: float) -> list[_Part]:
    """Shirt collar, button placket down to ``bottom`` and four buttons."""
    collar = [(-neck, 0.0), (-neck - 0.025, 0.035), (-0.035, 0.1), (0.0, 0.07)]
    parts = [*_both_sides(_fill(collar, 1.04, solid=False)), *_both_sides(_line(collar, 0.003))]
    parts.append(_line([(0.0, 0.08), (0.0, bottom)], 0.025, 0.95))
    for y in np.linspace(0.12, bottom - 0.04, 4):
        parts.append(_fill(_circle(0.0, y, 0.009), 0.7, solid=False))
    return parts


def _belt(waist: float, y: float) -> list[_Part]:
    band = _fill(_rect(-waist - 0.01, y - 0.02, waist + 0.01, y + 0.02), 0.86)
    buckle = _fill(_rect(-0.02, y - 0.022, 0.02, y + 0.022), solid=False, rgb=_GOLD)
    return [band, buckle, _line([(0.03, y + 0.01), (0.07, y + 0.2)], 0.016, 0.88, solid=True)]


# --- tops -----------------------------------------------------------------------------------


def _sleeve_left(variant: str, sh: float, body: float) -> list[Point]:
    """Left outline from the shoulder point to the underarm, for each sleeve type."""
    if variant == "tee":
        return [(-sh, 0.05), (-sh - 0.16, 0.26), (-sh - 0.09, 0.36), (-body, 0.27)]
    if variant == "tank":
        return [(-sh, 0.0), *_quad((-sh, 0.0), (-sh + 0.01, 0.22), (-body, 0.28))]
    return _long_sleeve_left(sh, body)


def _long_sleeve_left(sh: float, body: float) -> list[Point]:
    """A long sleeve angled away from the body, as in a flat-lay, leaving a wedge of backdrop
    between sleeve and body."""
    outer = _quad((-sh, 0.05), (-sh - 0.13, 0.35), (-sh - 0.2, 0.88))
    inner = _quad((-sh - 0.09, 0.92), (-body - 0.03, 0.55), (-body, 0.3))
    return [*outer, *inner]


def _cuffs(sh: float, shade: float) -> list[_Part]:
    cuff = [(-sh - 0.2, 0.88), (-sh - 0.09, 0.92), (-sh - 0.085, 0.85), (-sh - 0.195, 0.81)]
    return _both_sides(_fill(cuff, shade, solid=False))


def _top(variant: str, rng: np.random.Generator) -> _Silhouette:
    u = rng.uniform
    tank = variant == "tank"
    body, ln = u(0.3, 0.33), u(0.95, 1.05) * (0.9 if tank else 1.0)
    nw = u(0.12, 0.14) if tank else u(0.09, 0.11)
    sh = nw + 0.06 if tank else body - 0.01
    left = [(0.0, 0.005), (-nw, -0.005), *_sleeve_left(variant, sh, body)]
    left += _quad((-body, 0.3), (-body + 0.015, 0.6), (-body - 0.005, ln))
    left += _quad((-body - 0.005, ln), (-body / 2, ln + 0.01), (0.0, ln + 0.01))
    neck = _arc(0.0, -0.005, nw, 0.2 if tank else 0.09, 180, 0)
    rib = 0.022 if variant in ("jumper", "tank") else 0.012
    parts = [_fill(_symmetric(left)), _fill(neck, 0.6), _line(neck, rib, 0.9)]
    if variant == "blouse":
        parts += _collar_and_buttons(nw, ln)
    if not tank:  # set-in sleeve seams
        seam = _quad((-sh, 0.05), (-body + 0.03, 0.17), (-body, 0.29))
        parts += _both_sides(_line(seam, 0.003, 0.84))
    if variant in ("long-sleeve", "blouse", "jumper"):
        parts += _cuffs(sh, 0.88 if variant == "jumper" else 0.95)
    if variant == "jumper":  # ribbed hem band
        parts.append(
            _fill(_rect(-body - 0.01, ln - 0.08, body + 0.01, ln + 0.02), 0.88, solid=False)
        )
    else:
        parts.append(_line([(-body, ln - 0.025), (body, ln - 0.025)], 0.003, 0.84))
    fabric = "knit" if variant in ("jumper", "tank") else "woven"
    return _Silhouette(tuple(parts), fabric, drape_from=0.4, phases=_phases(rng))


# --- trousers -------------------------------------------------------------------------------

# Per style: half-widths of the outer and inner hem edge of the left leg.
_LEGS: dict[str, tuple[float, float]] = {
    "wide-leg": (0.3, 0.025),
    "straight": (0.25, 0.045),
    "slim": (0.215, 0.06),
    "joggers": (0.215, 0.065),
    "cargo": (0.26, 0.04),
}


def _trousers(variant: str, rng: np.random.Generator) -> _Silhouette:
    u = rng.uniform
    out_hem, in_hem = _LEGS[variant]
    waist, ln, crotch = u(0.19, 0.21), u(1.0, 1.06), u(0.3, 0.34)
    hip = waist + 0.03
    left = [
        (0.0, 0.055),
        (-waist, 0.055),
        *_quad((-waist, 0.055), (-hip - 0.01, 0.15), (-hip, 0.3)),
    ]
    left += _quad((-hip, 0.3), (-(hip + out_hem) / 2 - 0.01, 0.65), (-out_hem, ln))
    left += [(-in_hem, ln), *_quad((-in_hem, ln), (-0.03, 0.6), (0.0, crotch))]
    parts = [_fill(_symmetric(left)), _fill(_rect(-waist, 0.0, waist, 0.06), 0.95)]
    for x in (-0.15, -0.06, 0.06, 0.15):  # belt loops
        parts.append(_fill(_rect(x - 0.008, -0.005, x + 0.008, 0.07), 0.9))
    if variant == "joggers":
        parts += _jogger_details(waist, out_hem, in_hem, ln)
    else:
        parts += _tailored_details(waist, hip, out_hem, in_hem, ln)
    if variant == "cargo":
        pocket = _rect(-out_hem - 0.015, 0.48, -out_hem + 0.11, 0.66)
        flap = [(-out_hem - 0.015, 0.52), (-out_hem + 0.11, 0.52)]
        parts += _both_sides(_fill(pocket, 0.94, solid=False))
        parts += _both_sides(_line([*pocket, pocket[0]], 0.003, 0.78))
        parts += _both_sides(_line(flap, 0.003, 0.78))
    fabric = "knit" if variant == "joggers" else "woven"
    return _Silhouette(tuple(parts), fabric, drape_from=0.5, phases=_phases(rng))


def _jogger_details(waist: float, out_hem: float, in_hem: float, ln: float) -> list[_Part]:
    """Elastic waist, drawstring and ribbed ankle cuffs."""
    parts = [_line([(-waist, y), (waist, y)], 0.002, 0.85) for y in (0.015, 0.03, 0.045)]
    for x in (-0.02, 0.02):
        parts.append(_line([(x, 0.05), (x * 1.4, 0.2)], 0.008, rgb=(236, 234, 228)))
    band = [(-out_hem, ln - 0.07), (-in_hem, ln - 0.07), (-in_hem, ln), (-out_hem, ln)]
    return parts + _both_sides(_fill(band, 0.86, solid=False))


def _tailored_details(
    waist: float, hip: float, out_hem: float, in_hem: float, ln: float
) -> list[_Part]:
    """Button, fly stitch, slanted pockets and pressed creases."""
    parts = [
        _fill(_circle(0.02, 0.03, 0.011), solid=False, rgb=_METAL),
        _line(_quad((0.035, 0.06), (0.04, 0.22), (0.0, 0.26)), 0.004, 0.8),
    ]
    pocket = _quad((-waist + 0.06, 0.06), (-waist + 0.04, 0.14), (-hip + 0.005, 0.18))
    parts += _both_sides(_line(pocket, 0.004, 0.78))
    # a crease is a bright ridge with a soft dark flank, down the middle of each leg
    top, bottom = (-0.11, 0.08), (-(out_hem + in_hem) / 2, ln)
    parts += _both_sides(_line([top, bottom], 0.005, 1.08))
    parts += _both_sides(_line([(top[0] + 0.012, top[1]), (bottom[0] + 0.012, ln)], 0.008, 0.95))
    return parts


# --- skirts ---------------------------------------------------------------------------------

# Per style: length and hem half-width, relative to a midi dress.
_SKIRT_SHAPES: dict[str, tuple[float, float]] = {
    "a-line": (0.62, 0.4),
    "pencil": (0.75, 0.25),
    "pleated": (0.85, 0.44),
    "wrap": (0.7, 0.38),
}


def _skirt(variant: str, rng: np.random.Generator) -> _Silhouette:
    u = rng.uniform
    ln, hem = (v * u(0.95, 1.05) for v in _SKIRT_SHAPES[variant])
    waist, band = u(0.17, 0.2), 0.065
    ctrl = (-waist - 0.06, 0.3) if variant == "pencil" else (-waist - 0.03, 0.18)
    if variant == "wrap":
        parts = _wrap_skirt(waist, band, ln, hem, ctrl)
    else:
        if variant == "pleated":  # zig-zag hem where the pleats fold
            xs = np.linspace(-hem, 0.0, 8)
            hem_pts = [(float(x), ln + (0.018 if i % 2 else 0.0)) for i, x in enumerate(xs)]
        else:
            hem_pts = _quad((-hem, ln), (-hem * 0.5, ln + 0.035), (0.0, ln + 0.035))
        side = _quad((-waist, band), ctrl, (-hem, ln))
        parts = [_fill(_symmetric([(0.0, 0.0), (-waist, 0.0), *side, *hem_pts]))]
    parts.append(_fill(_rect(-waist, 0.0, waist, band), 0.93))
    parts.append(_line([(-waist, band), (waist, band)], 0.003, 0.8))
    if variant == "pencil":  # back slit and darts
        parts.append(_line([(0.0, ln - 0.16), (0.0, ln + 0.04)], 0.005, 0.6))
        parts += _both_sides(_line([(-0.08, band), (-0.085, band + 0.12)], 0.003, 0.85))
    fabric = {"pleated": "pleat", "pencil": "woven"}.get(variant, "drape")
    return _Silhouette(tuple(parts), fabric, drape_from=band, phases=_phases(rng))


def _wrap_skirt(waist: float, band: float, ln: float, hem: float, ctrl: Point) -> list[_Part]:
    """Asymmetric hem (the overlapping panel dips on the left), its edge and a button."""
    left = _quad((-waist, band), ctrl, (-hem, ln + 0.05))
    right = _quad((waist, band), (-ctrl[0], ctrl[1]), (hem, ln - 0.04))
    hem_line = _quad((hem, ln - 0.04), (0.0, ln + 0.03), (-hem, ln + 0.05))
    outline = [(-waist, 0.0), (waist, 0.0), *right, *hem_line, *left[::-1]]
    edge = _quad((waist * 0.3, band), (hem * 0.2, ln * 0.6), (hem * 0.55, ln))
    button = _circle(waist * 0.3, band + 0.03, 0.012)
    return [_fill(outline), _line(edge, 0.005, 0.76), _fill(button, 0.7, solid=False)]


# --- jackets --------------------------------------------------------------------------------

_JACKET_LENGTHS: dict[str, float] = {"blazer": 1.0, "bomber": 0.82, "puffer": 0.92, "trench": 1.45}


def _jacket(variant: str, rng: np.random.Generator) -> _Silhouette:
    u = rng.uniform
    body, ln = u(0.32, 0.35), _JACKET_LENGTHS[variant] * u(0.97, 1.03)
    sh = body - 0.02
    hem_half = body + (0.06 if variant == "trench" else 0.005)
    left = [(0.0, -0.02), (-0.11, -0.03), *_long_sleeve_left(sh, body)]
    left += [*_quad((-body, 0.3), (-body + 0.01, 0.6), (-hem_half, ln)), (0.0, ln + 0.01)]
    seam = _quad((-sh, 0.05), (-body + 0.03, 0.18), (-body, 0.3))
    parts = [_fill(_symmetric(left)), *_both_sides(_line(seam, 0.003, 0.82))]
    if variant in ("blazer", "trench"):
        parts += _lapels(0.5 if variant == "blazer" else 0.36, ln)
    if variant == "blazer":
        parts += [_fill(_circle(0.0, y, 0.014), 0.55, solid=False) for y in (0.56, 0.72)]
        parts += _both_sides(_line([(-0.28, 0.74), (-0.12, 0.74)], 0.004, 0.76))  # pockets
        parts.append(_line([(-0.26, 0.32), (-0.15, 0.3)], 0.004, 0.78))
    if variant == "trench":
        parts += _trench_details(body, sh)
    if variant in ("bomber", "puffer"):  # zip
        parts.append(_line([(0.0, -0.02), (0.0, ln)], 0.012, rgb=_METAL))
        parts.append(_fill(_rect(-0.012, 0.0, 0.012, 0.05), solid=False, rgb=_METAL))
    if variant == "bomber":  # ribbed collar, hem and cuffs; sleeve pocket zip
        parts.append(_fill([(-0.11, -0.03), (0.11, -0.03), (0.1, 0.04), (-0.1, 0.04)], 0.82))
        parts.append(
            _fill(_rect(-body - 0.01, ln - 0.08, body + 0.01, ln + 0.01), 0.82, solid=False)
        )
        parts += _cuffs(sh, 0.82)
        parts.append(_line([(-sh - 0.09, 0.25), (-sh - 0.06, 0.38)], 0.006, rgb=_METAL))
    if variant == "puffer":  # stand-up collar and quilting seams
        parts.append(_fill(_rect(-0.13, -0.1, 0.13, 0.03), 0.95))
        period = u(0.11, 0.14)
        parts += [_line([(-0.7, y), (0.7, y)], 0.004, 0.72) for y in np.arange(0.04, ln, period)]
        return _Silhouette(tuple(parts), "quilt", period=period, phases=_phases(rng))
    fabric = "drape" if variant == "trench" else "woven"
    return _Silhouette(tuple(parts), fabric, drape_from=0.55, phases=_phases(rng))


def _lapels(depth: float, ln: float) -> list[_Part]:
    """Open front down to ``depth`` (dark lining inside), notched lapels and the closed edge."""
    lapel = [(-0.09, -0.025), (-0.11, -0.035), (-0.18, 0.13), (-0.15, 0.145), (-0.17, 0.17)]
    lapel.append((-0.005, depth))
    parts = [_fill([(-0.09, -0.025), (0.09, -0.025), (0.0, depth)], 0.42)]
    parts += [
        *_both_sides(_fill(lapel, 0.95, solid=False)),
        *_both_sides(_line(lapel, 0.003, 0.76)),
    ]
    return [*parts, _line([(0.0, depth), (0.0, ln)], 0.004, 0.74)]


def _trench_details(body: float, sh: float) -> list[_Part]:
    """Double-breasted buttons, belt with buckle, epaulettes."""
    parts = [
        _fill(_circle(x, y, 0.013), 0.55, solid=False)
        for x in (-0.07, 0.07)
        for y in (0.42, 0.58, 0.74)
    ]
    parts.append(_fill(_rect(-body - 0.02, 0.48, body + 0.02, 0.54), 0.86))
    parts.append(_fill(_rect(-0.03, 0.47, 0.03, 0.55), solid=False, rgb=_METAL))
    return parts + _both_sides(_line([(-0.14, 0.0), (-sh, 0.07)], 0.018, 0.9))


# --- shoes ----------------------------------------------------------------------------------


def _sneaker(rng: np.random.Generator) -> list[_Part]:
    sole_rgb = [(236, 233, 226), (40, 38, 38), None][int(rng.integers(3))]  # None: tonal
    upper = [(0.02, 0.37), *_quad((0.02, 0.37), (-0.02, 0.2), (0.04, 0.08))]
    upper += [*_quad((0.04, 0.08), (0.15, 0.14), (0.28, 0.1)), (0.33, 0.02), (0.41, 0.05)]
    upper += [
        *_quad((0.41, 0.05), (0.6, 0.14), (0.8, 0.2)),
        *_quad((0.8, 0.2), (1.0, 0.22), (1.0, 0.37)),
    ]
    sole = [(0.0, 0.34), (1.01, 0.34), *_quad((1.01, 0.34), (1.03, 0.43), (0.96, 0.45))]
    sole += [(0.03, 0.45), (0.0, 0.41)]
    opening = [(0.06, 0.09), (0.15, 0.135), (0.27, 0.11), (0.26, 0.15), (0.08, 0.15)]
    parts = [_fill(upper), _fill(sole, 0.8, rgb=sole_rgb), _fill(opening, 0.45, solid=False)]
    for x, y in _quad((0.41, 0.06), (0.6, 0.15), (0.72, 0.2), 6)[:-1]:  # laces
        parts.append(_line([(x - 0.03, y - 0.03), (x + 0.025, y + 0.03)], 0.012, 1.15))
    parts.append(_line(_quad((0.38, 0.12), (0.55, 0.22), (0.72, 0.27)), 0.004, 0.82))
    parts.append(_line(_quad((0.78, 0.22), (0.82, 0.3), (0.8, 0.34)), 0.004, 0.82))
    parts.append(_fill([(0.0, 0.12), (0.08, 0.1), (0.1, 0.33), (0.02, 0.34)], 0.9, solid=False))
    return parts


def _pump(rng: np.random.Generator) -> list[_Part]:
    tip = rng.uniform(0.5, 0.56)  # heel height
    top = [(0.02, 0.07), *_quad((0.02, 0.07), (0.22, 0.2), (0.48, 0.17))]
    vamp = _quad((0.48, 0.17), (0.8, 0.19), (1.0, 0.42))
    sole = [(0.97, 0.45), (0.68, 0.46), *_quad((0.68, 0.46), (0.38, 0.42), (0.2, 0.3))]
    heel = [
        *_quad((0.2, 0.3), (0.17, 0.38), (0.13, tip)),
        *_quad((0.08, tip), (0.08, 0.36), (0.03, 0.3)),
    ]
    parts = [_fill([*top, *vamp, *sole, *heel, (0.0, 0.2)]), _fill(heel, 0.8)]
    lining = [*_quad((0.03, 0.08), (0.22, 0.19), (0.46, 0.17)), (0.3, 0.16), (0.12, 0.12)]
    parts.append(_fill(lining, 0.45, solid=False))
    parts.append(_line(_quad((0.68, 0.455), (0.85, 0.455), (0.98, 0.435)), 0.008, 0.55))
    return parts


def _boot(rng: np.random.Generator) -> list[_Part]:
    sole_rgb: RGB = (45, 40, 38)
    shaft = rng.uniform(-0.04, 0.04)
    outline = [
        (0.02, shaft),
        (0.4, shaft),
        (0.42, 0.35),
        *_quad((0.42, 0.35), (0.5, 0.5), (0.8, 0.58)),
    ]
    outline += [*_quad((0.8, 0.58), (1.0, 0.6), (1.0, 0.76)), (0.98, 0.8), (0.22, 0.8)]
    heel = [(0.22, 0.8), (0.2, 0.92), (0.03, 0.92), (0.02, 0.8)]
    parts = [_fill([*outline, *heel[1:], (0.0, 0.6)]), _fill(heel, rgb=sole_rgb)]
    parts.append(_fill([(0.02, 0.78), (1.0, 0.76), (0.98, 0.81), (0.02, 0.81)], rgb=sole_rgb))
    parts.append(_fill([(0.24, shaft), (0.37, shaft), (0.32, 0.3)], 0.62, solid=False))  # gusset
    parts.append(_fill(_rect(0.03, shaft - 0.06, 0.1, shaft + 0.02), 0.9))  # pull tab
    parts.append(_fill(_arc(0.21, shaft, 0.19, 0.03, 0, 360), 0.4, solid=False))
    return parts


def _loafer(rng: np.random.Generator) -> list[_Part]:
    toe = rng.uniform(0.18, 0.22)
    outline = [(0.02, 0.36), (0.0, 0.1), *_quad((0.0, 0.1), (0.25, 0.2), (0.42, 0.14))]
    outline += [
        *_quad((0.42, 0.14), (0.72, 0.08), (0.9, toe)),
        *_quad((0.9, toe), (1.02, 0.26), (0.99, 0.36)),
    ]
    parts = [
        _fill(outline),
        _fill(_rect(0.0, 0.33, 1.0, 0.39), 0.72),
        _fill(_rect(0.02, 0.38, 0.2, 0.43), 0.6),
    ]
    lining = [(0.02, 0.11), *_quad((0.02, 0.11), (0.24, 0.2), (0.41, 0.15)), (0.28, 0.14)]
    parts.append(_fill(lining, 0.45, solid=False))
    parts.append(_line(_quad((0.42, 0.15), (0.72, 0.1), (0.95, 0.27)), 0.004, 0.8))  # moc stitch
    parts.append(_line([(0.42, 0.17), (0.6, 0.21)], 0.035, 0.86))  # penny strap
    parts.append(_line([(0.48, 0.18), (0.54, 0.195)], 0.012, 0.45))
    return parts


_SHOE_PROFILES: dict[str, Callable[[np.random.Generator], list[_Part]]] = {
    "sneaker": _sneaker,
    "pump": _pump,
    "boot": _boot,
    "loafer": _loafer,
}


def _shift_parts(parts: Sequence[_Part], dx: float, dy: float, darken: float) -> list[_Part]:
    """The same parts moved and darkened: the second shoe of a pair, standing behind the first."""

    def dim(rgb: RGB | None) -> RGB | None:
        return (
            None
            if rgb is None
            else (int(rgb[0] * darken), int(rgb[1] * darken), int(rgb[2] * darken))
        )

    return [
        replace(
            p,
            points=tuple((x + dx, y + dy) for x, y in p.points),
            shade=p.shade * darken,
            rgb=dim(p.rgb),
        )
        for p in parts
    ]


def _shoe(variant: str, rng: np.random.Generator) -> _Silhouette:
    profile = _SHOE_PROFILES[variant](rng)  # one shoe, heel at x=0, toe at x=1
    boot = variant == "boot"
    height = 0.95 if boot else 0.45
    # Packshots mostly show the pair, one shoe behind the other; low shoes always do, as a
    # single flat shoe would fill too little of the frame for its colour to dominate.
    if not boot or rng.uniform() < 0.75:
        lift = (0.45 if boot else 0.6) * height
        profile = _shift_parts(profile, 0.14, -lift, 0.88) + profile
    return _Silhouette(
        tuple(profile), "leather", gloss=(0.7, 0.3 * height), phases=_phases(rng), grain=1.2
    )


# --- bags -----------------------------------------------------------------------------------


def _rounded_trapezoid(top_half: float, top: float, bottom_half: float) -> list[Point]:
    """A bag body: straight top edge at ``top``, flaring sides, rounded bottom corners at y=1."""
    r = 0.06
    right = _quad((bottom_half, 1.0 - r), (bottom_half, 1.0), (bottom_half - r, 1.0))
    left = _quad((-bottom_half + r, 1.0), (-bottom_half, 1.0), (-bottom_half, 1.0 - r))
    return [(-top_half, top), (top_half, top), *right, *left]


def _handle(
    cx: float, base_y: float, half: float, rise: float, width: float, shade: float
) -> _Part:
    """A strap or handle: an arc rising ``rise`` above ``base_y``."""
    return _line(_arc(cx, base_y, half, rise, 180, 360), width, shade, solid=True)


def _tote(rng: np.random.Generator) -> _Silhouette:
    body = _rounded_trapezoid(0.42, 0.35, 0.5)
    back, front = (
        _handle(0.04, 0.36, 0.22, 0.34, 0.04, 0.78),
        _handle(0.0, 0.36, 0.22, 0.34, 0.04, 0.95),
    )
    parts = (back, _fill(body), front, _line([(-0.42, 0.39), (0.42, 0.39)], 0.003, 0.82))
    return _Silhouette(parts, "woven", drape_from=0.9, phases=_phases(rng))


def _handbag(rng: np.random.Generator) -> _Silhouette:
    flap = [
        (-0.38, 0.35),
        (0.38, 0.35),
        (0.42, 0.58),
        *_quad((0.42, 0.58), (0.0, 0.7), (-0.42, 0.58)),
    ]
    parts = (
        _handle(0.0, 0.36, 0.18, 0.27, 0.05, 0.88),
        _fill(_rounded_trapezoid(0.38, 0.35, 0.48)),
        _fill(flap, 0.95, solid=False),
        _line([*flap[2:], flap[0]], 0.004, 0.76),
        _fill(_rect(-0.04, 0.6, 0.04, 0.68), solid=False, rgb=_GOLD),  # clasp
    )
    return _Silhouette(parts, "leather", gloss=(-0.2, 0.5), phases=_phases(rng), grain=1.2)


def _crossbody(rng: np.random.Generator) -> _Silhouette:
    parts = (
        _handle(0.0, 0.29, 0.42, rng.uniform(0.22, 0.28), 0.02, 0.85),  # strap
        _fill(_rounded_trapezoid(0.44, 0.28, 0.48)),
        _line([(-0.41, 0.32), (0.41, 0.32)], 0.008, rgb=_METAL),  # zip
        _line([(-0.46, 0.62), (0.46, 0.62)], 0.004, 0.8),
    )
    return _Silhouette(parts, "leather", gloss=(-0.2, 0.5), phases=_phases(rng), grain=1.2)


def _clutch(rng: np.random.Generator) -> _Silhouette:
    body = [*_quad((-0.5, 0.05), (-0.5, 0.0), (-0.45, 0.0)), (0.45, 0.0)]
    body += [*_quad((0.45, 0.0), (0.5, 0.0), (0.5, 0.05)), (0.5, 0.55), (-0.5, 0.55)]
    flap = [(-0.5, 0.02), (0.0, 0.33), (0.5, 0.02)]
    parts = (
        _fill(body),
        _fill(flap, 0.94, solid=False),
        _line(flap, 0.004, 0.76),
        _fill(_rect(-0.03, 0.29, 0.03, 0.35), solid=False, rgb=_GOLD),
    )
    return _Silhouette(parts, "leather", gloss=(-0.2, 0.12), phases=_phases(rng), grain=1.2)


def _backpack(rng: np.random.Generator) -> _Silhouette:
    body = [*_arc(0.0, 0.35, 0.4, 0.25, 180, 360), (0.42, 1.0), (-0.42, 1.0)]
    pocket = [(-0.3, 0.6), (0.3, 0.6), (0.32, 0.95), (-0.32, 0.95)]
    parts = (
        _handle(0.0, 0.11, 0.08, 0.07, 0.025, 0.85),
        _fill(body),
        _fill(pocket, 0.92, solid=False),
        _line([(-0.28, 0.64), (0.28, 0.64)], 0.008, rgb=_METAL),
        _line(_arc(0.0, 0.36, 0.36, 0.21, 190, 350), 0.007, rgb=_METAL),
    )
    return _Silhouette(parts, "woven", drape_from=0.9, phases=_phases(rng), grain=1.6)


_BAGS: dict[str, Callable[[np.random.Generator], _Silhouette]] = {
    "tote": _tote,
    "handbag": _handbag,
    "crossbody": _crossbody,
    "clutch": _clutch,
    "backpack": _backpack,
}


def _bag(variant: str, rng: np.random.Generator) -> _Silhouette:
    return _BAGS[variant](rng)


_BUILDERS: dict[str, Callable[[str, np.random.Generator], _Silhouette]] = {
    "dress": _dress,
    "top": _top,
    "trousers": _trousers,
    "skirt": _skirt,
    "jacket": _jacket,
    "shoe": _shoe,
    "bag": _bag,
}


def _normalise(sil: _Silhouette) -> _Silhouette:
    """Map the design onto the unit box spanned by its solid parts, recording the box aspect."""
    solid = np.array([pt for part in sil.parts if part.solid for pt in part.points])
    (x0, y0), (x1, y1) = solid.min(axis=0), solid.max(axis=0)
    sx, sy = x1 - x0, y1 - y0

    def unit(points: Sequence[Point]) -> tuple[Point, ...]:
        return tuple(((x - x0) / sx, (y - y0) / sy) for x, y in points)

    parts = tuple(replace(p, points=unit(p.points), width=p.width / sy) for p in sil.parts)
    return replace(
        sil,
        parts=parts,
        aspect=float(sx / sy),
        drape_from=float((sil.drape_from - y0) / sy),
        period=float(sil.period / sy),
        gloss=unit([sil.gloss])[0],
    )


@lru_cache(maxsize=512)
def _silhouette_for(style: GarmentStyle) -> _Silhouette:
    """The normalised silhouette of a style, with its fill fraction. A pure function of the
    style, cached because every view of a product needs it again."""
    builder = _BUILDERS[style.category]
    sil = _normalise(builder(style.variant, np.random.default_rng(style.shape_seed)))
    return replace(sil, fill=_fill_fraction(sil))


def sample_style(category: str, rng: np.random.Generator) -> GarmentStyle:
    if category not in VARIANTS:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    variants = list(VARIANTS[category])
    variant = variants[int(rng.integers(len(variants)))]
    return GarmentStyle(category, variant, int(rng.integers(2**31)))


# --------------------------------------------------------------------------------------------
# Placement and rasterising
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """Affine map from the unit garment box to pixels: box size, centre, rotation, mirror."""

    cx: float
    cy: float
    bw: float
    bh: float
    theta: float  # radians, counter-clockwise on screen
    mirror: bool

    def to_pixels(self, points: Sequence[Point], ss: int) -> list[Point]:
        c, s = math.cos(self.theta), math.sin(self.theta)
        out = []
        for ux, uy in points:
            dx = ((1.0 - ux if self.mirror else ux) - 0.5) * self.bw
            dy = (uy - 0.5) * self.bh
            out.append(((self.cx + dx * c + dy * s) * ss, (self.cy - dx * s + dy * c) * ss))
        return out

    def unit_grid(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Garment-box coordinates (u, v) of every pixel centre: shading follows the garment
        when a view rotates or mirrors it."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        x = (np.arange(width, dtype=np.float32) + 0.5 - self.cx)[None, :]
        y = (np.arange(height, dtype=np.float32) + 0.5 - self.cy)[:, None]
        u = (c * x - s * y) / self.bw + 0.5
        v = (s * x + c * y) / self.bh + 0.5
        return (1.0 - u if self.mirror else u), v


def _fill_fraction(sil: _Silhouette) -> float:
    """Share of the garment box the silhouette covers, from a quick low-resolution drawing."""
    bh = 96.0
    pl = _Placement(
        cx=bh * sil.aspect / 2, cy=bh / 2, bw=bh * sil.aspect, bh=bh, theta=0.0, mirror=False
    )
    mask = Image.new("L", (max(1, round(pl.bw)), round(bh)), 0)
    draw = ImageDraw.Draw(mask)
    for part in sil.parts:
        if part.solid:
            _draw_part(draw, part, pl.to_pixels(part.points, 1), 255, part.width * bh)
    return float(np.asarray(mask, dtype=np.float32).mean() / 255.0)


def _place(sil: _Silhouette, width: int, height: int, view: View) -> _Placement:
    """Fit the garment box into the frame: canonical fit, then the view's scale (clamped so the
    coverage stays in range), then shrink until the rotated box fits, then shift within bounds."""
    aspect = sil.aspect
    bh0 = min(height * (1 - 2 * _MARGIN), width * (1 - 2 * _MARGIN) / aspect)
    cov0 = sil.fill * aspect * bh0 * bh0 / (width * height)
    scale = view.scale
    if cov0 * scale**2 > _COVERAGE_MAX:
        scale = math.sqrt(_COVERAGE_MAX / cov0)
    elif cov0 * scale**2 < _COVERAGE_MIN:
        scale = math.sqrt(_COVERAGE_MIN / cov0)
    bh = bh0 * scale
    bw = bh * aspect
    theta = math.radians(view.rotation)
    c, s = abs(math.cos(theta)), abs(math.sin(theta))
    ext_w, ext_h = c * bw + s * bh, s * bw + c * bh
    fit = min(1.0, width * (1 - 2 * _MIN_MARGIN) / ext_w, height * (1 - 2 * _MIN_MARGIN) / ext_h)
    bw, bh, ext_w, ext_h = bw * fit, bh * fit, ext_w * fit, ext_h * fit
    cx = _clamp(
        width / 2 + view.shift[0] * width,
        ext_w / 2 + _MIN_MARGIN * width,
        width - ext_w / 2 - _MIN_MARGIN * width,
    )
    cy = _clamp(
        height / 2 + view.shift[1] * height,
        ext_h / 2 + _MIN_MARGIN * height,
        height - ext_h / 2 - _MIN_MARGIN * height,
    )
    return _Placement(cx, cy, bw, bh, theta, view.mirror)


def _clamp(value: float, lo: float, hi: float) -> float:
    return lo if hi < lo else min(max(value, lo), hi)


def _draw_part(
    draw: ImageDraw.ImageDraw, part: _Part, pts: list[Point], fill: int | RGB, line_px: float
) -> None:
    if part.width > 0:
        draw.line(pts, fill=fill, width=max(1, round(line_px)), joint="curve")
    else:
        draw.polygon(pts, fill=fill)


@dataclass(frozen=True)
class _Layers:
    mask: np.ndarray  # garment alpha 0..1
    shade: np.ndarray  # brightness multiplier from parts
    mask_image: Image.Image  # the mask as an 8-bit image, for blurring
    over_rgb: np.ndarray | None = None  # own-colour parts (H, W, 3); None when there are none
    over_alpha: np.ndarray | None = None  # where own-colour parts are, 0..1


def _rasterise(sil: _Silhouette, pl: _Placement, width: int, height: int) -> _Layers:
    """Draw every part into layers at a supersampled size, then box-downsample: the polygons
    come out antialiased, which Pillow's polygon drawing does not do by itself."""
    ss = 4 if max(width, height) <= 400 else 2
    big = (width * ss, height * ss)
    mask, shade = Image.new("L", big, 0), Image.new("L", big, int(_SHADE_ONE))
    layers = [mask, shade]
    own_colours = any(part.rgb is not None for part in sil.parts)
    if own_colours:
        layers += [Image.new("RGB", big, (0, 0, 0)), Image.new("L", big, 0)]
    draws = [ImageDraw.Draw(im) for im in layers]
    line_scale = pl.bh * ss
    for part in sil.parts:
        pts = pl.to_pixels(part.points, ss)
        line_px = part.width * line_scale
        if part.solid:
            _draw_part(draws[0], part, pts, 255, line_px)
        _draw_part(draws[1], part, pts, round(min(255.0, part.shade * _SHADE_ONE)), line_px)
        if own_colours:  # later parts cover earlier own-colour ones, hence the 0 alpha
            if part.rgb is not None:
                _draw_part(draws[2], part, pts, part.rgb, line_px)
            _draw_part(draws[3], part, pts, 255 if part.rgb is not None else 0, line_px)
    small = [im.reduce(ss) for im in layers]
    result = _Layers(
        mask=np.asarray(small[0], dtype=np.float32) / 255.0,
        shade=np.asarray(small[1], dtype=np.float32) / _SHADE_ONE,
        mask_image=small[0],
    )
    if own_colours:
        over_rgb = np.asarray(small[2], dtype=np.float32)
        result = replace(
            result, over_rgb=over_rgb, over_alpha=np.asarray(small[3]) / np.float32(255)
        )
    return result


# --------------------------------------------------------------------------------------------
# Shading
# --------------------------------------------------------------------------------------------


def _fabric_field(sil: _Silhouette, u: np.ndarray, v: np.ndarray, px_per_u: float) -> np.ndarray:
    """Brightness multiplier (around 1) from the garment's fabric: folds, pleats, ribs, quilting
    or a leather highlight. Pure function of the silhouette, so all views of a product match."""
    if sil.fabric in ("drape", "pleat"):
        return _drape_field(sil, u, v)
    if sil.fabric == "quilt":  # puffy bands between stitch lines
        band = np.abs(np.sin(math.pi * v / max(sil.period, 1e-3)))
        return 0.84 + 0.24 * np.sqrt(band)
    if sil.fabric == "leather":  # a soft specular highlight, darker towards the bottom
        gx, gy = sil.gloss
        blob = np.exp(-(((u - gx) / 0.22) ** 2 + ((v - gy) / 0.14) ** 2))
        return 1.0 + 0.16 * blob - 0.05 * v
    p = sil.phases  # woven or knit: two gentle crossing wrinkles
    folds = 0.025 * np.sin(2 * math.pi * (1.3 * u + 0.7 * v) + p[0])
    folds += 0.018 * np.sin(2 * math.pi * (2.1 * u - 1.2 * v) + p[1])
    if sil.fabric == "knit" and px_per_u > 300:  # ribs need ~5 px per period not to alias
        folds += 0.03 * np.sin(2 * math.pi * u * px_per_u / 5.0)
    return 1.0 + folds


def _drape_field(sil: _Silhouette, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Folds radiating from a point above the waist and deepening towards the hem, like cloth
    hanging from a waistband; crisp and regular for pleats."""
    p = sil.phases
    # the angle from the apex; clamped above it (on the backdrop), where it means nothing
    theta = (u - 0.5) / np.maximum(v - sil.drape_from + 0.35, 0.05)
    if sil.fabric == "pleat":
        ridges = np.tanh(3.0 * np.sin(2 * math.pi * 5.0 * theta + p[0])) / math.tanh(3.0)
        return 1.0 + 0.07 * ridges * (v > sil.drape_from)
    below_waist = np.clip((v - sil.drape_from) / max(1.0 - sil.drape_from, 1e-3), 0.0, 1.0)
    folds = 0.045 * np.sin(2 * math.pi * 2.3 * theta + p[0])
    folds += 0.03 * np.sin(2 * math.pi * 4.1 * theta + p[1])
    folds += 0.02 * np.sin(2 * math.pi * 6.7 * theta + p[2])
    return 1.0 + folds * below_waist**0.8


def _lighting(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A soft key light from the upper left."""
    return 1.0 + 0.06 * (0.5 - u) + 0.05 * (0.5 - v)


def _ambient_occlusion(mask_image: Image.Image) -> np.ndarray:
    """Darken the garment towards its outline, where cloth turns away from the light."""
    blurred = _soft_blur(mask_image, 0.012 * max(mask_image.size))
    return 1.0 - 0.28 * (1.0 - np.asarray(blurred, dtype=np.float32) / 255.0)


def _soft_blur(image: Image.Image, radius: float) -> Image.Image:
    """A wide Gaussian blur computed at reduced resolution: the result is smooth anyway, and this
    is several times cheaper than blurring at full size."""
    factor = max(1, int(radius // 3))
    if factor == 1:
        return image.filter(ImageFilter.GaussianBlur(max(radius, 0.5)))
    small = image.reduce(factor).filter(ImageFilter.GaussianBlur(radius / factor))
    return small.resize(image.size, Image.Resampling.BILINEAR)


def _mottle(rng: np.random.Generator, width: int, height: int, amount: float) -> np.ndarray:
    """Low-frequency unevenness (dye, wrinkles), upsampled from a coarse random grid."""
    coarse = Image.fromarray(rng.standard_normal((6, 6)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)) * amount


@dataclass(frozen=True)
class _GarmentFields:
    """The shaded garment as per-pixel fields, so that channel ``c`` of the garment is
    ``shade * (rgb[c] + _LIFT) + offset``: three single-channel arrays instead of a full RGB float
    image, which keeps a 1000 px render at a few tens of milliseconds."""

    shade: np.ndarray
    offset: np.ndarray
    light: np.ndarray  # lighting and occlusion alone, for own-colour parts


def _typical_shade(shade: np.ndarray, layers: _Layers) -> float:
    """Median shade over the garment's own cloth (not soles or buckles), from every 3rd pixel.
    Dividing by it makes the median garment pixel the base colour: the named RGB is what a
    colour namer should find, not a darker average of it."""
    cloth = layers.mask[::3, ::3] > 0.5
    if layers.over_alpha is not None:
        cloth &= layers.over_alpha[::3, ::3] < 0.5
    values = shade[::3, ::3][cloth]
    return float(np.median(values)) if values.size else 1.0


def _shade_garment(
    sil: _Silhouette, pl: _Placement, layers: _Layers, rng: np.random.Generator
) -> _GarmentFields:
    height, width = layers.mask.shape
    u, v = pl.unit_grid(width, height)
    light = _lighting(u, v) * _ambient_occlusion(layers.mask_image)
    shade = layers.shade * light * _fabric_field(sil, u, v, pl.bw)
    shade += _mottle(rng, width, height, 0.012)
    shade /= _typical_shade(shade, layers)
    grain = rng.standard_normal((height, width), dtype=np.float32) * sil.grain
    return _GarmentFields(shade=shade, offset=grain - _LIFT, light=light)


# --------------------------------------------------------------------------------------------
# Backdrops
# --------------------------------------------------------------------------------------------


def random_background(
    rng: np.random.Generator, garment_rgb: RGB, style: BackgroundStyle | None = None
) -> Background:
    """A light studio backdrop that keeps the garment distinguishable (white garments get a
    light grey one)."""
    styles: tuple[BackgroundStyle, ...] = get_args(BackgroundStyle)
    if style is None:
        style = styles[int(rng.choice(len(styles), p=[0.45, 0.2, 0.12, 0.1, 0.13]))]
    rgb = _LIGHT_BACKDROPS[int(rng.integers(len(_LIGHT_BACKDROPS)))]
    if _rgb_distance(rgb, garment_rgb) < _MIN_BACKDROP_DISTANCE:
        rgb = _CONTRAST_BACKDROPS[int(rng.integers(len(_CONTRAST_BACKDROPS)))]
    return Background(
        style=style,
        rgb=rgb,
        contrast=float(rng.uniform(3.0, 7.0)),
        period=float(rng.uniform(0.03, 0.08)),
        angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
        shadow=float(rng.uniform(0.08, 0.18)) if rng.uniform() < 0.6 else 0.0,
    )


def _rgb_distance(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def _pattern(bg: Background, width: int, height: int, rng: np.random.Generator) -> _Field:
    """Additive grey-level offset of the backdrop pattern (0 for plain)."""
    if bg.style == "plain":
        return 0.0
    long_side = max(width, height)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    if bg.style == "gradient":  # studio sweep: lighter at the top, falls off towards the floor
        return np.broadcast_to(bg.contrast * (1.0 - 2.0 * y / height), (height, width))
    period = max(2.0, bg.period * long_side)
    a = math.radians(bg.angle)
    along = (x * math.cos(a) + y * math.sin(a)) / period
    if bg.style == "stripes":
        return bg.contrast * np.sign(np.sin(2 * math.pi * along)) * 0.5
    if bg.style == "checks":
        across = (-x * math.sin(a) + y * math.cos(a)) / period
        return bg.contrast * np.sign(np.sin(math.pi * along) * np.sin(math.pi * across)) * 0.5
    # noise: paper-like blotches plus fine grain
    return (
        _mottle(rng, width, height, bg.contrast * 0.6)
        + rng.standard_normal((height, width), dtype=np.float32) * 1.2
    )


def _backdrop(
    bg: Background, mask_image: Image.Image, rng: np.random.Generator
) -> tuple[_Field, _Field]:
    """The backdrop as (multiplier, offset): channel ``c`` is ``bg.rgb[c] * multiplier + offset``.
    The multiplier is the drop shadow, the offset the pattern."""
    width, height = mask_image.size
    multiplier: _Field = 1.0
    if bg.shadow > 0:  # soft drop shadow, offset down-right as if lit from the upper left
        long_side = max(width, height)
        offset = Image.new("L", mask_image.size, 0)
        offset.paste(mask_image, (round(0.012 * long_side), round(0.02 * long_side)))
        blur = _soft_blur(offset, 0.025 * long_side)
        multiplier = 1.0 - bg.shadow / 255.0 * np.asarray(blur, dtype=np.float32)
    return multiplier, _pattern(bg, width, height, rng)


def _composite(
    rgb: RGB,
    bg: Background,
    garment: _GarmentFields,
    backdrop: tuple[_Field, _Field],
    layers: _Layers,
) -> Image.Image:
    """Alpha-blend garment over backdrop channel by channel, then paint own-colour parts."""
    alpha = layers.mask
    bg_mul, bg_off = backdrop
    back_w = (1.0 - alpha) * bg_mul
    common = (1.0 - alpha) * bg_off + alpha * garment.offset
    garment_w = alpha * garment.shade
    channels = [back_w * bg.rgb[c] + common + garment_w * (rgb[c] + _LIFT) for c in range(3)]
    if layers.over_alpha is not None:
        _paint_own_colours(channels, rgb, garment, layers)
    return Image.merge("RGB", [Image.fromarray(_to_uint8(ch), mode="L") for ch in channels])


def _paint_own_colours(
    channels: list[np.ndarray], rgb: RGB, garment: _GarmentFields, layers: _Layers
) -> None:
    """Blend soles, buckles and zips over the garment, only inside their bounding box."""
    assert layers.over_alpha is not None and layers.over_rgb is not None
    x0, y0, x1, y1 = _nonzero_box(layers.over_alpha > 0)
    if x1 == 0:
        return
    box = np.s_[y0:y1, x0:x1]
    weight = layers.mask[box] * layers.over_alpha[box]
    for c, channel in enumerate(channels):
        cloth = garment.shade[box] * (rgb[c] + _LIFT) + garment.offset[box]
        own = layers.over_rgb[box][..., c] * garment.light[box]
        channel[box] += weight * (own - cloth)


def _to_uint8(channel: np.ndarray) -> np.ndarray:
    return np.clip(channel + 0.5, 0.0, 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Public rendering API
# --------------------------------------------------------------------------------------------


def frame_size(
    style: GarmentStyle, long_side: int, rng: np.random.Generator | None = None
) -> tuple[int, int]:
    """A packshot frame (width, height) with the given long side whose shape suits the garment:
    portrait for clothes, square or landscape for most shoes. With ``rng``, sometimes takes the
    runner-up shape when it suits nearly as well, as real catalogs mix frame shapes."""
    aspect = _silhouette_for(style).aspect
    family = style.category if style.category in ("shoe", "bag") else "apparel"
    misfit = sorted((abs(math.log(a / aspect)), a) for a in _FRAME_ASPECTS[family])
    frame = misfit[0][1]
    if rng is not None and misfit[1][0] < 0.3 and rng.uniform() < 0.5:
        frame = misfit[1][1]
    if frame >= 1.0:
        return long_side, max(1, round(long_side / frame))
    return max(1, round(long_side * frame)), long_side


def render_garment_detailed(
    category: str,
    rgb: RGB,
    size: int | tuple[int, int],
    rng: np.random.Generator,
    background: Background | BackgroundStyle | None = None,
    *,
    style: GarmentStyle | None = None,
    view: View | None = None,
) -> Rendering:
    """Render one packshot and return it with its ground truth (mask, box, coverage).

    ``size`` is ``(width, height)``, or an int long side with a frame shape that suits the
    garment. ``background`` is a :class:`Background`, a style name (colour picked to contrast
    with the garment) or None (all random). ``style`` defaults to a random one of the category.
    """
    style = style or sample_style(category, rng)
    if style.category != category:
        raise ValueError(f"style is for {style.category!r}, not {category!r}")
    rgb = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    width, height = frame_size(style, size) if isinstance(size, int) else size
    if isinstance(background, Background):
        bg = background
    else:
        bg = random_background(rng, rgb, background)
    sil = _silhouette_for(style)
    pl = _place(sil, width, height, view or View())
    layers = _rasterise(sil, pl, width, height)
    garment = _shade_garment(sil, pl, layers, rng)
    image = _composite(rgb, bg, garment, _backdrop(bg, layers.mask_image, rng), layers)
    return Rendering(image, layers.mask, _bbox(layers.mask), float(layers.mask.mean()), style, bg)


def render_garment(
    category: str,
    rgb: RGB,
    size: int | tuple[int, int],
    rng: np.random.Generator,
    background: Background | BackgroundStyle | None = None,
    *,
    style: GarmentStyle | None = None,
    view: View | None = None,
) -> Image.Image:
    """Render one packshot of a garment of known colour (see :func:`render_garment_detailed`)."""
    return render_garment_detailed(
        category, rgb, size, rng, background, style=style, view=view
    ).image


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    return _nonzero_box(mask > 0.5)


def _nonzero_box(flags: np.ndarray) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 (exclusive) of the True cells; all zero when there are none."""
    rows, cols = np.flatnonzero(flags.any(axis=1)), np.flatnonzero(flags.any(axis=0))
    if len(rows) == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def random_view(rng: np.random.Generator) -> View:
    """An alternative shot of the same garment: slightly turned, zoomed, moved, maybe mirrored."""
    return View(
        rotation=float(rng.uniform(-8, 8)),
        scale=float(rng.uniform(0.85, 1.05)),
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        mirror=bool(rng.uniform() < 0.25),
    )


def nearest_colour(rgb: Sequence[float]) -> str:
    """Name of the :data:`COLOURS` entry nearest (in RGB) to ``rgb``."""
    return min(COLOURS, key=lambda name: _rgb_distance(COLOURS[name], rgb))


# --------------------------------------------------------------------------------------------
# Catalog generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShotPlan:
    filename: str
    view: View
    background: Background
    render_seed: tuple[int, ...]


@dataclass(frozen=True)
class _ProductPlan:
    product: Product  # images not filled in yet
    style: GarmentStyle
    rgb: RGB
    width: int
    height: int
    quality: int
    shots: tuple[_ShotPlan, ...]


def _price(category: str, rng: np.random.Generator) -> float:
    lo, hi = _PRICE_RANGE[category]
    whole = math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    cents = (0.99, 0.0, 0.5)[int(rng.choice(3, p=[0.6, 0.25, 0.15]))]
    return round(whole + cents, 2)


def _title(colour: str, style: GarmentStyle, rng: np.random.Generator) -> str:
    title = f"{colour.title()} {VARIANTS[style.category][style.variant]}"
    if rng.uniform() < 0.12:
        title += f" – {_TITLE_SUFFIXES[int(rng.integers(len(_TITLE_SUFFIXES)))]}"
    return title


def _jittered(colour: str, rng: np.random.Generator) -> RGB:
    """The named colour moved by up to 5 levels per channel: one catalog's "navy" varies a little
    between products, far less than the distance to the next named colour."""
    jitter = rng.integers(-5, 6, 3)
    r, g, b = (int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    return (r, g, b)


def _plan_shots(
    product_id: str, n_images: int, rgb: RGB, rng: np.random.Generator, seed: tuple[int, int]
) -> tuple[_ShotPlan, ...]:
    """The canonical packshot, then alternates: turned, zoomed or mirrored, sometimes on
    another backdrop as when a retailer reshoots."""
    background = random_background(rng, rgb)
    shots = []
    for k in range(n_images):
        view = View() if k == 0 else random_view(rng)
        if k > 0 and rng.uniform() < 0.4:
            background = random_background(rng, rgb)
        shots.append(_ShotPlan(f"{product_id}_{k + 1}.jpg", view, background, (*seed, k)))
    return tuple(shots)


def _plan_product(
    seed: int,
    index: int,
    size: SizeClass,
    images_per_product: tuple[int, int],
    long_side: int | None,
) -> _ProductPlan:
    """Everything about product ``index`` except its pixels. It draws only from its own
    generator, so products do not depend on each other or on how many there are."""
    rng = np.random.default_rng([seed, index])
    category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=_CATEGORY_WEIGHTS))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    rgb = _jittered(colour, rng)
    style = sample_style(category, rng)
    sides = _SMALL_LONG_SIDES if size == "small" else _FULL_LONG_SIDES
    width, height = frame_size(style, long_side or sides[int(rng.integers(len(sides)))], rng)
    quality = int(rng.integers(80, 93))
    n_images = int(rng.integers(images_per_product[0], images_per_product[1] + 1))
    product_id = f"p{index:06d}"
    shots = _plan_shots(product_id, n_images, rgb, rng, (seed, index))
    product = Product(
        product_id=product_id,
        title=_title(colour, style, rng),
        brand=BRANDS[int(rng.integers(len(BRANDS)))],
        category=category,
        price=_price(category, rng),
        images=[],
        colour_name=colour,
        variant=style.variant,
    )
    return _ProductPlan(product, style, rgb, width, height, quality, shots)


def _render_product(plan: _ProductPlan, images_dir: Path) -> Product:
    """Render and save every shot of one product; returns the product with its images."""
    images = []
    for shot in plan.shots:
        rendering = render_garment_detailed(
            plan.style.category,
            plan.rgb,
            (plan.width, plan.height),
            np.random.default_rng(list(shot.render_seed)),
            shot.background,
            style=plan.style,
            view=shot.view,
        )
        rendering.image.save(images_dir / shot.filename, "JPEG", quality=plan.quality)
        images.append(
            CatalogImage(
                product_id=plan.product.product_id,
                filename=shot.filename,
                category=plan.style.category,
                colour_name=plan.product.colour_name,
                rgb=plan.rgb,
                width=plan.width,
                height=plan.height,
                bbox=rendering.bbox,
                coverage=round(rendering.coverage, 4),
            )
        )
    return replace(plan.product, images=images)


def generate_catalog(
    out_dir: Path | str,
    n_products: int,
    *,
    seed: int = 0,
    size: SizeClass = "full",
    images_per_product: tuple[int, int] = (1, 3),
    long_side: int | None = None,
    workers: int = 1,
) -> Catalog:
    """Render ``n_products`` products into ``out_dir/images/`` and write ``out_dir/catalog.json``.

    ``size`` picks packshot long sides (``full``: 600-1200 px, ``small``: 160-256 px) unless
    ``long_side`` fixes one. ``workers`` > 1 renders in that many processes; output is identical.
    """
    if seed < 0 or n_products < 0:
        raise ValueError("seed and n_products must be >= 0")
    lo, hi = images_per_product
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_product must satisfy 1 <= lo <= hi, got {images_per_product}")
    root = Path(out_dir)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    plans = [_plan_product(seed, i, size, images_per_product, long_side) for i in range(n_products)]
    if workers > 1 and len(plans) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            products = list(
                pool.map(_render_product, plans, [images_dir] * len(plans), chunksize=4)
            )
    else:
        products = [_render_product(plan, images_dir) for plan in plans]
    catalog = Catalog(root=root, products=products, seed=seed, size=size)
    catalog.save()
    return catalog


# --------------------------------------------------------------------------------------------
# Feeds
# --------------------------------------------------------------------------------------------

_SUFFIX_FORMATS: dict[str, FeedFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".xlsx": "xlsx",
}


def feed_format(path: Path | str) -> FeedFormat:
    """The feed format a file name implies; a trailing compression suffix (.gz...) is skipped."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffixes[-1]]
    raise ValueError(
        f"cannot tell the feed format of {path}; pass fmt= one of {get_args(FeedFormat)}"
    )


def feed_frame(catalog: Catalog, base_url: str, layout: FeedLayout = "rows") -> pd.DataFrame:
    """The catalog as a feed table with columns :data:`FEED_COLUMNS`."""
    base = base_url.rstrip("/")
    rows = []
    for p in catalog.products:
        urls = [f"{base}/images/{img.filename}" for img in p.images]
        common = {"title": p.title, "brand": p.brand, "category": p.category, "price": p.price}
        if layout == "list":
            rows.append({"product_id": p.product_id, "image_url": "|".join(urls), **common})
        elif layout == "rows":
            rows += [{"product_id": p.product_id, "image_url": url, **common} for url in urls]
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return pd.DataFrame(rows, columns=list(FEED_COLUMNS))


def write_feed(
    catalog: Catalog,
    path: Path | str,
    base_url: str,
    fmt: FeedFormat | None = None,
    layout: FeedLayout = "rows",
) -> Path:
    """Write the catalog as a merchant feed; the format comes from ``fmt`` or the file suffix.

    ``layout="rows"``: one row per image (product fields repeated); ``"list"``: one row per
    product with its image URLs joined by ``|``. URLs are ``{base_url}/images/{filename}``.
    """
    path = Path(path)
    fmt = fmt or feed_format(path)
    frame = feed_frame(catalog, base_url, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        frame.to_parquet(path, index=False, engine="pyarrow")
    elif fmt == "xlsx":
        frame.to_excel(path, index=False, engine="openpyxl", sheet_name="products")
    else:
        raise ValueError(f"unknown feed format {fmt!r}")
    return path


# --- big feeds ------------------------------------------------------------------------------

BAD_ROW_KINDS: tuple[str, ...] = (
    "missing_id",
    "missing_url",
    "ftp_scheme",
    "garbage_url",
    "duplicate",
)
_GARBAGE_URLS: tuple[str, ...] = (
    "not a url", "htp//broken.example/x.jpg", "javascript:alert(1)", "//", "image.jpg", "http://",
    "N/A", "http:///images/x.jpg", "www.example.com/no-scheme.jpg", "file:///etc/passwd",
)  # fmt: skip
_ID_PREFIXES: dict[str, str] = {
    "dress": "DR", "top": "TP", "trousers": "TR", "skirt": "SK", "jacket": "JK", "shoe": "SH",
    "bag": "BG",
}  # fmt: skip
_ID_MULTIPLIER = 7_654_321  # coprime with 10**7, so index -> number is a permutation: unique ids
_ID_SPACE = 10_000_000


@dataclass(frozen=True)
class BigFeedStats:
    path: Path
    rows: int
    products: int
    bad: dict[str, int]  # per kind in BAD_ROW_KINDS


@dataclass(frozen=True)
class _BigFeedVocabulary:
    """Per-feed lookup arrays, so each chunk builds strings with Arrow kernels instead of
    Python loops (1M rows in about a second)."""

    titles: pa.Array  # index: colour * n_styles + style
    style_category: np.ndarray  # style -> category index
    prefixes: pa.Array  # category -> id prefix
    brands: pa.Array
    price_lo: np.ndarray  # per category, log
    price_hi: np.ndarray
    image_no: pa.Array  # "1".."9"
    garbage: pa.Array


def _big_vocabulary() -> _BigFeedVocabulary:
    styles = [(c, title) for c in CATEGORIES for title in VARIANTS[c].values()]
    titles = [f"{colour.title()} {title}" for colour in COLOURS for _, title in styles]
    return _BigFeedVocabulary(
        titles=pa.array(titles),
        style_category=np.array([CATEGORIES.index(c) for c, _ in styles]),
        prefixes=pa.array([_ID_PREFIXES[c] for c in CATEGORIES]),
        brands=pa.array(BRANDS),
        price_lo=np.log([_PRICE_RANGE[c][0] for c in CATEGORIES]),
        price_hi=np.log([_PRICE_RANGE[c][1] for c in CATEGORIES]),
        image_no=pa.array([str(i) for i in range(1, 10)]),
        garbage=pa.array(_GARBAGE_URLS),
    )


def _rows_per_product(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    """1-5 rows per product (mean 3), trimmed so they sum to exactly ``n_rows``."""
    counts = rng.integers(1, 6, size=n_rows)
    ends = np.cumsum(counts)
    k = int(np.searchsorted(ends, n_rows)) + 1
    counts = counts[:k].copy()
    counts[-1] -= int(ends[k - 1]) - n_rows
    return counts


def _big_chunk(
    vocab: _BigFeedVocabulary,
    rng: np.random.Generator,
    n_rows: int,
    first_product: int,
    first_row: int,
    url_prefix: str,
    image_names: pa.Array | None,
    id_offset: int,
) -> tuple[pa.Table, int]:
    counts = _rows_per_product(rng, n_rows)
    k = len(counts)
    style = rng.integers(len(vocab.style_category), size=k)
    category = vocab.style_category[style]
    colour = rng.integers(len(COLOURS), size=k)
    number = (
        np.arange(first_product, first_product + k, dtype=np.int64) * _ID_MULTIPLIER + id_offset
    ) % _ID_SPACE
    digits = pc.utf8_lpad(pa.array(number).cast(pa.string()), width=7, padding="0")
    product_id = pc.binary_join_element_wise(vocab.prefixes.take(pa.array(category)), digits, "-")
    title = vocab.titles.take(pa.array(colour * len(vocab.style_category) + style))
    brand = vocab.brands.take(pa.array(rng.integers(len(vocab.brands), size=k)))
    log_price = rng.uniform(vocab.price_lo[category], vocab.price_hi[category])
    price = np.floor(np.exp(log_price)) + np.where(rng.uniform(size=k) < 0.7, 0.99, 0.0)

    row_product = pa.array(np.repeat(np.arange(k), counts))
    starts = np.cumsum(counts) - counts
    image_index = np.arange(n_rows) - np.repeat(starts, counts)
    row_id = product_id.take(row_product)
    if image_names is not None:
        names = image_names.take(pa.array((first_row + np.arange(n_rows)) % len(image_names)))
        url = pc.binary_join_element_wise(url_prefix, names, "")
    else:
        number_in_product = vocab.image_no.take(pa.array(np.minimum(image_index, 8)))
        url = pc.binary_join_element_wise(url_prefix, row_id, "_", number_in_product, ".jpg", "")
    table = pa.table(
        {
            "product_id": row_id,
            "image_url": url,
            "title": title.take(row_product),
            "brand": brand.take(row_product),
            "category": pa.array(np.array(CATEGORIES)[category]).take(row_product),
            "price": pa.array(np.round(price, 2)).take(row_product),
        }
    )
    return table, k


def _spoil(
    table: pa.Table,
    rng: np.random.Generator,
    fraction: float,
    vocab: _BigFeedVocabulary,
    bad: dict[str, int],
) -> pa.Table:
    """Turn about ``fraction`` of the rows into the junk real feeds carry. Spoiled rows sit at odd
    positions and duplicates copy the row before, which is never spoiled itself, so every
    duplicate is an exact copy of a good row and the per-kind counts are exact."""
    n = table.num_rows
    n_bad = min(int(rng.binomial(n, fraction)), n // 2)
    if n_bad == 0:
        return table
    positions = 2 * rng.choice(n // 2, size=n_bad, replace=False) + 1
    kinds = rng.integers(len(BAD_ROW_KINDS), size=n_bad)
    masks = {}
    for i, kind in enumerate(BAD_ROW_KINDS):
        mask = np.zeros(n, dtype=bool)
        mask[positions[kinds == i]] = True
        masks[kind] = pa.array(mask)
        bad[kind] += int(mask.sum())
    null = pa.scalar(None, pa.string())
    pid = pc.if_else(masks["missing_id"], null, table["product_id"])
    url = table["image_url"]
    url = pc.if_else(masks["missing_url"], null, url)
    url = pc.if_else(
        masks["ftp_scheme"], pc.replace_substring_regex(url, r"^https?://", "ftp://"), url
    )
    garbage = vocab.garbage.take(pa.array(rng.integers(len(vocab.garbage), size=n)))
    url = pc.if_else(masks["garbage_url"], garbage, url)
    table = table.set_column(0, "product_id", pid).set_column(1, "image_url", url)
    source = np.arange(n)
    dup = positions[kinds == BAD_ROW_KINDS.index("duplicate")]
    source[dup] = dup - 1
    return table.take(pa.array(source))


def write_big_feed(
    path: Path | str,
    n_rows: int,
    base_url: str,
    *,
    image_names: Sequence[str] | None = None,
    seed: int = 0,
    bad_fraction: float = 0.0,
    chunk_rows: int = 100_000,
) -> BigFeedStats:
    """Stream a large CSV (or ``.tsv``; ``.gz`` compresses) feed with columns
    :data:`FEED_COLUMNS`, ``chunk_rows`` at a time so memory stays flat whatever ``n_rows``.

    Products get 1-5 rows each. URLs are ``{base_url}/images/{name}``: with ``image_names`` they
    cycle over those (existing) files, otherwise each is a unique ``{product_id}_{k}.jpg``.
    ``bad_fraction`` of the rows become junk, split evenly over :data:`BAD_ROW_KINDS`.
    """
    path = Path(path)
    if not 0.0 <= bad_fraction <= 0.5:
        raise ValueError("bad_fraction must be within 0..0.5")
    fmt = feed_format(path)
    if fmt not in ("csv", "tsv"):
        raise ValueError(f"write_big_feed writes csv/tsv, not {fmt}")
    rng = np.random.default_rng(seed)
    vocab = _big_vocabulary()
    names = pa.array(list(image_names)) if image_names else None
    url_prefix = f"{base_url.rstrip('/')}/images/"
    id_offset = int(rng.integers(_ID_SPACE))
    bad = dict.fromkeys(BAD_ROW_KINDS, 0)
    schema = pa.schema([(c, pa.float64() if c == "price" else pa.string()) for c in FEED_COLUMNS])
    options = pa_csv.WriteOptions(delimiter="\t" if fmt == "tsv" else ",")
    path.parent.mkdir(parents=True, exist_ok=True)
    compression = "gzip" if path.suffix.lower() == ".gz" else None
    written = products = 0
    sink = (
        pa.CompressedOutputStream(str(path), compression)
        if compression
        else pa.OSFile(str(path), "wb")
    )
    with sink, pa_csv.CSVWriter(sink, schema, write_options=options) as writer:
        while written < n_rows:
            n = min(chunk_rows, n_rows - written)
            table, k = _big_chunk(vocab, rng, n, products, written, url_prefix, names, id_offset)
            writer.write_table(_spoil(table, rng, bad_fraction, vocab, bad).cast(schema))
            written, products = written + n, products + k
    return BigFeedStats(path=path, rows=written, products=products, bad=bad)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m synthetic.catalog",
        description="Generate a synthetic fashion catalog.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=get_args(SizeClass), default="full")
    parser.add_argument("--images", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--feed", type=Path, help="also write a feed (format from the suffix)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    catalog = generate_catalog(
        args.out_dir, args.products, seed=args.seed, size=args.size,
        images_per_product=tuple(args.images), workers=args.workers,
    )  # fmt: skip
    feed = f", feed {write_feed(catalog, args.feed, args.base_url)}" if args.feed else ""
    n_bytes = sum(catalog.image_path(img).stat().st_size for img in catalog.images)
    seconds = time.perf_counter() - start
    print(
        f"catalog {catalog.root}: {len(catalog.products)} products, {len(catalog.images)} images "
        f"({args.size}, seed {args.seed}, {n_bytes / 1e6:.1f} MB) in {seconds:.1f}s{feed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
