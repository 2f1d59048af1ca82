"""Naming the dominant colour of a crop, finely and in shoppers' words.

The colour names come from the XKCD colour survey (``matplotlib.colors.XKCD_COLORS``, 949 names
people actually use, maintained with matplotlib), minus a few crude ones nobody wants in a product
caption. Matching is nearest neighbour in CIELAB, where Euclidean distance roughly follows
perceived difference; in RGB, dark blues and dark greens sit closer than they look.

The dominant colour is the largest k-means cluster of the crop's pixels *after discounting the
background*: product photos put a small garment on a large white or beige backdrop, and a detector
box still contains a margin of it, so "largest cluster" alone names the wall, not the dress.

Each fine name also has a **colour family**, one of 13 everyday words (:data:`PLAIN_FAMILIES`),
which is what prompts say and what shoppers type and filter by. The mapping is taken from the
survey itself rather than typed in (:func:`family_table`): 576 of the kept names state their
family ("olive green", "dusty pink", "navy blue"), the rest take the vote of their nearest
stating neighbours, and the lightness bands (black/grey/white, navy/blue) are split by lightness.
Nearest *family swatch*, the obvious alternative, fails because a family is a large, uneven region
and its survey swatch sits at one saturated corner of it: olive lands nearer the brown swatch
than the bright green one. Decided where people might differ: olive, teal and mint are green;
turquoise is blue; burgundy and maroon are red; cream and ivory are beige; the lightest greys are
white and charcoal is black; a bright royal blue is blue and only a dark, muted blue is navy.
A crop with two large, distant colours of different families is :data:`MULTICOLOUR`.
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
# A crop is multicolour when its runner-up colour scores at least this share of the dominant one
# (so it is a large part of the item, not a seam, a fold or a logo), lies at least this far from
# it in CIELAB (well beyond the shading of one fabric, which ``_MERGE_DELTA_E`` already merged
# up to 12), and falls in another family.
_MULTICOLOUR_SHARE = 0.5
_MULTICOLOUR_DELTA_E = 30.0

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


# --- colour families --------------------------------------------------------------------------
# Votes of the nearest survey colours whose name states its family: enough neighbours that one
# oddly named swatch does not decide, few enough to stay local (leave-one-out agreement with the
# named ones' own words is ~0.86 for k in 1..7).
_FAMILY_NEIGHBOURS = 5
# "reddish", "bluey", "purplish", "greeny": the survey's suffixed forms of a family word.
_FAMILY_SUFFIX = r"e?(?:d?ish|e?y)?"


def _stated_family(name: str) -> str | None:
    """The family the name itself states: its last word that is a family word, in any of the
    survey's forms ("olive green" -> green, "greenish blue" -> blue, "pinky" -> pink). English
    colour compounds put the head last. "navy" in a blue ("navy blue", "dark navy blue") is navy,
    the one family that is a kind of another; the lightness split (below) may still move it."""
    words = re.findall(r"[a-z]+", name.lower().replace("gray", "grey"))
    for word in reversed(words):
        for family in PLAIN_FAMILIES:
            if re.fullmatch(re.escape(family.removesuffix("e")) + _FAMILY_SUFFIX, word):
                return "navy" if family == "blue" and "navy" in words else family
    return None


def _swatch_lab(family: str) -> np.ndarray:
    from matplotlib.colors import XKCD_COLORS, to_rgb

    return srgb_to_lab(np.array(to_rgb(XKCD_COLORS[f"xkcd:{family}"])) * 255.0)


def _lightness_band(family: str, lab: np.ndarray) -> str:
    """Split the families that are lightness bands of one hue by lightness, at the midpoints
    between their own survey swatches: black | grey | white (L* 0, 61, 100), and navy | blue,
    where navy is a *dark, muted* blue (L* under the midpoint of navy 8 and blue 37, and nearer
    the navy swatch than the blue one in lightness-chroma) so a bright royal blue stays blue."""
    lightness, chroma = float(lab[0]), float(np.hypot(lab[1], lab[2]))
    if family in ("black", "grey", "white"):
        bands = {f: float(_swatch_lab(f)[0]) for f in ("black", "grey", "white")}
        return min(bands, key=lambda f: abs(bands[f] - lightness))
    if family in ("navy", "blue"):
        navy, blue = _swatch_lab("navy"), _swatch_lab("blue")

        def lc_distance(swatch: np.ndarray) -> float:
            return float(np.hypot(swatch[0] - lightness, np.hypot(swatch[1], swatch[2]) - chroma))

        dark = lightness < (navy[0] + blue[0]) / 2
        return "navy" if dark and lc_distance(navy) < lc_distance(blue) else "blue"
    return family


@lru_cache(maxsize=1)
def family_table() -> dict[str, str]:
    """Every fine name of :func:`colour_table` -> its family, built once per process.

    The survey is its own training data: 576 of its 909 kept names state a family ("olive
    green", "dusty pink", "navy blue"), and those words are what people called those colours.
    A name that states none ("olive", "burgundy", "teal", "cream") takes the inverse-distance
    vote of its nearest stating neighbours in CIELAB. Finally the lightness bands are split by
    lightness (:func:`_lightness_band`): the survey's words for them follow lightness only
    loosely ("pale grey" is #fdfdfe, "dark blue" is as dark as "navy"), and a shopper's white,
    grey, black, navy and blue are lightness ranges. No family is typed in per name.
    """
    names, lab = colour_table()
    stated = [_stated_family(name) for name in names]
    voters = np.array([i for i, family in enumerate(stated) if family is not None])
    families: dict[str, str] = {}
    for i, name in enumerate(names):
        family = stated[i]
        if family is None:
            distances = np.sqrt(((lab[voters] - lab[i]) ** 2).sum(axis=1))
            votes: dict[str, float] = {}
            for j in np.argsort(distances, kind="stable")[:_FAMILY_NEIGHBOURS]:
                voter = stated[voters[j]]
                assert voter is not None  # voters are the names that state a family
                votes[voter] = votes.get(voter, 0.0) + 1.0 / (float(distances[j]) + 1e-6)
            family = max(votes, key=lambda f: votes[f])
        families[name] = _lightness_band(family, lab[i])
    return families


def family_of(name: str | None) -> str | None:
    """The family of a fine name (``MULTICOLOUR`` is its own); None for a name flickd does not
    know (or none)."""
    if name == MULTICOLOUR:
        return MULTICOLOUR
    return family_table().get(name) if name else None


def _nearest(table: np.ndarray, lab: np.ndarray) -> int:
    return int(np.argmin(((table - lab) ** 2).sum(axis=1)))


def name_lab(lab: np.ndarray) -> str:
    """The nearest named colour to one CIELAB value."""
    names, table = colour_table()
    return names[_nearest(table, lab)]


def family_lab(lab: np.ndarray) -> str:
    """The family of one CIELAB value: that of its fine name, so a crop's family and fine name
    never disagree."""
    return family_table()[name_lab(lab)]


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
    """The name, RGB and family of the item's colour in a crop.

    Each cluster is scored by its centre-weighted share of the interior times the share of the
    border ring it does *not* occupy: a backdrop fills the border and scores near zero even when
    it covers most of the crop, while the item, centred and surrounded, scores high. The fine
    name is always the best cluster's; the family is ``MULTICOLOUR`` when a second colour is about
    as much of the item (a striped top, a colour-block dress).
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

    def mean_of(cluster: int) -> tuple[np.ndarray, np.ndarray]:
        member = labels == clusters[cluster]
        w = weights[member, None]
        return (rgb[member] * w).sum(axis=0) / w.sum(), (lab[member] * w).sum(axis=0) / w.sum()

    mean_rgb, mean_lab = mean_of(best)
    name = name_lab(mean_lab)
    family = family_table()[name]
    others = [c for c in np.argsort(-score, kind="stable") if c != best]
    if others and score[others[0]] >= _MULTICOLOUR_SHARE * score[best]:
        second_lab = mean_of(int(others[0]))[1]
        far = float(np.linalg.norm(second_lab - mean_lab)) >= _MULTICOLOUR_DELTA_E
        if far and family_lab(second_lab) != family:
            family = MULTICOLOUR
    return ColourName(
        name=name,
        rgb=(int(np.rint(mean_rgb[0])), int(np.rint(mean_rgb[1])), int(np.rint(mean_rgb[2]))),
        family=family,
    )
