"""Tops and jackets, the upper-body garments: they share sleeves, cuffs and (with shirt
dresses) the collar and button placket."""

from __future__ import annotations

import numpy as np

from synthetic.catalog.shapes import (
    _METAL,
    Point,
    _arc,
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


def _collar_and_buttons(neck: float, bottom: float) -> list[_Part]:
    """Shirt collar, button placket down to ``bottom`` and four buttons."""
    collar = [(-neck, 0.0), (-neck - 0.025, 0.035), (-0.035, 0.1), (0.0, 0.07)]
    parts = [*_both_sides(_fill(collar, 1.04, solid=False)), *_both_sides(_line(collar, 0.003))]
    parts.append(_line([(0.0, 0.08), (0.0, bottom)], 0.025, 0.95))
    for y in np.linspace(0.12, bottom - 0.04, 4):
        parts.append(_fill(_circle(0.0, y, 0.009), 0.7, solid=False))
    return parts


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
    fabric: _Fabric = "knit" if variant in ("jumper", "tank") else "woven"
    return _Silhouette(tuple(parts), fabric, drape_from=0.4, phases=_phases(rng))


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
    fabric: _Fabric = "drape" if variant == "trench" else "woven"
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
