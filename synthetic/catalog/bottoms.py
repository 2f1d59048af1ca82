"""Trousers and skirts: garments hung from a waistband."""

from __future__ import annotations

import numpy as np

from synthetic.catalog.shapes import (
    _METAL,
    Point,
    _both_sides,
    _circle,
    _Fabric,
    _fill,
    _line,
    _Part,
    _phases,
    _quad,
    _rect,
    _Silhouette,
    _symmetric,
)

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
    fabric: _Fabric = "knit" if variant == "joggers" else "woven"
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
    fabrics: dict[str, _Fabric] = {"pleated": "pleat", "pencil": "woven"}
    fabric = fabrics.get(variant, "drape")
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
