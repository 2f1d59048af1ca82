"""Video search throughput: flickd's way (sampling with scene changes, analysing the scene
changes and the frames that moved, carrying their items over the rest, batched analysis,
tracks, one search per track) beside the prototype's way (every N-th frame decoded and matched
one at a time: detect the frame, embed each crop, search each crop k=1, no tracks), in one run.

    .venv/bin/python -m bench.video --seconds 60 --size 1280x720 [--models trained] \
        [--cache /tmp/flickd-video-cache] [--flickd-only]

``--cache DIR`` keeps the indexed catalog and the clip (about six minutes to make on 2 cores)
and reuses them; ``--flickd-only`` skips the prototype's way for quick tries of a setting
(FLICKD_* variables apply, e.g. FLICKD_VIDEO_DETECTOR_SHORTEST_EDGE=352).

Models: `base` (`flickd models build`) has the real architectures with random weights; every
crop then scores 0.97-0.99 against every product, and a "match" is decided by a few
thousandths: recall measured with it is mostly chance. `trained` (the default) has the same
architectures and the same compute per frame, trained here once and kept in the temp folder:
* a `base` CLIP whose last two vision layers were trained to tell synthetic products apart
  (synthetic/instance_clip.py: packshot crops against frames of footage; about eleven minutes
  on 2 cores with bf16 units). It trains on a 300-product catalog of the benchmark's seed,
  whose first 60 products are the benchmark's catalog, as flickd's own fine-tuning stage
  trains on the catalog it indexes; the clip's frames are never seen, and the training
  report's held-out top-1 is measured on 30 products outside the benchmark's catalog;
* a `base` YOLOS whose two detection heads were trained to box the garment of a synthetic
  packshot or frame of footage (synthetic/instance_detector.py), on a catalog of another seed:
  no benchmark product is seen; it runs at detection threshold 0.2 (`_threshold`). With the
  random detector's boxes (half on the background), both ways search crops of little but
  background; `trained-clip` keeps that detector.

A synthetic catalog is analysed and indexed with these models in the embedded mode (SQLite,
tasks in-process), and a clip is made with synthetic/video.py from the images of half its
products (one shot each, cuts and cross-fades; the other half never appears). Prints, for both
ways:
frames decoded per second, frames analysed per second, seconds of video analysed per second of
wall time, the recall of the products shown (matched at `similar` or better) against the clip's
truth and how many shown products are not in it; then the ratio, the machine and its load.
Beside that recall, "recall, in place" counts a product only when it was matched where its
shot is (a crop of a frame of its shot, or a time range of flickd's overlapping the shot, give
or take one sampled frame): a product "recalled" from another shot was not found at all. A way
that reports more products finds more of the shown ones by chance, and more that are not
shown; "recall at equal list length" compares each way's best-scored products, as many for
both as the shorter list holds. Target:
flickd >= 3x the prototype's seconds of video per second at equal or better recall.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import machine, stop_children_on_sigterm
from bench.vision import _models
from flickd.core.settings import Settings
from flickd.services.search import SearchService
from flickd.services.video import SHOWN, VideoSearch


@dataclasses.dataclass
class Figures:
    name: str
    frames_decoded: int
    frames_analysed: int
    video_seconds: float
    decode_s: float  # decoding alone (a separate pass)
    wall_s: float  # decode + analysis + search, end to end
    # each product reported (matched at `similar` or better), with its best score: a track's
    # match (flickd), or the prototype's best crop
    scores: dict[str, float]
    crops: int = 0
    # (product, first s, last s) of each sighting at `similar` or better: a crop's frame (the
    # prototype) or a product's merged time range (flickd)
    sightings: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)

    @property
    def shown(self) -> set[str]:
        return set(self.scores)

    def recall_of_top(self, truth: set[str], length: int) -> float:
        """Recall of the ``length`` best-scored products reported (the list a user would read
        if both ways reported as many)."""
        best = sorted(self.scores, key=lambda p: (-self.scores[p], p))[:length]
        return len(truth.intersection(best)) / max(1, len(truth))

    def located(self, shots: Any, tolerance: float) -> set[str]:
        """The products seen where the clip shows them: a sighting of the product overlaps its
        shot, give or take ``tolerance`` (one sampled frame)."""
        return {
            shot.product_id
            for shot in shots
            for product, first, last in self.sightings
            if product == shot.product_id
            and first < shot.end_s + tolerance
            and last >= shot.start_s - tolerance
        }

    def recall(self, truth: set[str]) -> float:
        return len(self.shown & truth) / max(1, len(truth))

    def recall_in_place(self, truth: set[str], shots: Any, tolerance: float) -> float:
        return len(self.located(shots, tolerance)) / max(1, len(truth))

    def lines(self, truth: set[str], shots: Any = (), tolerance: float = 0.0) -> list[str]:
        found = self.shown & truth
        located = self.located(shots, tolerance)
        return [
            f"{self.name}:",
            f"  frames decoded/s  {self.frames_decoded / self.decode_s:8.1f}  "
            f"({self.frames_decoded} frames, decoding alone {self.decode_s:.1f}s)",
            f"  frames analysed/s {self.frames_analysed / self.wall_s:8.2f}  "
            f"({self.frames_analysed} frames, {self.crops} crops)",
            f"  video s / wall s  {self.video_seconds / self.wall_s:8.3f}  "
            f"({self.video_seconds:.1f}s of video in {self.wall_s:.1f}s)",
            f"  recall            {self.recall(truth):8.2f}  "
            f"({len(found)} of {len(truth)} products shown; {len(self.shown - truth)} shown "
            "that are not in the clip)",
            f"  recall, in place  {self.recall_in_place(truth, shots, tolerance):8.2f}  "
            f"({len(located)} of {len(truth)} matched where their shot is, within one sampled "
            "frame)",
        ]


def _index_catalog(catalog: Any, settings: Settings) -> None:
    """The real pipeline (download, detect, crop, colour, prompt, embed) on the catalog, then
    the index, as tests/test_search_api.py builds it."""
    from sqlalchemy import select

    from db.schema import ModelVersion
    from db.session import session_scope
    from producer.ingest import ingest
    from synthetic.catalog import write_feed
    from synthetic.server import CatalogServer
    from workers.indexing import build_from_database

    with CatalogServer(catalog.images_dir) as server:
        feed = write_feed(catalog, settings.data_dir / "feed.csv", server.base_url)
        assert ingest(feed, settings).status == "done"
    with session_scope(settings) as session:
        version_id = session.scalars(
            select(ModelVersion.id).where(ModelVersion.kind == "embedder", ModelVersion.active)
        ).one()
    build_from_database(settings, version_id, settings.index_dir)


def _decode_only(path: Path, settings: Settings) -> tuple[int, float]:
    from flickd.fetching.video import VideoLimits, open_video

    started = time.perf_counter()
    with open_video(path, VideoLimits.from_settings(settings)) as stream:
        for _ in stream.frames():
            pass
        decoded = stream.report.frames_decoded
    return decoded, time.perf_counter() - started


def flickd_way(path: Path, service: SearchService, settings: Settings) -> Figures:
    from flickd.fetching.video import VideoLimits, open_video

    _, decode_s = _decode_only(path, settings)
    data = path.read_bytes()
    started = time.perf_counter()
    with open_video(data, VideoLimits.from_settings(settings)) as stream:
        result = VideoSearch(service).search_video(stream, hashlib.sha256(data).hexdigest())
    wall = time.perf_counter() - started
    seconds = result.cut_at_s or result.duration_s or 0.0
    return Figures(
        "flickd (scene changes + frames that moved analysed, the rest carried; batches, tracks, "
        "one search per track)",
        result.frames_decoded,
        result.frames_analysed,
        seconds,
        decode_s,
        wall,
        {p.product_id: p.score for p in result.products},
        crops=len(result.frames),
        sightings=[(p.product_id, a, b) for p in result.products for a, b in p.time_ranges],
    )


def prototype_way(path: Path, every: int, service: SearchService, settings: Settings) -> Figures:
    """Every ``every``-th frame, one at a time: detect it, embed each crop alone, search each
    crop with k=1. Same models, same crop planning and geometry bounds, the same cap on items
    per frame."""
    import av

    from flickd.fetching.geometry import GeometryLimits, bounded_geometry
    from models import registry
    from models.crops import crop_image, plan_crops

    index, version = service._index_and_version()
    embedder = service._embedder(version)
    detector = registry.get_detector(settings)
    # The prototype embedded crops as cut; a thin one then costs CLIP's resize seconds. The
    # crops are bounded here as flickd bounds them, so that only the way of working differs.
    limits = GeometryLimits.from_settings(settings, [embedder.resize_rule])

    started = time.perf_counter()
    with av.open(str(path)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    decode_s = time.perf_counter() - started

    sightings: list[tuple[str, float, float]] = []
    scores: dict[str, float] = {}
    analysed = crops = 0
    started = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for number, frame in enumerate(container.decode(stream)):
            if number % every:
                continue
            image = frame.to_image()
            analysed += 1
            found = detector.detect([image])[0] if detector is not None else None
            planned = plan_crops(
                found,
                image.size,
                min_side=settings.min_crop_side,
                merge_iou=settings.crop_merge_iou,
            )[: settings.search_max_items]
            for crop in planned:
                pixels = bounded_geometry(crop_image(image, crop), limits).image
                vector = embedder.embed_images([pixels])
                (hits,) = service._search_grouped(index, vector, 1)
                crops += 1
                if hits and hits[0].match in SHOWN:
                    score = scores.get(hits[0].product_id, -1.0)
                    scores[hits[0].product_id] = max(score, hits[0].score)
                    at = float(frame.time or 0.0)
                    sightings.append((hits[0].product_id, at, at))
        seconds = float(stream.duration * stream.time_base) if stream.duration else 0.0
    wall = time.perf_counter() - started
    return Figures(
        f"prototype (every {every}th frame, one at a time, k=1 per crop, no tracks)",
        decoded,
        analysed,
        seconds,
        decode_s,
        wall,
        scores,
        crops=crops,
        sightings=sightings,
    )


def _trained_models(seed: int, detector: bool = True) -> dict[str, Path]:
    """The ``base`` architectures trained here, kept in the temp folder beside the built
    models: a CLIP trained on a catalog of ``seed`` (synthetic/instance_clip.py) and, with
    ``detector``, a YOLOS whose heads were trained on another catalog's scenes (seed 1000,
    synthetic/instance_detector.py; else the random ``base`` detector)."""
    from synthetic.instance_clip import TrainPlan, train_instance_clip
    from synthetic.instance_detector import DetectorPlan, train_instance_detector

    built = _models("base")
    clip = built["clip"].parent / f"clip-instance-seed{seed}"
    if not (clip / "config.json").exists():
        report = train_instance_clip(built["clip"], clip, TrainPlan(seed=seed))
        print(
            f"instance-trained CLIP in {report['seconds']:.0f}s: top-1 on "
            f"{report['held_out_products']} held-out products "
            f"{report['held_out_top1_before']:.2f} -> {report['held_out_top1_after']:.2f}"
        )
    if not detector:
        return {"detector": built["detector"], "clip": clip}
    plan = DetectorPlan()
    trained = built["detector"].parent / f"detector-instance-seed{plan.seed}"
    if not (trained / "config.json").exists():
        found = train_instance_detector(built["detector"], trained, plan)
        print(
            f"detector heads trained in {found['seconds']:.0f}s: on "
            f"{found['held_out_scenes']} held-out scenes, best box IoU "
            f"{found['held_out_iou_before']:.2f} -> {found['held_out_iou_after']:.2f}, coarse "
            f"class {found['held_out_class_before']:.2f} -> {found['held_out_class_after']:.2f}"
        )
    return {"detector": trained, "clip": clip}


def _threshold(models: str) -> dict[str, float]:
    """The trained detector's heads box the garment (held-out IoU 0.2 -> 0.6) but cannot tell
    its category from frozen random features (coarse class right in about one scene in ten),
    so their probability is spread over the classes and its best box rarely scores 0.5: it
    runs at 0.2 unless FLICKD_DETECTION_THRESHOLD says otherwise (for the catalog and the clip
    alike, both ways)."""
    if models != "trained" or "FLICKD_DETECTION_THRESHOLD" in os.environ:
        return {}
    return {"detection_threshold": 0.2}


def _make_catalog_and_clip(
    args: argparse.Namespace, settings: Settings, work: Path, size: tuple[int, int]
) -> Any:
    """Index a synthetic catalog and make a clip from the images of half its products."""
    from db.migrate import upgrade
    from synthetic.catalog import generate_catalog
    from synthetic.video import catalog_images, make_clip

    width, height = size

    upgrade(settings)
    shots = max(2, math.ceil(args.seconds / 2))  # shots last 1-3 s, 2 s on average
    # As many products again that the clip never shows: showing them is a mistake.
    catalog = generate_catalog(
        work / "catalog", 2 * shots, seed=args.seed, images_per_product=(1, 1)
    )
    started = time.perf_counter()
    _index_catalog(catalog, settings)
    print(
        f"catalog: {len(catalog.images)} images analysed and indexed in "
        f"{time.perf_counter() - started:.0f}s (models {args.models}, device {args.device}, "
        f"torch threads {torch.get_num_threads()})"
    )
    # One image per product in this catalog: each product's first image, in catalog order.
    images = catalog_images(catalog, [image.product_id for image in catalog.images[:shots]])
    started = time.perf_counter()
    truth = make_clip(images, work / "clip.mp4", fps=args.fps, size=(width, height), seed=args.seed)
    print(
        f"clip: {truth.duration_s:.1f}s {truth.width}x{truth.height} {truth.codec} at "
        f"{truth.fps:g} fps, {len(truth.shots)} shots, {truth.path.stat().st_size / 1e6:.1f} MB, "
        f"made in {time.perf_counter() - started:.0f}s"
    )
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="length of the clip (about)")
    parser.add_argument("--size", default="1280x720", help="frame size WIDTHxHEIGHT")
    parser.add_argument("--fps", type=float, default=30)
    parser.add_argument(
        "--models",
        choices=["tiny", "base", "trained-clip", "trained"],
        default="trained",
        help="trained (default): the base architectures, CLIP's last vision layers trained "
        "here to tell products apart and the detector's heads to find garments, so that "
        "recall means something; trained-clip: the same CLIP beside the random detector; "
        "base: random weights",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--every",
        type=int,
        default=0,
        help="the prototype's N (default: fps / FLICKD_VIDEO_MAX_FPS, the same frame rate)",
    )
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep the indexed catalog and the clip in this folder and reuse them on the next "
        "run with the same --seconds/--size/--fps/--models/--seed and the same FLICKD_* "
        "settings outside FLICKD_VIDEO_*/FLICKD_TRACK_* (their making takes minutes)",
    )
    parser.add_argument(
        "--flickd-only",
        action="store_true",
        help="skip the prototype's way (quick iterations; no ratio)",
    )
    args = parser.parse_args()
    stop_children_on_sigterm()
    print(machine())
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    width, height = (int(v) for v in args.size.lower().split("x"))

    if args.models.startswith("trained"):
        models = _trained_models(args.seed, detector=args.models == "trained")
    else:
        models = _models(args.models)
    named = f"{models['detector'].name}+{models['clip'].name}"  # the index depends on both
    key = f"{args.seconds:g}s-{args.size}-{args.fps:g}fps-{args.models}-{named}-seed{args.seed}"
    # So do the settings outside video search's own (FLICKD_DETECTION_THRESHOLD, say).
    indexing = sorted(
        (name, value)
        for name, value in os.environ.items()
        if name.startswith("FLICKD_") and not name.startswith(("FLICKD_VIDEO_", "FLICKD_TRACK_"))
    )
    if indexing:
        key += "-" + hashlib.sha256(repr(indexing).encode()).hexdigest()[:10]
    if args.cache is not None:
        work = args.cache / key
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="flickd-bench-video-"))
    state = work / "state.pickle"
    settings = Settings(
        data_dir=work / "data",
        allowed_networks=["127.0.0.0/8"],
        last_stage="analyze",
        detector_model=str(models["detector"]),
        embedding_model=str(models["clip"]),
        device=args.device,
        **_threshold(args.models),
    )
    if state.exists():
        with state.open("rb") as fh:
            truth = pickle.load(fh)
        print(f"catalog and clip reused from {work}")
    else:
        truth = _make_catalog_and_clip(args, settings, work, (width, height))
        with state.open("wb") as fh:
            pickle.dump(truth, fh)
    products = {shot.product_id for shot in truth.shots}
    every = args.every or max(1, round(truth.fps / settings.video_max_fps))

    service = SearchService(settings)
    service.warm_up()  # both ways use the same loaded models
    warm = Image.fromarray(np.zeros((height, width, 3), np.uint8))
    from models import registry

    detector = registry.get_detector(settings)
    if detector is not None:
        detector.detect([warm])
    print(
        f"settings: detection threshold {settings.detection_threshold}, "
        f"video_max_fps {settings.video_max_fps}, scene threshold "
        f"{settings.video_scene_threshold}, motion threshold {settings.video_motion_threshold}, "
        f"min fps {settings.video_min_fps}, detector shortest edge "
        f"{settings.video_detector_shortest_edge or 'its own'}, "
        f"batch {settings.video_batch_size} frames, "
        f"{settings.search_max_items} items per frame at most; prototype N = {every}"
    )

    tolerance = 1.0 / settings.video_max_fps  # one sampled frame
    if args.flickd_only:
        ours = flickd_way(truth.path, service, settings)
        print("\n".join(ours.lines(products, truth.shots, tolerance)))
        return
    prototype = prototype_way(truth.path, every, service, settings)
    ours = flickd_way(truth.path, service, settings)
    for figures in (prototype, ours):
        print("\n".join(figures.lines(products, truth.shots, tolerance)))
    ratio = (ours.video_seconds / ours.wall_s) / (prototype.video_seconds / prototype.wall_s)
    recall = [f.recall(products) for f in (ours, prototype)]
    in_place = [f.recall_in_place(products, truth.shots, tolerance) for f in (ours, prototype)]
    print(
        f"ratio flickd / prototype (video s per wall s): {ratio:.2f}x  (target >= 3x); "
        f"recall {recall[0]:.2f} vs {recall[1]:.2f}; in place {in_place[0]:.2f} vs "
        f"{in_place[1]:.2f}"
    )
    length = min(len(ours.scores), len(prototype.scores))
    print(
        f"recall at equal list length (each way's {length} best-scored products): flickd "
        f"{ours.recall_of_top(products, length):.2f} vs prototype "
        f"{prototype.recall_of_top(products, length):.2f}"
    )
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
