"""Naming the dominant colour of a crop.

The colour names come from the XKCD colour survey (``matplotlib.colors.XKCD_COLORS``, 949 names
people actually use, maintained with matplotlib), minus a few crude ones nobody wants in a product
caption. Matching is nearest neighbour in CIELAB, where Euclidean distance roughly follows
perceived difference; in RGB, dark blues and dark greens sit closer than they look.

The dominant colour is the largest k-means cluster of the crop's pixels *after discounting the
background*: product photos put a small garment on a large white or beige backdrop, and a detector
box still contains a margin of it, so "largest cluster" alone names the wall, not the dress.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import numpy as np
from PIL import Image

# Downscale so k-means sees at most 64x64 pixels: colour is a low-frequency property, and this
# keeps naming a crop in the low milliseconds.
_MAX_SIDE = 64
_K = 4
_ITERATIONS = 12
# Clusters closer than this (CIELAB delta E) are shading of one colour, not two colours.
_MERGE_DELTA_E = 12.0
# Border ring, as a fraction of the crop's smaller side, used to estimate the background.
_BORDER_FRACTION = 0.08
# Below this score no cluster is clearly "inside, not border": the crop is one colour edge to edge
# (a tight crop of a plain garment, or a white shirt on white) and the biggest cluster is it.
_MIN_FOREGROUND_SCORE = 0.15

_EXCLUDED_WORDS = re.compile(
    r"\b(shit|poo|poop|puke|vomit|barf|booger|snot|piss|diarrhea|ugly|nasty|sick|sickly|barney)\b"
)


# Colour families: the everyday words shoppers filter and type by ("red dresses", "a navy
# jacket"). Each plain family is named the XKCD way, so its swatch comes from the same survey as
# the fine names; ``MULTICOLOUR`` is for a crop with no single dominant colour.
MULTICOLOUR = "multicolour"
PLAIN_FAMILIES = (
    "black",
    "white",
    "grey",
    "beige",
    "brown",
    "red",
    "pink",
    "orange",
    "yellow",
    "green",
    "blue",
    "navy",
    "purple",
)
COLOUR_FAMILIES = (*PLAIN_FAMILIES, MULTICOLOUR)


@dataclass(frozen=True, slots=True)
class ColourName:
    name: str  # fine display name, e.g. "navy blue", "scarlet"
    rgb: tuple[int, int, int]  # the crop's dominant colour (not the named swatch)
    family: str  # basic colour term, e.g. "navy", "red"


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..255, any leading shape, last axis of size 3."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [
            [0.4124564, 0.2126729, 0.0193339],
            [0.3575761, 0.7151522, 0.1191920],
            [0.1804375, 0.0721750, 0.9503041],
        ]
    )
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])  # D65 white point
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack(
        [
            116.0 * f[..., 1] - 16.0,
            500.0 * (f[..., 0] - f[..., 1]),
            200.0 * (f[..., 1] - f[..., 2]),
        ],
        axis=-1,
    )


@lru_cache(maxsize=1)
def colour_table() -> tuple[tuple[str, ...], np.ndarray]:
    """(names, Lab array) of the named colours, built once per process on first use."""
    from matplotlib.colors import XKCD_COLORS, to_rgb

    names: list[str] = []
    rgbs: list[tuple[float, float, float]] = []
    for key, hex_value in sorted(XKCD_COLORS.items()):
        name = key.removeprefix("xkcd:").replace("/", "-")
        if _EXCLUDED_WORDS.search(name):
            continue
        names.append(name)
        rgbs.append(to_rgb(hex_value))
    return tuple(names), srgb_to_lab(np.array(rgbs) * 255.0)


@lru_cache(maxsize=1)
def _family_table() -> np.ndarray:
    from matplotlib.colors import XKCD_COLORS, to_rgb

    swatches = [to_rgb(XKCD_COLORS[f"xkcd:{family}"]) for family in PLAIN_FAMILIES]
    return srgb_to_lab(np.array(swatches) * 255.0)


def _nearest(table: np.ndarray, lab: np.ndarray) -> int:
    return int(np.argmin(((table - lab) ** 2).sum(axis=1)))


def name_lab(lab: np.ndarray) -> str:
    """The nearest named colour to one CIELAB value."""
    names, table = colour_table()
    return names[_nearest(table, lab)]


def family_lab(lab: np.ndarray) -> str:
    """The nearest basic colour term to one CIELAB value."""
    return PLAIN_FAMILIES[_nearest(_family_table(), lab)]


def name_rgb(rgb: tuple[int, int, int]) -> ColourName:
    """Name an sRGB colour (0..255 per channel)."""
    lab = srgb_to_lab(np.array(rgb, dtype=np.float64))
    # tuple() of three channels (a list or array at runtime, too) is three ints again.
    return ColourName(
        name=name_lab(lab), rgb=cast("tuple[int, int, int]", tuple(rgb)), family=family_lab(lab)
    )


def _kmeans(points: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-means, deterministic: initial centres are the points at evenly spaced quantiles
    of lightness, so reruns name a crop identically (no random restarts needed for k=4 on
    colour data)."""
    order = np.argsort(points[:, 0], kind="stable")
    picks = order[np.linspace(0, len(order) - 1, k).round().astype(int)]
    centres = points[picks].copy()
    labels = np.zeros(len(points), dtype=np.int64)
    for _ in range(_ITERATIONS):
        dist = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        new_labels = dist.argmin(axis=1)
        for j in range(k):
            member = new_labels == j
            w = weights[member]
            if w.sum() > 0:
                centres[j] = (points[member] * w[:, None]).sum(axis=0) / w.sum()
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return centres, labels


