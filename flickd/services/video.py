"""Search the index with a video: which catalog products appear in a clip, and when.

The sampled frames (``flickd/fetching/video.py``) marked ``analyse`` go, ``video_batch_size``
at a time, through the analysis image search uses (``flickd/services/analysis.py``: detect →
plan crops → crop → colour → embed), the detector seeing each frame with its short side at
``video_detector_shortest_edge`` when that is set. The detections of one item in nearby frames
are joined into a track (``models/tracks.py``); a sampled frame that was not analysed carries
the last analysed frame's items (same boxes, same embeddings, one more frame record each), so
tracks span the shot they are in. Each track is searched once, all tracks in one grouped
search, with the normalised mean of its crop embeddings. A track's best product is its match,
with the same ``exact``/``similar``/``weak`` thresholds as image search.

The products of the video are the distinct products some track matched at ``similar`` or
better (the prototype dropped weaker matches too), best score first, each with the time ranges
of its tracks. Every detection also gets a per-frame record in the prototype's shape, carrying
its track's match whatever its type.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image as PILImage
from pydantic import BaseModel

from flickd.services.analysis import AnalysedCrop, analyse_images
from flickd.services.search import MatchType, ProductHit, SearchService
from models.tracks import Observation, Track, Tracker

if TYPE_CHECKING:
    from flickd.fetching.video import SampledFrame, VideoStream

THUMBNAIL_SIDE = 160
THUMBNAIL_QUALITY = 80
WHOLE_FRAME = "whole frame"  # the label of an item that is the whole frame (nothing detected)
SHOWN = (MatchType.EXACT, MatchType.SIMILAR)


# --- the result --------------------------------------------------------------------------------
class FrameRecord(BaseModel):
    """One detection in one sampled frame, in the prototype's shape."""

    frame: int  # position of the frame in the decoded stream
    timestamp: float  # seconds
    type: str  # fine label ("dress"), or "whole frame"
    colour: str | None
    matched_product_id: str | None
    match_type: MatchType | None
    confidence: float | None  # cosine score of the match
    track_id: int
    box: list[float]  # x0, y0, x1, y1 pixels of the frame
    # The frame was not analysed (it barely moved): the item is its track's last analysed one.
    carried: bool = False


class VideoTrack(BaseModel):
    track_id: int
    label: str  # the members' most frequent fine label, or "whole frame"
    coarse_label: str | None
    colour: str | None  # the members' most frequent colour
    first_s: float
    last_s: float
    frames: int  # sampled frames the item was seen in
    best_frame: int  # the member closest to the track's mean embedding: its frame number,
    best_timestamp: float
    best_box: list[float]  # and its box, x0, y0, x1, y1 pixels
    thumbnail: str  # "data:image/jpeg;base64,…" of that crop, at most 160 px a side
    match: ProductHit | None  # the best product
    alternatives: list[ProductHit]  # the next best


class VideoProduct(BaseModel):
    product_id: str
    catalog: str
    title: str | None
    brand: str | None
    score: float  # its best track's cosine score
    match: MatchType
    time_ranges: list[tuple[float, float]]  # seconds, where its tracks are, merged
    track_ids: list[int]
    thumbnail: str  # the best track's


class VideoSearchResult(BaseModel):
    kind: Literal["video"] = "video"
    sha256: str
    model_version_id: int
    model_version: str
    index_vectors: int
    container: str
    codec: str
    width: int
    height: int
    duration_s: float | None
    frames_decoded: int
    frames_sampled: int  # the time grid: at most video_max_fps a second, plus scene changes
    frames_analysed: int = 0  # of those, the frames the models saw
    corrupt_packets: int
    cut_at_s: float | None
    notes: list[str]
    products: list[VideoProduct]  # distinct, best confidence first
    tracks: list[VideoTrack]
    frames: list[FrameRecord]
    took_ms: float


# --- the search --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Seen:
    """One analysed detection, kept until the tracks are searched (the frame is not)."""

    frame_number: int
    timestamp: float
    label: str
    coarse_label: str | None
    colour: str
    box: tuple[float, float, float, float]
    vector: np.ndarray
    thumbnail: bytes  # JPEG
    track_id: int
    carried: bool = False  # repeated over a frame that was not analysed


