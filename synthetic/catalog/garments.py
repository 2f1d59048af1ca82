"""Garment styles: the builder per category, the normalised silhouette of a style (cached)
and a random style of a category."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from synthetic.catalog.accessories import _bag, _shoe
from synthetic.catalog.bottoms import _skirt, _trousers
from synthetic.catalog.dresses import _dress
from synthetic.catalog.placement import _fill_fraction
from synthetic.catalog.shapes import Point, _Silhouette
from synthetic.catalog.tops import _jacket, _top
from synthetic.catalog.vocabulary import CATEGORIES, VARIANTS


@dataclass(frozen=True)
class GarmentStyle:
    """What is drawn: category, style and a seed for its proportions. Views of one product share
    it, so every photo shows the same garment."""

    category: str
    variant: str
    shape_seed: int


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
