"""Dresses: a bodice, a waist and a skirt that flares to the hem, with necklines, darts,
wrap edges, belts and tiers per style."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthetic.catalog.shapes import (
    _GOLD,
    Point,
    _arc,
    _both_sides,
    _fill,
    _hem_curve,
    _line,
    _Part,
    _phases,
    _quad,
    _rect,
    _Silhouette,
    _symmetric,
)
from synthetic.catalog.tops import _collar_and_buttons

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


def _belt(waist: float, y: float) -> list[_Part]:
    band = _fill(_rect(-waist - 0.01, y - 0.02, waist + 0.01, y + 0.02), 0.86)
    buckle = _fill(_rect(-0.02, y - 0.022, 0.02, y + 0.022), solid=False, rgb=_GOLD)
    return [band, buckle, _line([(0.03, y + 0.01), (0.07, y + 0.2)], 0.016, 0.88, solid=True)]
