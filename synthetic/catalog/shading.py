"""Shading the garment: fabric folds, pleats, ribs, quilting and gloss, key light, ambient
occlusion, low-frequency mottle and grain; plus the cheap wide blur the backdrop's drop
shadow uses too."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from synthetic.catalog.placement import _Layers, _Placement
from synthetic.catalog.shapes import _Silhouette

# Dark garments barely change under multiplicative shading; this additive term (grey levels per
# unit of shade) keeps folds visible on black and navy.
_LIFT = 32.0


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
