"""Run flickd's real image paths in a process of their own and measure each one's peak memory.

``python -m tests.geometry_probe`` reads a JSON job on stdin, ``{"items": [...]}``, and prints a
JSON list of ``{"result": ..., "peak": bytes}`` as its last line. Settings come from the
environment (``synthetic.procs.settings_env``); an item's ``overrides`` are applied on top.
Item modes:

- ``download`` (``url``): ``workers.download.download_one``, the download stage's own function;
- ``analyze`` (``ids``): ``workers.vision.analyze_batch`` on images in ``downloaded`` state;
- ``search_upload`` (``path``, ``detect``): ``decode_query_image`` + ``SearchService.search_image``,
  what ``POST /search/image`` does; ``search_url`` (``url``, ``detect``): ``fetch_image`` +
  ``search_image``, what ``POST /search/url`` does;
- ``raw`` (``path``): the embedder's image processor on the decoded image with no guard (what
  flickd did before), to show what the measurement sees without the guard; ``guarded``
  (``path``): the same after ``bounded_geometry`` with the embedder's resize rule.

The peak is the process's resident high-water mark (``VmHWM``), reset (``clear_refs``) just
before the item runs, minus its resident size at that moment: the bytes the path allocated.
Models are loaded and run once on an ordinary image first, so loading is not counted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from flickd.core.settings import Settings, get_settings


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measured(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the bytes of resident memory it added at its peak."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_bytes("VmRSS")
    result = fn()
    return result, _status_bytes("VmHWM") - before


def _ordinary() -> Image.Image:
    from tests.models_fixtures import garment_image

    return garment_image((30, 60, 160), (235, 235, 230), (300, 400))


_warm: set[tuple[str, str]] = set()


def _warm_up(mode: str, settings: Settings) -> None:
    key = (mode, str(settings.data_dir))
    if key in _warm:
        return
    _warm.add(key)
    from models import registry

    if mode in ("analyze", "raw", "guarded"):
        from workers.vision import embedder_name

        detector = registry.get_detector(settings)
        if detector is not None:
            detector.detect([_ordinary()])
        registry.get_embedder_by_name(embedder_name(settings), settings).embed_images([_ordinary()])
    elif mode.startswith("search"):
        _service(settings).search_image(_ordinary(), top_k=3)


_services: dict[str, Any] = {}


def _service(settings: Settings) -> Any:
    from flickd.services.search import SearchService

    key = str(settings.data_dir)
    if key not in _services:
        _services[key] = SearchService(settings)
    _services[key].settings = settings  # the item's overrides apply to its query
    return _services[key]


def _search(settings: Settings, item: dict[str, Any]) -> dict[str, Any]:
    from flickd.services.search import QueryImageError, decode_query_image

    service = _service(settings)
    try:
        if item["mode"] == "search_url":
            image = service.fetch_image(item["url"])
        else:
            image = decode_query_image(Path(item["path"]).read_bytes(), settings)
        response = service.search_image(image, top_k=3, detect=item.get("detect", True))
    except QueryImageError as exc:
        return {"error": exc.reason, "message": exc.message}
    return dict(response.model_dump(mode="json"))


def run(settings: Settings, item: dict[str, Any]) -> Any:
    mode = item["mode"]
    if mode == "download":
        from flickd.core.blobstore import BlobStore
        from flickd.fetching.fetch import make_session
        from workers.download import download_one

        outcome = download_one(
            0, None, item["url"], settings, make_session(settings), BlobStore(settings.blob_dir)
        )
        return {
            "reason": outcome.reason.value if outcome.reason else None,
            "detail": outcome.detail,
            "width": outcome.width,
            "height": outcome.height,
        }
    if mode == "analyze":
        from workers.vision import analyze_batch

        report = analyze_batch(item["ids"], settings)
        return {"analyzed": report.analyzed, "failed": report.failed, "crops": report.crops}
    if mode in ("search_upload", "search_url"):
        return _search(settings, item)
    if mode in ("raw", "guarded"):
        from flickd.fetching.geometry import GeometryLimits, bounded_geometry
        from flickd.fetching.imaging import decode_image
        from models import registry
        from workers.vision import embedder_name

        image = decode_image(Path(item["path"]).read_bytes(), settings.max_image_pixels).image
        embedder = registry.get_embedder_by_name(embedder_name(settings), settings)
        if mode == "guarded":
            limits = GeometryLimits.from_settings(settings, [embedder.resize_rule])
            image = bounded_geometry(image, limits).image
        pixels = embedder.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        return {"shape": list(pixels.shape)}
    raise ValueError(f"unknown mode {mode!r}")


def main() -> None:
    job = json.load(sys.stdin)
    base = get_settings()
    results = []
    for item in job["items"]:
        settings = base.model_copy(update=item.get("overrides", {}))
        if item["mode"] != "download":
            _warm_up(item["mode"], settings)
        result, peak = measured(lambda: run(settings, item))  # noqa: B023 - called at once
        results.append({"result": result, "peak": peak})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
