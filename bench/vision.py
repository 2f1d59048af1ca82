"""Vision-stage throughput: the bare models in a plain loop vs the same images through the
pipeline (Redis queue, a real `flickd worker -Q gpu` process, blob store, Postgres).

    .venv/bin/python -m bench.vision --images 48 --size base

Prints images/s for both, their ratio (target: pipeline >= 0.85 x bare models) and the
pipeline's per-stage time (decode, detect, crop+colour, embed, write) from the worker's logs.
The models are the project's offline builds (`flickd models build`): `base` has the real
architectures and input sizes (YOLOS-small 512x864, CLIP ViT-B/32), random weights.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from sqlalchemy import func, select

from bench.common import (
    REDIS,
    broker_prefix,
    flush_redis,
    machine,
    scratch_postgres,
    stop_children_on_sigterm,
)
from db.runs import wait_for_run
from db.schema import Crop, Image
from db.session import session_scope
from flickd.core.settings import Settings
from models.device import set_mixed_precision
from synthetic.catalog import generate_catalog, write_feed
from synthetic.procs import catalog_server, celery_worker

PREFIX = broker_prefix()  # this run's own Redis keys


def _models(size: str) -> dict[str, Path]:
    from models.build import build_offline_models

    root = Path(tempfile.gettempdir()) / f"flickd-bench-models-{size}"
    detector, clip = root / "detector", root / "clip"
    if (detector / "config.json").exists() and (clip / "config.json").exists():
        return {"detector": detector, "clip": clip}
    return build_offline_models(root, size, 0)  # type: ignore[arg-type]


def bare_loop(
    paths: list[Path], models: dict[str, Path], batch: int, device: str, settings: Settings
) -> tuple[float, int]:
    """Detector + embedder on the same images and batch size, nothing else around them."""
    from flickd.fetching.imaging import decode_image
    from models.crops import crop_image, plan_crops
    from models.detector import Detector
    from models.embedder import Embedder

    detector = Detector(
        models["detector"], device=device, threshold=settings.detection_threshold, batch_size=batch
    )
    embedder = Embedder(models["clip"], device=device, batch_size=batch * 4)
    images = [decode_image(p.read_bytes(), settings.max_image_pixels).image for p in paths]
    detector.detect(images[:batch])  # warm-up, as the worker's first batch loads the models
    crops = 0
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        pixels = []
        for image, detections in zip(chunk, detector.detect(chunk), strict=True):
            planned = plan_crops(
                detections,
                image.size,
                min_side=settings.min_crop_side,
                merge_iou=settings.crop_merge_iou,
            )
            pixels += [crop_image(image, c) for c in planned]
        embedder.embed_images(pixels)
        crops += len(pixels)
    return len(images) / (time.perf_counter() - started), crops


def _stage_seconds(log_text: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for line in log_text.splitlines():
        if "analyze batch done" in line:
            for stage, value in re.findall(r"(\w+)_s=([0-9.]+)", line):
                totals[stage] += float(value)
    return totals


def pipeline(
    catalog,
    models: dict[str, Path],
    batch: int,
    device: str,
    work: Path,
    db_url: str,
    warmup,
    precision: str,
) -> tuple[float, int, dict[str, float]]:  # type: ignore[no-untyped-def]
    from producer.ingest import ingest

    settings = Settings(
        database_url=db_url,
        broker_url=REDIS,
        broker_prefix=PREFIX,
        data_dir=work / "data",
        allowed_networks=["127.0.0.0/8"],
        last_stage="analyze",
        finalize="off",
        detector_model=str(models["detector"]),
        embedding_model=str(models["clip"]),
        device=device,
        analyze_batch_size=batch,
        mixed_precision=precision == "amp",
    )
    gpu_log = work / "gpu-worker.log"
    with (
        catalog_server(catalog.images_dir, settings, work / "server.log") as base_url,
        celery_worker(settings, "download", concurrency=1, log_path=work / "dl.log"),
        celery_worker(settings, "gpu", concurrency=1, log_path=gpu_log),
    ):
        # Warm-up run: the worker loads its models on its first batch, as the bare loop did.
        warm_feed = work / "warmup.csv"
        write_feed(warmup, warm_feed, base_url)
        # Its own catalog name: the main run must not find these products already known.
        warm = ingest(warm_feed, settings, catalog="warmup")
        wait_for_run(settings, warm.run_id, timeout=900)
        skip = gpu_log.read_text()
        feed = work / "feed.csv"
        write_feed(catalog, feed, base_url)
        run_id = ingest(feed, settings).run_id
        wait_for_run(settings, run_id, timeout=3600)
        stages = _stage_seconds(gpu_log.read_text()[len(skip) :])
    with session_scope(settings) as session:
        first, last, count = session.execute(
            select(func.min(Image.downloaded_at), func.max(Image.analyzed_at), func.count()).where(
                Image.run_id == run_id, Image.state == "analyzed"
            )
        ).one()
        crops = session.scalar(
            select(func.count()).select_from(Crop).join(Image).where(Image.run_id == run_id)
        )
    return count / (last - first).total_seconds(), crops, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", choices=["tiny", "base"], default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=["amp", "fp32"],
        default="amp",
        help="amp: bf16/fp16 autocast on CUDA (CPU always runs fp32)",
    )
    parser.add_argument(
        "--bare-only",
        action="store_true",
        help="only the bare-model loop (a GPU machine without Postgres/Redis)",
    )
    args = parser.parse_args()
    stop_children_on_sigterm()
    print(machine())
    print(f"precision: {args.precision if args.device.startswith('cuda') else 'fp32 (CPU)'}")
    print(
        f"torch threads: {torch.get_num_threads()}; device {args.device}; batch {args.batch}; "
        f"models: {args.size} (offline build, real architecture)"
    )
    work = Path(tempfile.mkdtemp(prefix="flickd-bench-vision-"))
    models = _models(args.size)
    catalog = generate_catalog(
        work / "catalog", max(1, args.images // 2), seed=2, size="full", images_per_product=(2, 2)
    )
    warmup = generate_catalog(
        work / "warmup", max(1, args.batch // 2), seed=3, size="full", images_per_product=(2, 2)
    )
    paths = [catalog.image_path(img) for img in catalog.images]
    settings = Settings(mixed_precision=args.precision == "amp")
    set_mixed_precision(settings.mixed_precision)
    bare, bare_crops = bare_loop(paths, models, args.batch, args.device, settings)
    print(
        f"bare models (detector + embedder, plain loop): {bare:.2f} images/s "
        f"({len(paths)} images, {bare_crops} crops)"
    )
    if args.bare_only:
        return
    with scratch_postgres() as db_url:
        flush_redis(REDIS)
        rate, crops, stages = pipeline(
            catalog, models, args.batch, args.device, work, db_url, warmup, args.precision
        )
        flush_redis(REDIS)
    print(f"pipeline (queue, blob store, database): {rate:.2f} images/s ({crops} crops)")
    print(f"ratio pipeline / bare models: {rate / bare:.2f}  (target >= 0.85)")
    total = sum(stages.values()) or 1.0
    print(
        "pipeline time per stage: "
        + ", ".join(
            f"{stage} {seconds:.1f}s ({100 * seconds / total:.0f}%)"
            for stage, seconds in stages.items()
        )
    )


if __name__ == "__main__":
    main()
