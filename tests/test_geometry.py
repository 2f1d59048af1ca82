"""Extreme image geometry, through every path where an image meets a model.

A valid 1x8000 JPEG used to end ``analysis_error`` (the detector's resize rounds its short side
to 0 pixels) and, through CLIP's preprocessing (shortest side to 224), peaked at about 4 GB. Now
images too thin to show anything are refused with ``bad_geometry``, the rest are padded to a
bounded aspect ratio, and an image the detector fails on is analysed whole.

The paths run for real: the download stage's function on bytes from a loopback server, the
vision stage, search by upload and by URL. Their memory is measured in a process of their own
(``tests/geometry_probe.py``: the resident high-water mark, reset just before), with models whose
image processors have the hub models' configurations (YOLOS at 512/864, CLIP at 224 with its
centre crop; tiny random weights behind them).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from db.migrate import upgrade
from db.schema import Crop, ModelVersion
from db.schema import Image as ImageRow
from db.session import session_scope
from flickd.core.blobstore import BlobStore
from flickd.core.reasons import FailureReason, ImageFailure
from flickd.core.settings import Settings, reset_settings
from flickd.fetching.geometry import (
    GeometryLimits,
    ResizeRule,
    bounded_geometry,
    check_geometry,
    preprocess_bytes,
)
from flickd.fetching.imaging import validate_image
from flickd.services.api import create_app
from producer.ingest import ingest
from synthetic.procs import settings_env
from synthetic.server import CatalogServer
from tests.conftest import FAST_DOWNLOADS
from tests.models_fixtures import garment_image, tiny_models
from workers.indexing import build_from_database
from workers.vision import analyze_batch

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
BOUND = Settings().max_preprocess_bytes  # 256 MiB: what the tests hold every path to

# The operator's shapes (width x height), each saved for real: name -> (size, format).
THIN: dict[str, tuple[tuple[int, int], str]] = {
    "1x8000.jpg": ((1, 8000), "JPEG"),
    "8000x1.jpg": ((8000, 1), "JPEG"),
    "1x1.png": ((1, 1), "PNG"),
    "20001x1.png": ((20001, 1), "PNG"),
}
TALL = "8x8000.jpg"  # thin but within FLICKD_MIN_IMAGE_SIDE: padded, never refused
# Ordinary photos; the second has a size of its own, so a test can make detection fail on it.
ORDINARY = {
    "ordinary-0.jpg": (300, 400),
    "ordinary-1.jpg": (280, 400),
    "ordinary-2.jpg": (300, 400),
}
# The processors of the hub models, as the offline builds write them (``models.build``).
REAL_RULES = (ResizeRule(512, 864, 16), ResizeRule(224, None, 1))


def encoded(size: tuple[int, int], fmt: str, colour=(170, 40, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_shaped_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random YOLOS and CLIP whose processors have the hub models' sizes."""
    from models.build import SPECS, build_clip, build_detector
    from models.loading import quiet_progress_bars

    quiet_progress_bars()

    spec = dataclasses.replace(
        SPECS["tiny"], det_image_size=(512, 864), vis_image=224, vis_patch=32
    )
    out = tmp_path_factory.mktemp("real-shaped-models")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        detector = build_detector(out / "detector", spec, torch.Generator().manual_seed(0))
        clip = build_clip(out / "clip", spec, "tiny")
    return {"detector": detector, "clip": clip}


@pytest.fixture(scope="module")
def thin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogServer]:
    """The thin images (twice: under ``a/`` and ``b/``), a tall one and ordinary photos."""
    root = tmp_path_factory.mktemp("thin-images")
    for sub in ("a", "b"):
        (root / sub).mkdir()
        for name, (size, fmt) in THIN.items():
            (root / sub / name).write_bytes(encoded(size, fmt))
    (root / TALL).write_bytes(encoded((8, 8000), "JPEG"))
    for i, (name, size) in enumerate(ORDINARY.items()):
        photo = garment_image((40 + 60 * i, 60, 160), (235, 232, 228), size)
        photo.save(root / name, format="JPEG", quality=90)
    with CatalogServer(root) as server:
        yield server


def model_settings(data_dir: Path, models: dict[str, Path], **overrides: Any) -> Settings:
    settings = Settings(
        data_dir=data_dir,
        allowed_networks=["127.0.0.0/8"],
        **{**FAST_DOWNLOADS, **overrides},
        detector_model=str(models["detector"]),
        embedding_model=str(models["clip"]),
        device="cpu",
        analyze_batch_size=4,
    )
    upgrade(settings)
    return settings