def _merge_close(centres: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Relabel so that clusters within ``_MERGE_DELTA_E`` of each other share one label."""
    parent = list(range(len(centres)))
    for a in range(len(centres)):
        for b in range(a):
            if np.linalg.norm(centres[a] - centres[b]) < _MERGE_DELTA_E:
                parent[a] = parent[b]
                break
    return np.array(parent)[labels]


def _prepare(image: Image.Image) -> np.ndarray:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if max(rgb.size) > _MAX_SIDE:
        rgb = rgb.copy()
        rgb.thumbnail((_MAX_SIDE, _MAX_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float64)


def _border_mask(height: int, width: int) -> np.ndarray:
    ring = max(1, round(min(height, width) * _BORDER_FRACTION))
    mask = np.zeros((height, width), dtype=bool)
    mask[:ring, :] = mask[-ring:, :] = True
    mask[:, :ring] = mask[:, -ring:] = True
    return mask


def _centre_weights(height: int, width: int) -> np.ndarray:
    """Gaussian weights peaking at the centre: the item is centred in its crop by construction."""
    ys = (np.arange(height) + 0.5) / height - 0.5
    xs = (np.arange(width) + 0.5) / width - 0.5
    return np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * 0.3**2))


def dominant_colour(image: Image.Image) -> ColourName:
    """The name and RGB of the item's colour in a crop.

    Each cluster is scored by its centre-weighted share of the interior times the share of the
    border ring it does *not* occupy: a backdrop fills the border and scores near zero even when
    it covers most of the crop, while the item, centred and surrounded, scores high.
    """
    pixels = _prepare(image)
    height, width = pixels.shape[:2]
    rgb = pixels.reshape(-1, 3)
    lab = srgb_to_lab(rgb)
    border = _border_mask(height, width).reshape(-1)
    weights = _centre_weights(height, width).reshape(-1)

    k = min(_K, len(np.unique(rgb, axis=0)))
    centres, labels = _kmeans(lab, weights, k)
    labels = _merge_close(centres, labels)
    clusters = np.unique(labels)

    inner_w = np.where(border, 0.0, weights)
    if inner_w.sum() == 0:  # crop too small to have an interior
        inner_w = weights
    inner_share = np.array([inner_w[labels == c].sum() for c in clusters]) / inner_w.sum()
    border_share = np.array([(labels[border] == c).mean() for c in clusters])
    score = inner_share * (1.0 - border_share)
    best = int(np.argmax(score))
    if score[best] < _MIN_FOREGROUND_SCORE:
        best = int(np.argmax(inner_share))
    member = labels == clusters[best]

    mean_rgb = (rgb[member] * weights[member, None]).sum(axis=0) / weights[member].sum()
    mean_lab = (lab[member] * weights[member, None]).sum(axis=0) / weights[member].sum()
    return ColourName(
        name=name_lab(mean_lab),
        rgb=(int(np.rint(mean_rgb[0])), int(np.rint(mean_rgb[1])), int(np.rint(mean_rgb[2]))),
        family=family_lab(mean_lab),
    )
