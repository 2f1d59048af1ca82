"""Rendering one packshot: frame shape, placement, rasterising, shading, backdrop and the
final composite, returned with its ground truth (mask, box, coverage)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from synthetic.catalog.backdrops import (
    Background,
    BackgroundStyle,
    _backdrop,
    _Field,
    random_background,
)
from synthetic.catalog.garments import GarmentStyle, _silhouette_for, sample_style
from synthetic.catalog.placement import View, _Layers, _place, _rasterise
from synthetic.catalog.shading import _LIFT, _GarmentFields, _shade_garment
from synthetic.catalog.vocabulary import RGB

# Frame shapes per category family.
_FRAME_ASPECTS: dict[str, tuple[float, ...]] = {  # width / height
    "apparel": (2 / 3, 3 / 4, 4 / 5, 1.0),
    "shoe": (4 / 5, 1.0, 4 / 3, 3 / 2),
    "bag": (4 / 5, 1.0, 4 / 3),
}


@dataclass(frozen=True, eq=False)  # holds an array: compare fields explicitly
class Rendering:
    image: Image.Image
    mask: np.ndarray  # float32 (height, width), garment alpha in 0..1
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of mask > 0.5
    coverage: float
    style: GarmentStyle
    background: Background


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
