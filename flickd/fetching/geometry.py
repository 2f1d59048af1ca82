"""Image geometry the models can take: refuse what is too thin to show anything, pad the rest.

Extreme aspect ratios break the models' preprocessing in two ways. The detector's resize keeps the
aspect ratio under a longest-edge cap, so a 1x8000 image's short side rounds to 0 pixels and the
processor raises. CLIP's resize takes the *shortest* side to 224 pixels, so the same 3 KB image
becomes a 224x1,792,000 picture: about 4 GB of memory and seconds of CPU before the centre crop
throws nearly all of it away. The pixel cap cannot see either (8,000 pixels is tiny).

Every image that meets a model goes through here:

- ``check_geometry`` refuses an image whose shorter side is under ``min_image_side`` pixels with
  ``bad_geometry`` (the download stage, the vision stage and search queries call it);
- ``bounded_geometry`` pads the short side of anything longer than the target aspect ratio with
  the image's own edge colour, centred, so the product stays whole (the detector's input, and
  every crop before CLIP sees it or it is stored). The target is ``max_aspect_ratio`` or less:
  low enough that each model's resize (``ResizeRule``, read from its processor) produces a
  shape of at least one patch and allocates at most half of ``max_preprocess_bytes``. A padded
  canvas is also kept to the other half of the budget, and to twice the resolution the models
  resize it to, scaling the image down first if needed (a 1x50000 line needs no 50000 pixels
  of length to be looked at). ``preprocess_bytes`` is the estimate the bound is derived from.

Images within the aspect limit are passed through untouched (the very same object), so normal
catalog images see exactly what they saw before: what grows with their aspect ratio is bounded
as above, what grows with their pixel count is bounded by ``max_image_pixels`` as it always was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from PIL import Image, ImageStat

from flickd.core.reasons import FailureReason, ImageFailure

if TYPE_CHECKING:
    from flickd.core.settings import Settings

# What transformers' image processors allocate, per pixel, on their PIL backend (measured on
# YolosImageProcessor and CLIPImageProcessor at the hub models' sizes, with margin):
# - of the image they are handed: the array copy and the PIL copy they resample from (~10);
INPUT_BYTES_PER_PIXEL = 12
# - of the image they resize to: resampled PIL and array copies, then the float64 rescale and
#   float32 normalise (~54 for YOLOS, which rescales the whole resized image; ~9 for CLIP,
#   whose resize output is centre-cropped before the float steps).
RESIZED_BYTES_PER_PIXEL = 64
# A padded canvas keeps at most twice the linear resolution the models resize it to: more would
# only be thrown away by their resize, and would cost memory in every batch that holds it.
CANVAS_OVERSAMPLE = 2


class ResizeRule(NamedTuple):
    """How a model's image processor resizes: the short side to ``shortest_edge`` pixels, the
    long side capped at ``longest_edge`` (None: uncapped, like CLIP). ``min_side`` is the
    shortest side the model can take (a ViT patch; 0 when the output size is fixed)."""

    shortest_edge: int
    longest_edge: int | None = None
    min_side: int = 1


def resized_size(width: int, height: int, rule: ResizeRule) -> tuple[int, int]:
    """An upper bound of the (width, height) the processor resizes a ``width`` x ``height``
    image to."""
    short, long = min(width, height), max(width, height)
    scale = rule.shortest_edge / short
    if rule.longest_edge is not None:
        scale = min(scale, rule.longest_edge / long)
    return math.ceil(width * scale), math.ceil(height * scale)


def preprocess_bytes(width: int, height: int, rules: Iterable[ResizeRule]) -> int:
    """Estimated peak bytes one model's preprocessing allocates for a ``width`` x ``height``
    image: the copies of its input plus what its resize produces (the largest over ``rules``)."""
    estimates = [
        INPUT_BYTES_PER_PIXEL * width * height
        + RESIZED_BYTES_PER_PIXEL * math.prod(resized_size(width, height, rule))
        for rule in rules
    ]
    return max(estimates, default=INPUT_BYTES_PER_PIXEL * width * height)


def rule_max_aspect(rule: ResizeRule, budget: float) -> float:
    """The largest aspect ratio whose resize under ``rule`` keeps a short side of at least
    ``rule.min_side`` pixels and allocates at most ``budget`` bytes."""
    limit = math.inf
    short, long = rule.shortest_edge, rule.longest_edge
    if long is not None:
        if rule.min_side > 0:
            # The short side shrinks to longest_edge / aspect: below a patch the model (and the
            # YOLOS processor's rounding to multiples of 16) has nothing left.
            limit = long / rule.min_side
        if RESIZED_BYTES_PER_PIXEL * short * long <= budget:
            return limit  # the long-side cap bounds the resized image whatever the aspect
    # Below the cap the resized image is shortest_edge x (shortest_edge * aspect).
    return min(limit, budget / (RESIZED_BYTES_PER_PIXEL * short * short))


@dataclass(frozen=True)
class GeometryLimits:
    """The settings that bound image geometry, and the resize rules of the models in use."""

    max_aspect_ratio: float = 20.0
    min_image_side: int = 8
    max_preprocess_bytes: int = 256 * 1024 * 1024
    rules: tuple[ResizeRule, ...] = field(default=())

    @classmethod
    def from_settings(
        cls, settings: Settings, rules: Iterable[tuple[int, int | None, int]] = ()
    ) -> GeometryLimits:
        return cls(
            max_aspect_ratio=settings.max_aspect_ratio,
            min_image_side=settings.min_image_side,
            max_preprocess_bytes=settings.max_preprocess_bytes,
            rules=tuple(ResizeRule(*rule) for rule in rules),
        )

    @classmethod
    def current(cls) -> GeometryLimits:
        """The limits of this process's settings (for callers that are not handed settings)."""
        from flickd.core.settings import get_settings

        return cls.from_settings(get_settings())

    @property
    def target_aspect(self) -> float:
        """The aspect ratio images are padded to: the setting, or lower where a model needs it."""
        aspect = self.max_aspect_ratio
        for rule in self.rules:
            aspect = min(aspect, rule_max_aspect(rule, self.max_preprocess_bytes / 2))
        return max(1.0, aspect)

    @property
    def max_padded_pixels(self) -> int:
        """The largest padded canvas: its copies in preprocessing take at most half the budget,
        and it has no more than CANVAS_OVERSAMPLE times the resolution the models use."""
        budget = max(1, self.max_preprocess_bytes // 2 // INPUT_BYTES_PER_PIXEL)
        if not self.rules:
            return budget
        aspect = self.target_aspect
        used = max(_resized_pixels_at(aspect, rule) for rule in self.rules)
        return max(1, min(budget, math.ceil(CANVAS_OVERSAMPLE**2 * used)))


def _resized_pixels_at(aspect: float, rule: ResizeRule) -> float:
    """Pixels the processor resizes an image of ``aspect`` (long / short) to."""
    short_side = float(rule.shortest_edge)
    if rule.longest_edge is not None:
        short_side = min(short_side, rule.longest_edge / aspect)
    return short_side * short_side * aspect


def check_geometry(width: int, height: int, limits: GeometryLimits | None = None) -> None:
    """Refuse an image too thin for the models. Raises ImageFailure(BAD_GEOMETRY)."""
    limits = limits or GeometryLimits.current()
    short = min(width, height)
    if short < limits.min_image_side:
        raise ImageFailure(
            FailureReason.BAD_GEOMETRY,
            f"{width}x{height} image: its shorter side is {short} px, under the "
            f"{limits.min_image_side} px minimum (FLICKD_MIN_IMAGE_SIDE)",
        )


@dataclass(frozen=True)
class BoundedImage:
    """An image as a model may see it, and how to map its boxes back to the original.

    The original, scaled by ``scale`` (x, y), sits at ``offset`` in ``image``; ``note`` says
    what was done (None when ``image`` is the original itself)."""

    image: Image.Image
    original_size: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)
    offset: tuple[int, int] = (0, 0)
    note: str | None = None

    @property
    def changed(self) -> bool:
        return self.note is not None

    def to_original(
        self, box: tuple[float, float, float, float]
    ) -> tuple[float, float, float, float]:
        """A box in pixels of ``image`` in pixels of the original (not clamped)."""
        (sx, sy), (dx, dy) = self.scale, self.offset
        x0, y0, x1, y1 = box
        return ((x0 - dx) / sx, (y0 - dy) / sy, (x1 - dx) / sx, (y1 - dy) / sy)


