"""From raw detections to the crops flickd indexes: plain functions, testable without a model.

Order of operations (``plan_crops``): clamp each box to the image, drop boxes too small to say
anything about an item, merge near-duplicate boxes of the same item, and when nothing survives
fall back to one whole-image crop labelled from the feed category.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.boxes import Box, Detection, box_area, clamp_box
from models.labels import FineLabel, label_for_feed_category

# A box smaller than this fraction of the image area is noise even when both sides pass
# ``min_side`` (e.g. 17x17 px on a 2000x2000 photo). Watches and rings in full-body shots sit
# around 0.2 % of the area, so the bar stays well below that.
DEFAULT_MIN_AREA_FRACTION = 0.0005


@dataclass(frozen=True, slots=True)
class Crop:
    """One region of an image that becomes one indexed item.

    ``box`` is in pixels of the original image, ``box_norm`` the same box divided by its width and
    height. A whole-image crop has no score; its label comes from the feed category and is None
    when the category is missing or unrecognised.
    """

    box: Box
    box_norm: Box
    score: float | None
    label_id: int | None
    fine_label: str | None
    coarse_label: str | None
    whole_image: bool = False


def is_tiny(
    box: Box,
    image_size: tuple[int, int],
    min_side: int,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
) -> bool:
    """True when a (clamped) box is too small to crop: a side under ``min_side`` pixels, or an
    area under ``min_area_fraction`` of the image."""
    width, height = image_size
    if box[2] - box[0] < min_side or box[3] - box[1] < min_side:
        return True
    return box_area(box) < min_area_fraction * width * height


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """Pairwise intersection-over-union of an (n, 4) array of x0, y0, x1, y1 boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = areas[:, None] + areas[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def merge_duplicates(detections: Sequence[Detection], iou_threshold: float) -> list[Detection]:
    """Greedy non-maximum suppression within each coarse class.

    A detector emits several boxes for one item (YOLOS has 100 detection tokens and no NMS), often
    with different fine labels ("shirt, blouse" and "top, t-shirt" on one top). Boxes of the same
    coarse class overlapping by ``iou_threshold`` or more are one item: the higher score is kept.
    Boxes of different coarse classes never merge (a bag held in front of a dress is two items).
    Result is sorted by descending score.
    """
    order = sorted(range(len(detections)), key=lambda i: (-detections[i].score, detections[i].box))
    if not order:
        return []
    ious = iou_matrix(np.array([detections[i].box for i in order]))
    kept: list[int] = []  # positions in ``order``
    for pos, idx in enumerate(order):
        coarse = detections[idx].coarse_label
        duplicate = any(
            detections[order[k]].coarse_label == coarse and ious[pos, k] >= iou_threshold
            for k in kept
        )
        if not duplicate:
            kept.append(pos)
    return [detections[order[pos]] for pos in kept]


def normalise_box(box: Box, width: int, height: int) -> Box:
    return (box[0] / width, box[1] / height, box[2] / width, box[3] / height)


def whole_image_crop(image_size: tuple[int, int], feed_category: str | None = None) -> Crop:
    """The crop used when detection found nothing or is switched off: the whole image, labelled
    from the feed's product category when flickd recognises it."""
    width, height = image_size
    label: FineLabel | None = label_for_feed_category(feed_category)
    return Crop(
        box=(0.0, 0.0, float(width), float(height)),
        box_norm=(0.0, 0.0, 1.0, 1.0),
        score=None,
        label_id=label.id if label else None,
        fine_label=label.name if label else None,
        coarse_label=label.coarse.value if label and label.coarse else None,
        whole_image=True,
    )


def plan_crops(
    detections: Sequence[Detection] | None,
    image_size: tuple[int, int],
    *,
    min_side: int,
    merge_iou: float,
    feed_category: str | None = None,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
) -> list[Crop]:
    """The crops to index for one image. ``detections=None`` means detection is off.

    Never empty: an image always yields at least the whole-image crop, so every catalog image is
    searchable even when the detector sees nothing.
    """
    width, height = image_size
    usable = []
    for det in detections or ():
        box = clamp_box(det.box, width, height)
        if not is_tiny(box, image_size, min_side, min_area_fraction):
            usable.append(det.with_box(box) if box != tuple(det.box) else det)
    merged = merge_duplicates(usable, merge_iou)
    if not merged:
        return [whole_image_crop(image_size, feed_category)]
    return [
        Crop(
            box=det.box,
            box_norm=normalise_box(det.box, width, height),
            score=det.score,
            label_id=det.label_id,
            fine_label=det.fine_label,
            coarse_label=det.coarse_label,
        )
        for det in merged
    ]


def crop_image(image: Image.Image, crop: Crop) -> Image.Image:
    """The pixels of ``crop``; the box is rounded outwards so no part of the item is cut off."""
    x0, y0, x1, y1 = crop.box
    pixel_box = (
        max(0, math.floor(x0)),
        max(0, math.floor(y0)),
        min(image.width, math.ceil(x1)),
        min(image.height, math.ceil(y1)),
    )
    if pixel_box == (0, 0, image.width, image.height):
        return image.copy()
    return image.crop(pixel_box)
