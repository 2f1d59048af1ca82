"""Shoes (seen from the side, mostly as a pair) and bags."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from synthetic.catalog.shapes import (
    _GOLD,
    _METAL,
    Point,
    _arc,
    _fill,
    _line,
    _Part,
    _phases,
    _quad,
    _rect,
    _Silhouette,
)
from synthetic.catalog.vocabulary import RGB

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
