"""Garment geometry primitives. Shapes are designed in isotropic units (height about 1, x
centred on 0, y pointing down), then normalised to a unit box (see
:mod:`synthetic.catalog.garments`) so placement only needs the box's aspect."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from synthetic.catalog.vocabulary import RGB

Point = tuple[float, float]
_Fabric = Literal["drape", "pleat", "woven", "knit", "quilt", "leather"]


_METAL: RGB = (168, 166, 160)
_GOLD: RGB = (196, 164, 96)


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
    fabric: _Fabric
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
