"""A query image's items: detect → plan crops → crop → colour → embed, several images at once.

Image search (one image) and video search (a batch of sampled frames) both call
``analyse_images``; it runs the vision stage's pieces (``models/``, ``flickd/fetching/geometry``)
the way the vision stage does: the detector sees each image with its geometry bounded and its
boxes are mapped back, the crops are planned by ``plan_crops``, and CLIP sees each crop bounded.
Model calls take the caller's lock (HF tokenizers and a CPU's cores are not shared well) and
run on the device the registry picks; a CUDA out-of-memory halves the batch and goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image as PILImage

from flickd.core.settings import Settings
from flickd.fetching.geometry import BoundedImage, GeometryLimits, bounded_geometry
from models import registry
from models.boxes import Detection
from models.colour import dominant_colour
from models.crops import Crop, crop_image, plan_crops
from workers.vision import halving_on_oom, unbounded_detections

if TYPE_CHECKING:
    from models.embedder import Embedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysedCrop:
    """One item of an image: its planned crop, the crop's pixels, colour and embedding."""

    crop: Crop
    pixels: PILImage.Image  # as cut from the image (what the colour is read from)
    colour: str
    colour_family: str  # everyday word (models.colour.COLOUR_FAMILIES)
    colour_rgb: str
    vector: np.ndarray  # unit vector of the crop as CLIP saw it (bounded)
    detail: str | None  # what was done to the image or crop, when not plain detection


@dataclass
class _Planned:
    image: PILImage.Image
    notes: list[str] = field(default_factory=list)
    crops: list[Crop] = field(default_factory=list)


def analyse_images(
    images: Sequence[PILImage.Image],
    settings: Settings,
    embedder: Embedder,
    lock: threading.Lock,
    *,
    detect: bool = True,
    max_items: int | None = None,
    batch_size: int | None = None,
    detector_shortest_edge: int | None = None,
) -> list[list[AnalysedCrop]]:
    """The items of each RGB image, best detector scores first; never an empty list (an image
    with nothing detected, or one the detector fails on, is one whole-image item).

    ``max_items`` caps the items per image (default ``search_max_items``); ``batch_size`` is
    the images per detector call (default ``analyze_batch_size``), four times that the crops
    per embedder call, as in the vision stage. ``detector_shortest_edge`` makes the detector
    see the images at that short side instead of its processor's (``Detector.detect``)."""
    batch = max(1, batch_size or settings.analyze_batch_size)
    planned = [_Planned(image) for image in images]
    detections = _detect(planned, settings, lock, batch, detector_shortest_edge) if detect else None
    limit = max(1, settings.search_max_items if max_items is None else max_items)
    for index, item in enumerate(planned):
        item.crops = plan_crops(
            None if detections is None else detections[index],
            item.image.size,
            min_side=settings.min_crop_side,
            merge_iou=settings.crop_merge_iou,
        )[:limit]
    limits = GeometryLimits.from_settings(settings, [embedder.resize_rule])
    own = [[crop_image(item.image, crop) for crop in item.crops] for item in planned]
    seen = [[bounded_geometry(pixels, limits) for pixels in crops] for crops in own]
    flat = [bounded.image for crops in seen for bounded in crops]
    vectors = _embed(flat, embedder, lock, batch * 4)
    results: list[list[AnalysedCrop]] = []
    position = 0
    for item, pixels_of, seen_of in zip(planned, own, seen, strict=True):
        analysed = []
        for crop, pixels, bounded in zip(item.crops, pixels_of, seen_of, strict=True):
            colour = dominant_colour(pixels)
            analysed.append(
                AnalysedCrop(
                    crop=crop,
                    pixels=pixels,
                    colour=colour.name,
                    colour_family=colour.family,
                    colour_rgb="#{:02x}{:02x}{:02x}".format(*colour.rgb),
                    vector=vectors[position],
                    detail=_detail(item.notes, bounded),
                )
            )
            position += 1
        results.append(analysed)
    return results


def _detect(
    planned: list[_Planned],
    settings: Settings,
    lock: threading.Lock,
    batch: int,
    shortest_edge: int | None = None,
) -> list[list[Detection]] | None:
    """Detections per image in its own pixels; None when detection is off. An image the
    detector fails on gets none (so the whole image) and a note saying why."""
    detector = registry.get_detector(settings)
    if detector is None:
        return None
    limits = GeometryLimits.from_settings(settings, [detector.resize_rule])
    bounded = [bounded_geometry(item.image, limits) for item in planned]
    for item, seen in zip(planned, bounded, strict=True):
        if seen.note:
            item.notes.append(f"detected on the image {seen.note}")

    def detect(chunk: Sequence[PILImage.Image]) -> list[list[Detection]]:
        return detector.detect(chunk, batch_size=len(chunk), shortest_edge=shortest_edge)

    if len(planned) > 1:
        try:
            with lock:
                found = halving_on_oom(detect, [seen.image for seen in bounded], batch)
            return [
                unbounded_detections(dets, seen) for dets, seen in zip(found, bounded, strict=True)
            ]
        except torch.OutOfMemoryError:
            raise
        except Exception:  # one pathological image must not sink the rest
            log.exception("batch detection failed; retrying image by image")
    results: list[list[Detection]] = []
    for item, seen in zip(planned, bounded, strict=True):
        try:
            with lock:
                found_one = detector.detect([seen.image], shortest_edge=shortest_edge)[0]
                results.append(unbounded_detections(found_one, seen))
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            log.warning("query detection failed, whole image used: %s", error)
            item.notes.append(
                f"detection failed ({type(error).__name__}: {error}); whole image used"
            )
            results.append([])
    return results


def _embed(
    images: list[PILImage.Image], embedder: Embedder, lock: threading.Lock, batch: int
) -> np.ndarray:
    if not images:
        return np.zeros((0, embedder.dim), np.float32)
    with lock:
        chunks = halving_on_oom(
            lambda chunk: [embedder.embed_images(chunk, batch_size=len(chunk))], images, batch
        )
    return np.concatenate(chunks)


def _detail(notes: list[str], seen: BoundedImage) -> str | None:
    parts = [*notes, *([f"crop {seen.note}"] if seen.note else [])]
    return "; ".join(parts)[:1000] if parts else None