def bounded_geometry(image: Image.Image, limits: GeometryLimits) -> BoundedImage:
    """``image`` with its aspect ratio bounded for the models (never refuses; see the module)."""
    width, height = image.size
    aspect = limits.target_aspect
    short, long = min(width, height), max(width, height)
    if long <= aspect * short:
        return BoundedImage(image, (width, height))
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # The canvas is long x long/aspect; scale down first when that is more than the budget.
    scale = min(1.0, math.sqrt(limits.max_padded_pixels / (long * math.ceil(long / aspect))))
    content = rgb
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        content = rgb.resize(size, Image.Resampling.BOX)
    cw, ch = content.size
    wide = cw >= ch
    canvas_size = (
        (cw, max(ch, math.ceil(cw / aspect))) if wide else (max(cw, math.ceil(ch / aspect)), ch)
    )
    offset = ((canvas_size[0] - cw) // 2, (canvas_size[1] - ch) // 2)
    canvas = Image.new("RGB", canvas_size, _edge_colour(content, wide))
    canvas.paste(content, offset)
    scaled = f", scaled to {cw}x{ch} first" if content is not rgb else ""
    note = (
        f"padded from {width}x{height} to {canvas_size[0]}x{canvas_size[1]} for the models "
        f"(aspect ratio {long / short:.6g} over {aspect:.6g}{scaled})"
    )
    return BoundedImage(canvas, (width, height), (cw / width, ch / height), offset, note)


def _edge_colour(image: Image.Image, wide: bool) -> tuple[int, int, int]:
    """The mean colour of the two edges padding is added beyond (top and bottom rows of a wide
    image, left and right columns of a tall one): the backdrop extends, the product stays."""
    w, h = image.size
    if wide:
        edges = [image.crop((0, 0, w, 1)), image.crop((0, h - 1, w, h))]
    else:
        edges = [image.crop((0, 0, 1, h)), image.crop((w - 1, 0, w, h))]
    means = [ImageStat.Stat(edge).mean for edge in edges]
    r, g, b = (round((a + c) / 2) for a, c in zip(means[0], means[1], strict=True))
    return (r, g, b)