class VideoSearch:
    """Video search on top of a SearchService: its index, models and model lock."""

    def __init__(self, service: SearchService) -> None:
        self.service = service
        self.settings = service.settings

    def search_video(
        self,
        stream: VideoStream,
        sha256: str,
        top_k: int = 5,
        progress: Callable[[float], None] | None = None,
    ) -> VideoSearchResult:
        """Analyse ``stream``'s sampled frames, track, search each track; see the module.

        Raises SearchUnavailable before decoding anything when there is no index, and
        VideoFailure (from the stream) when no frame decodes. ``progress(fraction 0..1)`` is
        called after each batch of frames, from their timestamps over the clip's length."""
        started = time.perf_counter()
        service, settings = self.service, self.settings
        index, version = service._index_and_version()
        embedder = service._embedder(version)
        tracker = Tracker(
            settings.track_min_iou, settings.track_min_similarity, settings.track_max_gap
        )
        seen: list[_Seen] = []
        length = _length(stream, settings.video_max_seconds)
        detect_edge = settings.video_detector_shortest_edge or None
        for batch in _batches(stream.frames(), max(1, settings.video_batch_size)):
            chosen = [frame for frame in batch if frame.analyse]
            analysed = iter(
                analyse_images(
                    [frame.image for frame in chosen],
                    settings,
                    embedder,
                    service._model_lock,
                    batch_size=len(chosen),
                    detector_shortest_edge=detect_edge,
                )
                if chosen
                else []
            )
            for frame in batch:
                if frame.analyse:
                    seen += _track_frame(tracker, frame, next(analysed))
                else:
                    seen += _carry_frame(tracker, frame, seen)
            if progress is not None:
                progress(min(0.99, batch[-1].timestamp / length) if length else 0.0)
        tracks = tracker.tracks
        hits = (
            service._search_grouped(index, np.stack([t.query_vector for t in tracks]), top_k)
            if tracks
            else []
        )
        video_tracks = [_video_track(t, seen, h) for t, h in zip(tracks, hits, strict=True)]
        if progress is not None:
            progress(1.0)
        info, report = stream.info, stream.report
        return VideoSearchResult(
            sha256=sha256,
            model_version_id=version.id,
            model_version=version.version,
            index_vectors=index.ntotal,
            container=info.container,
            codec=info.codec,
            width=info.width,
            height=info.height,
            duration_s=info.duration_s,
            frames_decoded=report.frames_decoded,
            frames_sampled=report.frames_sampled,
            frames_analysed=report.frames_analysed,
            corrupt_packets=report.corrupt_packets,
            cut_at_s=report.cut_at_s,
            notes=list(report.notes),
            products=_products(video_tracks, 1.0 / max(settings.video_max_fps, 1e-6)),
            tracks=video_tracks,
            frames=[_record(item, video_tracks[item.track_id]) for item in seen],
            took_ms=round((time.perf_counter() - started) * 1000, 1),
        )


def _length(stream: VideoStream, max_seconds: float) -> float | None:
    duration = stream.info.duration_s
    if duration is None or duration <= 0:
        return None
    return min(duration, max_seconds)


def _batches(frames: Iterable[SampledFrame], size: int) -> Iterator[list[SampledFrame]]:
    """The frames in order, in runs holding ``size`` analysed frames (the last run fewer), each
    with the frames carried between them."""
    batch: list[SampledFrame] = []
    analysed = 0
    for frame in frames:
        batch.append(frame)
        analysed += int(frame.analyse)
        if analysed == size:
            yield batch
            batch, analysed = [], 0
    if batch:
        yield batch


def _carry_frame(tracker: Tracker, frame: SampledFrame, seen: list[_Seen]) -> list[_Seen]:
    """Records for a frame that was not analysed: the last analysed frame's items, again."""
    ids = tracker.carry(frame.index, frame.scene_change)
    latest: dict[int, _Seen] = {}
    for item in reversed(seen):  # each carried track's latest record, from the end
        if len(latest) == len(ids):
            break
        if item.track_id in ids:
            latest.setdefault(item.track_id, item)
    return [
        dataclasses.replace(
            latest[track_id],
            frame_number=frame.frame_number,
            timestamp=frame.timestamp,
            carried=True,
        )
        for track_id in ids
    ]


def _track_frame(tracker: Tracker, frame: SampledFrame, items: list[AnalysedCrop]) -> list[_Seen]:
    observations = [
        Observation(
            frame.index, item.crop.box, item.crop.coarse_label, item.vector, item.crop.whole_image
        )
        for item in items
    ]
    ids = tracker.add_frame(frame.index, observations, frame.scene_change)
    return [
        _Seen(
            frame_number=frame.frame_number,
            timestamp=frame.timestamp,
            label=item.crop.fine_label or WHOLE_FRAME,
            coarse_label=item.crop.coarse_label,
            colour=item.colour,
            box=item.crop.box,
            vector=item.vector,
            thumbnail=_jpeg(item.pixels),
            track_id=track_id,
        )
        for item, track_id in zip(items, ids, strict=True)
    ]