def write_feed(path: Path, urls: dict[str, str]) -> Path:
    """A feed of one product per image: ``product_id -> url``."""
    lines = ["product_id,image_url,category", *(f"{p},{u},dress" for p, u in urls.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def probe(settings: Settings, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``items`` through ``tests/geometry_probe.py`` under ``settings``."""
    env = settings_env(settings)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "tests.geometry_probe"],
        input=json.dumps({"items": items}),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def crops_by_url(settings: Settings) -> dict[str, tuple[ImageRow, list[Crop]]]:
    with session_scope(settings) as session:
        images = list(session.scalars(select(ImageRow)))
        crops = list(session.scalars(select(Crop).order_by(Crop.image_id, Crop.crop_index)))
        session.expunge_all()
    return {i.url: (i, [c for c in crops if c.image_id == i.id]) for i in images}


# --- the guard itself --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(THIN))
def test_thin_images_are_refused_with_a_clear_detail(name):
    (width, height), _ = THIN[name]
    with pytest.raises(ImageFailure) as refused:
        check_geometry(width, height, GeometryLimits())
    assert refused.value.reason is FailureReason.BAD_GEOMETRY
    assert f"{width}x{height} image" in refused.value.detail
    assert "shorter side is 1 px, under the 8 px minimum" in refused.value.detail
    check_geometry(width, height, GeometryLimits(min_image_side=1))  # allowed when configured


@pytest.mark.parametrize(
    ("size", "canvas"),
    [
        ((1, 8000), (400, 8000)),
        ((8000, 1), (8000, 400)),
        ((1, 1), (1, 1)),
        # 20001x1001 would be 20 M pixels; CLIP sees 224x4480: scaled to twice that first
        ((20001, 1), (8956, 448)),
        ((8, 8000), (400, 8000)),
        ((300, 400), (300, 400)),
    ],
)
def test_bounded_geometry_pads_within_the_budget(size, canvas):
    limits = GeometryLimits(rules=REAL_RULES)
    image = Image.new("RGB", size, (170, 40, 60))
    bounded = bounded_geometry(image, limits)
    assert bounded.image.size == canvas
    w, h = canvas
    assert max(w, h) <= limits.target_aspect * min(w, h) + 1
    assert preprocess_bytes(w, h, REAL_RULES) <= limits.max_preprocess_bytes
    if canvas == size:
        assert bounded.image is image and bounded.note is None  # ordinary images untouched
        return
    assert bounded.note and f"padded from {size[0]}x{size[1]} to {w}x{h}" in bounded.note
    # The product sits whole in the middle, the padding in its edge colour.
    assert bounded.image.getpixel((0, 0)) == (170, 40, 60)
    x0, y0, x1, y1 = bounded.to_original((0.0, 0.0, float(w), float(h)))
    assert x0 <= 0 <= size[0] <= x1 and y0 <= 0 <= size[1] <= y1
    dx, dy = bounded.offset
    assert bounded.to_original((dx, dy, dx + 1, dy + 1))[:2] == (0.0, 0.0)


def test_the_models_own_shapes_tighten_the_aspect_limit():
    assert GeometryLimits(rules=REAL_RULES).target_aspect == 20.0
    # The tiny test detector caps its long side at 96 px: past 6:1 its short side has no patch.
    assert GeometryLimits(rules=(ResizeRule(64, 96, 16),)).target_aspect == 6.0
    loose = GeometryLimits(max_aspect_ratio=10_000.0, rules=REAL_RULES)
    # YOLOS: 864 / 16; CLIP: 224 x 224a x 64 bytes within half of 256 MiB.
    assert loose.target_aspect == pytest.approx(min(864 / 16, 128 * MiB / (64 * 224 * 224)))
    small = GeometryLimits(max_aspect_ratio=10_000.0, max_preprocess_bytes=32 * MiB)
    assert dataclasses.replace(small, rules=(ResizeRule(224),)).target_aspect < 6


def test_processors_report_their_resize_rules(real_shaped_models, tiny_models):
    from models.detector import Detector
    from models.embedder import Embedder

    assert Detector(real_shaped_models["detector"], device="cpu").resize_rule == (512, 864, 16)
    assert Embedder(real_shaped_models["clip"], device="cpu").resize_rule == (224, None, 1)
    assert Detector(tiny_models["detector"], device="cpu").resize_rule == (64, 96, 16)


def test_geometry_settings_are_checked():
    for bad in ({"max_aspect_ratio": 0.5}, {"min_image_side": 0}, {"max_preprocess_bytes": 1}):
        with pytest.raises(ValueError):
            Settings(**bad)


def test_validate_image_uses_the_process_settings_unless_given_limits(monkeypatch):
    data = encoded((1, 8000), "JPEG")
    with pytest.raises(ImageFailure) as refused:
        validate_image(data, 50_000_000)
    assert refused.value.reason is FailureReason.BAD_GEOMETRY
    assert validate_image(data, 50_000_000, GeometryLimits(min_image_side=1)).height == 8000
    monkeypatch.setenv("FLICKD_MIN_IMAGE_SIDE", "1")
    reset_settings()
    assert validate_image(data, 50_000_000).width == 1


def test_the_probe_sees_the_memory_bomb_the_guard_prevents(tmp_path, real_shaped_models):
    """Without the guard one 1x1000 line through CLIP's real preprocessing takes more than the
    whole budget (1x8000 takes about 4 GB); with it, a few MiB."""
    settings = model_settings(tmp_path / "data", real_shaped_models)
    raw = tmp_path / "1x1000.jpg"
    raw.write_bytes(encoded((1, 1000), "JPEG"))
    unguarded, guarded = probe(
        settings, [{"mode": "raw", "path": str(raw)}, {"mode": "guarded", "path": str(raw)}]
    )
    assert unguarded["result"]["shape"] == guarded["result"]["shape"] == [1, 3, 224, 224]
    assert unguarded["peak"] > BOUND, unguarded
    assert guarded["peak"] < BOUND / 16, guarded
    print(
        f"1x1000 through CLIP's preprocessing, MiB: unguarded {unguarded['peak'] / MiB:.1f}, "
        f"guarded {guarded['peak'] / MiB:.1f}"
    )


# --- download ----------------------------------------------------------------------------------
def test_download_refuses_thin_images_and_keeps_tall_ones(
    tmp_path, real_shaped_models, thin_server
):
    settings = model_settings(tmp_path / "data", real_shaped_models)
    # An ordinary photo first: the process's first request pays for what HTTP loads lazily.
    names = ["ordinary-0.jpg", *(f"a/{name}" for name in THIN), TALL]
    results = probe(
        settings, [{"mode": "download", "url": thin_server.image_url(n)} for n in names]
    )
    for name, outcome in zip(names, results, strict=True):
        result = outcome["result"]
        if name == TALL:
            assert (result["reason"], result["width"], result["height"]) == (None, 8, 8000)
        elif name.startswith("ordinary"):
            assert (result["reason"], result["width"], result["height"]) == (None, 300, 400)
        else:
            (width, height), _ = THIN[name.removeprefix("a/")]
            assert result["reason"] == "bad_geometry", (name, result)
            assert result["detail"].startswith(f"{width}x{height} image: its shorter side is 1 px")
        assert outcome["peak"] < BOUND, (name, outcome)
    print(
        "download peaks MiB:",
        {n: round(o["peak"] / MiB, 1) for n, o in zip(names, results, strict=True)},
    )


# --- the vision stage --------------------------------------------------------------------------
def test_vision_stage_refuses_or_pads_and_stays_bounded(
    tmp_path, real_shaped_models, thin_server, monkeypatch
):
    """Images stored before the guard (or under FLICKD_MIN_IMAGE_SIDE=1) reach the vision
    stage: under the default minimum they fail ``bad_geometry``; allowed, each is analysed as
    one whole-image crop, padded for the models, with the padding in the crop's detail."""
    settings = model_settings(tmp_path / "data", real_shaped_models)
    group_a = {f"a{i}": thin_server.image_url(f"a/{n}") for i, n in enumerate(THIN)}
    group_b = {f"b{i}": thin_server.image_url(f"b/{n}") for i, n in enumerate(THIN)}
    others = {
        "tall": thin_server.image_url(TALL),
        "ordinary": thin_server.image_url("ordinary-0.jpg"),
    }
    feed = write_feed(tmp_path / "feed.csv", {**group_a, **group_b, **others})
    monkeypatch.setenv("FLICKD_MIN_IMAGE_SIDE", "1")  # the download stage reads its process's
    reset_settings()
    assert ingest(feed, settings.model_copy(update={"min_image_side": 1})).status == "done"
    monkeypatch.delenv("FLICKD_MIN_IMAGE_SIDE")
    reset_settings()
    rows = crops_by_url(settings)
    assert {image.state for image, _ in rows.values()} == {"downloaded"}
    ids_a = sorted(rows[u][0].id for u in group_a.values())
    ids_b = sorted(rows[u][0].id for u in [*group_b.values(), *others.values()])

    refused, allowed = probe(
        settings,
        [
            {"mode": "analyze", "ids": ids_a},
            {"mode": "analyze", "ids": ids_b, "overrides": {"min_image_side": 1}},
        ],
    )
    assert refused["result"] == {"analyzed": 0, "failed": 4, "crops": 0}
    assert allowed["result"]["analyzed"] == 6 and allowed["result"]["failed"] == 0
    for outcome in (refused, allowed):
        assert outcome["peak"] < BOUND, outcome
    print(
        f"vision peaks MiB: refused {refused['peak'] / MiB:.1f}, padded {allowed['peak'] / MiB:.1f}"
    )

    rows = crops_by_url(settings)
    blobs = BlobStore(settings.blob_dir)
    for url in group_a.values():
        image, crops = rows[url]
        assert (image.state, image.failure_reason, crops) == ("failed", "bad_geometry", [])
        assert "shorter side is 1 px, under the 8 px minimum" in (image.failure_detail or "")
    expected_canvas = {
        "1x8000.jpg": (400, 8000),
        "8000x1.jpg": (8000, 400),
        "1x1.png": None,
        "20001x1.png": (8956, 448),
    }
    for url in [*group_b.values(), others["tall"]]:
        name = url.rsplit("/", 1)[1]
        image, crops = rows[url]
        assert image.state == "analyzed" and image.failure_reason is None, url
        (crop,) = crops  # nothing a detector finds on a 1-8 px line survives: the whole image
        assert crop.whole_image and crop.fine_label == "dress"  # from the feed category
        assert (crop.x0, crop.y0, crop.x1, crop.y1) == (0, 0, image.width, image.height)
        stored = Image.open(io.BytesIO(blobs.get(crop.blob_key)))
        canvas = expected_canvas.get(name, (400, 8000))
        if canvas is None:  # 1x1: nothing to pad
            assert crop.detail is None and stored.size == (1, 1)
            continue
        # What is stored (and re-embedded by the final task) is the bounded crop.
        assert stored.size == canvas
        w, h = canvas
        assert f"crop padded from {image.width}x{image.height} to {w}x{h}" in crop.detail
        assert f"detected on the image padded from {image.width}x{image.height}" in crop.detail
    ordinary_image, ordinary_crops = rows[others["ordinary"]]
    assert ordinary_image.state == "analyzed" and all(c.detail is None for c in ordinary_crops)


def test_an_image_detection_fails_on_is_analysed_whole(
    embedded_settings, tiny_models, thin_server, tmp_path, monkeypatch
):
    """The detector raising for one image (alone) no longer fails it with analysis_error: it
    gets one whole-image crop with the reason in the crop's detail; the batch carries on."""
    from models.detector import Detector

    settings = embedded_settings.model_copy(
        update={
            "detector_model": str(tiny_models["detector"]),
            "embedding_model": str(tiny_models["clip"]),
            "device": "cpu",
        }
    )
    urls = {f"p{i}": thin_server.image_url(name) for i, name in enumerate(ORDINARY)}
    assert ingest(write_feed(tmp_path / "feed.csv", urls), settings).status == "done"
    victim = urls["p1"]  # ordinary-1.jpg, the only 280 x 400 image
    real_pixels = Detector._pixels

    def flaky_pixels(self, image, shortest_edge=None):
        if image.size == ORDINARY["ordinary-1.jpg"]:
            raise ValueError("cannot resize this one (simulated)")
        return real_pixels(self, image, shortest_edge)

    monkeypatch.setattr(Detector, "_pixels", flaky_pixels)
    rows = crops_by_url(settings)
    report = analyze_batch(sorted(image.id for image, _ in rows.values()), settings)
    assert (report.analyzed, report.failed) == (3, 0)
    rows = crops_by_url(settings)
    image, (crop,) = rows[victim]
    assert image.state == "analyzed" and crop.whole_image
    assert crop.detail == (
        "detection failed (ValueError: cannot resize this one (simulated)); whole image used"
    )
    for url in (urls["p0"], urls["p2"]):
        image, crops = rows[url]
        assert image.state == "analyzed" and crops and all(c.detail is None for c in crops)


# --- search by upload and by URL ---------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(tmp_path_factory, real_shaped_models, thin_server) -> Settings:
    """The ordinary photos analysed (detector on) and indexed."""
    data_dir = tmp_path_factory.mktemp("geometry-index") / "data"
    settings = model_settings(data_dir, real_shaped_models, last_stage="analyze", finalize="off")
    urls = {f"p{i}": thin_server.image_url(name) for i, name in enumerate(ORDINARY)}
    assert ingest(write_feed(data_dir.parent / "feed.csv", urls), settings).status == "done"
    with session_scope(settings) as session:
        version = session.scalars(
            select(ModelVersion.id).where(ModelVersion.kind == "embedder", ModelVersion.active)
        ).one()
    build_from_database(settings, version, settings.index_dir)
    return settings


def test_search_refuses_thin_queries_and_pads_allowed_ones(indexed, thin_server):
    root = thin_server.root_dir
    assert root is not None
    items = []
    for name in THIN:
        for overrides in ({}, {"min_image_side": 1}):
            items.append(
                {"mode": "search_upload", "path": str(root / "a" / name), "overrides": overrides}
            )
            items.append(
                {
                    "mode": "search_url",
                    "url": thin_server.image_url(f"a/{name}"),
                    "overrides": overrides,
                }
            )
    results = probe(indexed, items)
    peaks: dict[str, float] = {}
    for item, outcome in zip(items, results, strict=True):
        name = Path(item.get("path") or item["url"]).name
        result = outcome["result"]
        assert outcome["peak"] < BOUND, (item, outcome)
        key = f"{item['mode']} {name} {'allowed' if item['overrides'] else 'default'}"
        peaks[key] = round(outcome["peak"] / MiB, 1)
        if not item["overrides"]:
            assert result["error"] == "bad_geometry", (item, result)
            assert "shorter side is 1 px" in result["message"]
            continue
        assert "error" not in result, (item, result)
        (query,) = result["items"]
        assert query["whole_image"] and len(query["results"]) >= 1
        (width, height), _ = THIN[name]
        if (width, height) != (1, 1):
            assert f"padded from {width}x{height}" in query["detail"]
    print("search peaks MiB:", peaks)


def test_search_api_answers_bad_geometry_and_padded_items(indexed, thin_server, monkeypatch):
    root = thin_server.root_dir
    assert root is not None
    data = (root / "a" / "1x8000.jpg").read_bytes()
    with TestClient(create_app(indexed)) as client:
        upload = client.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")})
        assert (upload.status_code, upload.json()["reason"]) == (422, "bad_geometry")
        assert "1x8000 image: its shorter side is 1 px" in upload.json()["detail"]
        by_url = client.post("/search/url", json={"url": thin_server.image_url("a/20001x1.png")})
        assert (by_url.status_code, by_url.json()["reason"]) == (422, "bad_geometry")
    allowed = indexed.model_copy(update={"min_image_side": 1})
    with TestClient(create_app(allowed)) as client:
        upload = client.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")})
        assert upload.status_code == 200, upload.text
        (item,) = upload.json()["items"]
        assert item["whole_image"] and "padded from 1x8000 to 400x8000" in item["detail"]
        by_url = client.post("/search/url", json={"url": thin_server.image_url("a/8000x1.jpg")})
        assert by_url.status_code == 200, by_url.text
        (item,) = by_url.json()["items"]
        assert item["whole_image"] and "padded from 8000x1 to 8000x400" in item["detail"]

        from models.detector import Detector

        def broken(self, image, shortest_edge=None):
            raise RuntimeError("detector broke (simulated)")

        monkeypatch.setattr(Detector, "_pixels", broken)
        photo = (root / "ordinary-0.jpg").read_bytes()
        fallback = client.post("/search/image", files={"file": ("q.jpg", photo, "image/jpeg")})
        assert fallback.status_code == 200, fallback.text
        (item,) = fallback.json()["items"]
        assert item["whole_image"]
        assert item["detail"].startswith("detection failed (RuntimeError: detector broke")
