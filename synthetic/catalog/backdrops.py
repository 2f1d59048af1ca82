"""Studio backdrops: plain, gradient, striped, checked or noisy light grounds with a soft drop
shadow, chosen to contrast with the garment."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image

from synthetic.catalog.shading import _mottle, _soft_blur
from synthetic.catalog.vocabulary import RGB, _rgb_distance

BackgroundStyle = Literal["plain", "gradient", "stripes", "checks", "noise"]
_Field = np.ndarray | float  # a per-pixel field, or one value for every pixel


_LIGHT_BACKDROPS: tuple[RGB, ...] = (
    (246, 246, 244), (242, 240, 236), (238, 240, 242), (244, 242, 238), (236, 236, 236),
    (243, 236, 232), (232, 237, 242), (234, 239, 232), (248, 247, 245),
)  # fmt: skip
# Mid-light greys for garments that would vanish on a near-white backdrop (white, cream...).
_CONTRAST_BACKDROPS: tuple[RGB, ...] = ((198, 201, 206), (206, 203, 198), (192, 196, 201))
_MIN_BACKDROP_DISTANCE = 70.0  # RGB distance below which a backdrop is swapped for a contrast one


@dataclass(frozen=True)
class Background:
    style: BackgroundStyle = "plain"
    rgb: RGB = (244, 244, 242)
    contrast: float = 5.0  # pattern amplitude in grey levels; low so the garment dominates
    period: float = 0.05  # stripe/check/noise scale, fraction of the long side
    angle: float = 0.0  # stripe direction, degrees
    shadow: float = 0.12  # drop-shadow darkening, 0 for none


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
