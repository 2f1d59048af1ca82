"""Where a garment sits in the frame (the view, the fit, the rotation) and how its parts are
rasterised into antialiased mask and shade layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from synthetic.catalog.shapes import Point, _Part, _Silhouette
from synthetic.catalog.vocabulary import RGB

# Coverage (garment share of the frame) the placement aims to keep inside.
_COVERAGE_MIN, _COVERAGE_MAX = 0.38, 0.66
_MARGIN = 0.05  # canonical gap between garment box and frame edge, as a fraction of each side
_MIN_MARGIN = 0.02  # rotated/shifted views may come this close to the edge, never closer


# Shade map encoding: a part's brightness multiplier times this is stored in an 8-bit layer, so
# 1.0 maps to 100 and highlights up to 2.55 fit.
_SHADE_ONE = 100.0


@dataclass(frozen=True)
class View:
    """How one photo frames the garment; the default is the canonical front packshot."""

    rotation: float = 0.0  # degrees, counter-clockwise
    scale: float = 1.0  # relative to the canonical fit
    shift: tuple[float, float] = (0.0, 0.0)  # of the image width/height
    mirror: bool = False


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


def random_view(rng: np.random.Generator) -> View:
    """An alternative shot of the same garment: slightly turned, zoomed, moved, maybe mirrored."""
    return View(
        rotation=float(rng.uniform(-8, 8)),
        scale=float(rng.uniform(0.85, 1.05)),
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        mirror=bool(rng.uniform() < 0.25),
    )
