"""Vision stage (queue ``gpu``): decode → detect → crop → colour → prompt → embed → write.

One task handles a batch of downloaded images. Detection runs on the whole batch and all crops
of the batch are embedded together, so the models see full batches. An image that cannot be
decoded, is too thin for the models (``bad_geometry``), or breaks analysis, fails alone with a
reason; the rest of the batch completes. An image detection cannot run on falls back to one
whole-image crop, the reason in the crop's ``detail``. Images and crops of extreme aspect ratio
are padded before a model sees them (``flickd/fetching/geometry.py``). A CUDA out-of-memory
halves the batch and carries on. Crops and embeddings are written with
``ON CONFLICT DO NOTHING`` and the image state moves ``downloaded → analyzed`` under a guard,
all in one transaction, so a re-delivered batch writes nothing twice.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import select

from db.catalog import retire_for_images
from db.embeddings import insert_embeddings
from db.images import claim, record_failures, transition
from db.schema import Crop as CropRow
from db.schema import Image, ImageState, Product, utcnow
from db.session import retrying, session_scope
from db.siblings import analyse_once, share_analysis
from db.sql import id_in
from db.versions import active_embedder, embedder_version_id
from db.versions import dialect_insert as _insert
from flickd.core.blobstore import BlobStore
from flickd.core.logs import log_context
from flickd.core.reasons import FailureReason, ImageFailure
from flickd.core.settings import Settings
from flickd.core.storage import StorageUnavailable
from flickd.core.timing import StepClock, observe_stages
from flickd.fetching.geometry import (
    BoundedImage,
    GeometryLimits,
    bounded_geometry,
    check_geometry,
)
from flickd.fetching.imaging import decode_image
from models import registry
from models.boxes import Detection
from models.colour import dominant_colour
from models.crops import Crop, crop_image, plan_crops
from models.labels import label_by_name
from models.prompts import crop_key, make_prompt
from workers.stage import StageResult, holding

log = logging.getLogger(__name__)

T = TypeVar("T")
CROP_JPEG_QUALITY = 90


@dataclass
class _Item:
    """One image on its way through the stage."""

    image_id: int
    run_id: int | None
    content_hash: str
    category: str | None
    pixels: PILImage.Image | None = None
    crops: list[Crop] = field(default_factory=list)
    crop_pixels: list[PILImage.Image] = field(default_factory=list)
    crop_rows: list[dict[str, Any]] = field(default_factory=list)
    failure: ImageFailure | None = None
    notes: list[str] = field(default_factory=list)  # what every crop's detail says


@dataclass
class AnalyzeReport:
    run_ids: set[int | None] = field(default_factory=set)
    analyzed: int = 0
    failed: int = 0
    crops: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def halving_on_oom(
    fn: Callable[[Sequence[Any]], list[T]], items: Sequence[Any], batch_size: int
) -> list[T]:
    """``fn`` over ``items`` in batches; on CUDA out-of-memory, halve the batch and go on."""
    results: list[T] = []
    start = 0
    size = max(1, batch_size)
    while start < len(items):
        try:
            results.extend(fn(items[start : start + size]))
            start += size
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("CUDA out of memory: batch size now %d", size)
    return results


def _claim_batch(image_ids: list[int], settings: Settings) -> tuple[list[_Item], set[int | None]]:
    """Claim the batch's still-``downloaded`` images (those out of attempts fail here); return
    them, and the runs of every image of the batch (a failure here may complete a run)."""

    def step() -> tuple[list[_Item], set[int | None]]:
        with session_scope(settings) as session:
            conn = session.connection()
            ids = claim(conn, image_ids, ImageState.DOWNLOADED.value, settings.max_stage_attempts)
            ids = analyse_once(conn, ids)  # siblings' analysis is copied, not recomputed
            rows = conn.execute(
                select(Image.id, Image.run_id, Image.blob_key, Product.category)
                .join(Product, Product.id == Image.product_id)
                .where(id_in(conn, Image.id, ids))
                .order_by(Image.id)
            ).all()
            run_ids = set(
                conn.scalars(select(Image.run_id).where(id_in(conn, Image.id, image_ids)))
            )
        return [_Item(r.id, r.run_id, r.blob_key, r.category) for r in rows], run_ids

    return retrying(step)


def _decode(items: list[_Item], blobs: BlobStore, settings: Settings) -> None:
    limits = GeometryLimits.from_settings(settings)
    for item in items:
        try:
            item.pixels = decode_image(
                blobs.get(item.content_hash), settings.max_image_pixels
            ).image
            check_geometry(*item.pixels.size, limits)
        except ImageFailure as failure:
            item.failure = failure
        except StorageUnavailable:
            raise  # the whole batch is retried, then re-driven: not this image's fault
        except Exception as error:  # a missing blob, a bug: this image only
            item.failure = ImageFailure(
                FailureReason.CORRUPT_IMAGE, f"{type(error).__name__}: {error}"
            )


def _detect(items: list[_Item], settings: Settings) -> list[Any] | None:
    """Detections per live item, in pixels of the item's image (None when detection is off).

    The detector sees each image with its geometry bounded (padded past the aspect limit); its
    boxes are mapped back. An image the detector fails on alone gets no detections (so one
    whole-image crop) and a note saying why, instead of failing: the image itself is fine."""
    detector = registry.get_detector(settings)
    if detector is None:
        return None
    limits = GeometryLimits.from_settings(settings, [detector.resize_rule])
    bounded = []
    for item in items:
        assert item.pixels is not None  # a live item was decoded
        try:
            seen = bounded_geometry(item.pixels, limits)
        except Exception as error:  # a bug: this image only (it stands in as a tiny blank)
            item.failure = ImageFailure(
                FailureReason.ANALYSIS_ERROR, f"geometry: {type(error).__name__}: {error}"
            )
            seen = BoundedImage(PILImage.new("RGB", (16, 16)), (16, 16))
        if seen.note:
            item.notes.append(f"detected on the image {seen.note}")
        bounded.append(seen)
    images = [seen.image for seen in bounded]
    try:
        found = halving_on_oom(detector.detect, images, settings.analyze_batch_size)
        return [unbounded_detections(dets, seen) for dets, seen in zip(found, bounded, strict=True)]
    except torch.OutOfMemoryError:
        raise
    except Exception:
        # One pathological image must not sink the batch: find it by detecting one at a time.
        log.exception("batch detection failed; retrying image by image")
    results: list[Any] = []
    for item, seen in zip(items, bounded, strict=True):
        try:
            results.append(unbounded_detections(detector.detect([seen.image])[0], seen))
        except Exception as error:
            with log_context(image_id=item.image_id):
                log.warning(
                    "detection failed, whole image used: %s: %s", type(error).__name__, error
                )
            item.notes.append(
                f"detection failed ({type(error).__name__}: {error}); whole image used"
            )
            results.append([])
    return results


def unbounded_detections(detections: list[Detection], seen: BoundedImage) -> list[Detection]:
    """Detections on a bounded image, in pixels of its original (plan_crops clamps them)."""
    if not seen.changed:
        return detections
    return [det.with_box(seen.to_original(det.box)) for det in detections]


def _plan(
    item: _Item, detections: Any, blobs: BlobStore, settings: Settings, limits: GeometryLimits
) -> None:
    """Crops, colours and prompts of one image (and the crop JPEGs in the blob store).

    A crop's colour is read from its own pixels; what is embedded and stored is the crop with
    its geometry bounded for CLIP (``limits``), so re-embedding the stored JPEG is bounded too.
    """
    assert item.pixels is not None
    item.crops = plan_crops(
        detections,
        item.pixels.size,
        min_side=settings.min_crop_side,
        merge_iou=settings.crop_merge_iou,
        feed_category=item.category,
    )
    for index, crop in enumerate(item.crops):
        own = crop_image(item.pixels, crop)
        colour = dominant_colour(own)
        label = label_by_name(crop.fine_label) if crop.fine_label else None
        prompt = make_prompt(label, colour.family, crop_key(item.content_hash, index))
        bounded = bounded_geometry(own, limits)
        pixels = bounded.image
        notes = [*item.notes, *([f"crop {bounded.note}"] if bounded.note else [])]
        buffer = io.BytesIO()
        pixels.save(buffer, format="JPEG", quality=CROP_JPEG_QUALITY)
        x0, y0, x1, y1 = crop.box
        nx0, ny0, nx1, ny1 = crop.box_norm
        item.crop_pixels.append(pixels)
        item.crop_rows.append(
            {
                "image_id": item.image_id,
                "crop_index": index,
                "x0": x0,
                "y0": y0,
                "x1": x1,
                "y1": y1,
                "nx0": nx0,
                "ny0": ny0,
                "nx1": nx1,
                "ny1": ny1,
                "score": crop.score,
                "fine_label": crop.fine_label,
                "coarse_label": crop.coarse_label,
                "whole_image": crop.whole_image,
                "detail": "; ".join(notes)[:1000] if notes else None,
                "colour_name": colour.name,
                "colour_rgb": "#{:02x}{:02x}{:02x}".format(*colour.rgb),
                "colour_family": colour.family,
                "prompt": prompt,
                "blob_key": blobs.put(buffer.getvalue()),
            }
        )


def _write(
    items: list[_Item],
    vectors: np.ndarray,
    embedder: Any,
    detector_version: str | None,
    settings: Settings,
) -> None:
    now = utcnow()
    good = [item for item in items if item.failure is None]
    bad = [item for item in items if item.failure is not None]
    retrying(lambda: _write_once(good, bad, vectors, embedder, detector_version, now, settings))


def _write_once(
    good: list[_Item],
    bad: list[_Item],
    vectors: np.ndarray,
    embedder: Any,
    detector_version: str | None,
    now: Any,
    settings: Settings,
) -> None:
    with session_scope(settings) as session:
        conn = session.connection()
        version_id = embedder_version_id(conn, embedder.name_or_dir, embedder.model_version)
        rows = [
            dict(row, detector_version=detector_version, created_at=now)
            for item in good
            for row in item.crop_rows
        ]
        if rows:
            conn.execute(
                _insert(conn)(CropRow.__table__).on_conflict_do_nothing(
                    index_elements=["image_id", "crop_index"]
                ),
                rows,
            )
            crops = CropRow.__table__
            ids = {
                (r.image_id, r.crop_index): r.id
                for r in conn.execute(
                    select(crops.c.id, crops.c.image_id, crops.c.crop_index).where(
                        crops.c.image_id.in_([item.image_id for item in good])
                    )
                )
            }
            insert_embeddings(
                conn,
                version_id,
                [ids[(row["image_id"], row["crop_index"])] for row in rows],
                vectors,
            )
        transition(
            conn,
            ImageState.DOWNLOADED.value,
            [{"b_id": item.image_id} for item in good],
            state=ImageState.ANALYZED.value,
            analyzed_at=now,
        )
        # Siblings (same bytes) copy this analysis, and the images these replace leave
        # search, in this same commit (db/siblings.py, db/catalog.py).
        done = [item.image_id for item in good]
        retire_for_images(conn, done + share_analysis(conn, done, now), now)
        record_failures(
            conn,
            ImageState.DOWNLOADED.value,
            [(i.image_id, i.failure.reason.value, i.failure.detail, 0) for i in bad if i.failure],
        )


def embedder_name(settings: Settings) -> str:
    """The model new crops are embedded with: the active version (a fine-tuned one once
    promoted), else the configured base model."""
    with session_scope(settings) as session:
        active = active_embedder(session)
    return active.name if active else settings.embedding_model


def analyze_batch(image_ids: list[int], settings: Settings) -> AnalyzeReport:
    """Analyse every still-``downloaded`` image of the batch; return what happened."""
    report = AnalyzeReport()
    items, report.run_ids = _claim_batch(image_ids, settings)
    if not items:
        return report
    with holding([item.image_id for item in items], ImageState.DOWNLOADED.value, settings):
        _analyze(items, report, settings)
    return report


def _analyze(items: list[_Item], report: AnalyzeReport, settings: Settings) -> None:
    clock = StepClock()
    blobs = BlobStore.for_settings(settings)
    with clock("decode"):
        _decode(items, blobs, settings)

    live = [item for item in items if item.failure is None]
    with clock("detect"):
        detections = _detect(live, settings) if live else []

    with clock("crop_colour"):
        embedder = registry.get_embedder_by_name(embedder_name(settings), settings)
        limits = GeometryLimits.from_settings(settings, [embedder.resize_rule])
        for index, item in enumerate(live):
            if item.failure is not None:
                continue
            with log_context(image_id=item.image_id):
                try:
                    detected = None if detections is None else detections[index]
                    _plan(item, detected, blobs, settings, limits)
                except StorageUnavailable:
                    raise
                except Exception as error:
                    log.exception("analysis failed")
                    item.failure = ImageFailure(
                        FailureReason.ANALYSIS_ERROR, f"{type(error).__name__}: {error}"
                    )

    with clock("embed"):
        good = [item for item in items if item.failure is None]
        pixels = [p for item in good for p in item.crop_pixels]
        chunks = (
            halving_on_oom(
                lambda batch: [embedder.embed_images(batch)],
                pixels,
                settings.analyze_batch_size * 4,
            )
            if pixels
            else []
        )
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)

    with clock("write"):
        detector = registry.get_detector(settings)
        _write(items, vectors, embedder, detector.model_version if detector else None, settings)

    for step, seconds in clock.seconds.items():
        report.seconds[step] += seconds
    report.analyzed = len(good)
    report.failed = len(items) - len(good)
    report.crops = len(pixels)
    observe_stages(clock.seconds)
    log.info(
        "analyze batch done images=%d analyzed=%d failed=%d crops=%d %s",
        len(items),
        report.analyzed,
        report.failed,
        report.crops,
        clock.summary(),
    )


def analyze_stage(image_ids: list[int], settings: Settings) -> StageResult:
    """The analysis task's work: analyse the batch; nothing follows but closing its runs."""
    return StageResult(run_ids=analyze_batch(image_ids, settings).run_ids)