def _jpeg(pixels: PILImage.Image) -> bytes:
    small = pixels.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


def _video_track(track: Track, seen: list[_Seen], hits: list[ProductHit]) -> VideoTrack:
    members = [seen[m] for m in track.members]
    query = track.query_vector
    best = max(members, key=lambda item: float(item.vector @ query))
    return VideoTrack(
        track_id=track.track_id,
        label=_most_common(item.label for item in members) or WHOLE_FRAME,
        coarse_label=track.coarse_label,
        colour=_most_common(item.colour for item in members),
        first_s=members[0].timestamp,
        last_s=members[-1].timestamp,
        frames=len(members),
        best_frame=best.frame_number,
        best_timestamp=best.timestamp,
        best_box=[float(v) for v in best.box],
        thumbnail="data:image/jpeg;base64," + base64.b64encode(best.thumbnail).decode("ascii"),
        match=hits[0] if hits else None,
        alternatives=hits[1:],
    )


def _most_common(values: Iterable[str | None]) -> str | None:
    counts = Counter(value for value in values if value)
    return counts.most_common(1)[0][0] if counts else None


def _products(tracks: list[VideoTrack], frame_interval: float) -> list[VideoProduct]:
    """The distinct products matched at ``similar`` or better, best score first. Ranges of its
    tracks that overlap or lie within one sampled frame of each other are one range."""
    by_product: dict[tuple[str, str], list[VideoTrack]] = {}
    for track in tracks:
        if track.match is not None and track.match.match in SHOWN:
            key = (track.match.catalog, track.match.product_id)
            by_product.setdefault(key, []).append(track)
    products = []
    for of_product in by_product.values():
        best = max(of_product, key=lambda t: t.match.score if t.match else -1.0)
        assert best.match is not None
        products.append(
            VideoProduct(
                product_id=best.match.product_id,
                catalog=best.match.catalog,
                title=best.match.title,
                brand=best.match.brand,
                score=best.match.score,
                match=best.match.match,
                time_ranges=merge_ranges(
                    [(t.first_s, t.last_s) for t in of_product], frame_interval * 1.01
                ),
                track_ids=sorted(t.track_id for t in of_product),
                thumbnail=best.thumbnail,
            )
        )
    products.sort(key=lambda p: (-p.score, p.time_ranges[0][0], p.product_id))
    return products


def merge_ranges(
    ranges: Iterable[tuple[float, float]], tolerance: float
) -> list[tuple[float, float]]:
    """``ranges`` sorted, those overlapping or at most ``tolerance`` apart merged."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= tolerance:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _record(item: _Seen, track: VideoTrack) -> FrameRecord:
    match = track.match
    return FrameRecord(
        frame=item.frame_number,
        timestamp=item.timestamp,
        type=item.label,
        colour=item.colour,
        matched_product_id=match.product_id if match else None,
        match_type=match.match if match else None,
        confidence=match.score if match else None,
        track_id=item.track_id,
        box=[float(v) for v in item.box],
        carried=item.carried,
    )


# --- plain-text rendering (``flickd search --video``) -----------------------------------------
def format_video_result(result: VideoSearchResult) -> str:
    """Products with their time ranges and match type, then the tracks, one line each."""
    duration = f"{result.duration_s:.1f} s" if result.duration_s is not None else "unknown length"
    lines = [
        f"{result.codec} {result.width}x{result.height}, {duration}: {result.frames_analysed} "
        f"frames analysed of {result.frames_sampled} sampled, {result.frames_decoded} decoded, "
        f"{len(result.tracks)} tracks · "
        f"model {result.model_version} · {result.took_ms / 1000:.1f} s",
        *(f"note: {note}" for note in result.notes),
    ]
    if not result.products:
        lines.append("no products matched at 'similar' or better")
    for rank, product in enumerate(result.products, start=1):
        ranges = ", ".join(f"{a:.1f}-{b:.1f}s" for a, b in product.time_ranges)
        lines.append(
            f"  {rank:>3}. {product.score:6.3f} {product.match.value:<7} {product.product_id}  "
            f"{product.title or ''} [{product.brand or '-'}]  at {ranges}"
        )
    return "\n".join(lines)
