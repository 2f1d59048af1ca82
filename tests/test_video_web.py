"""The page's video search in headless Chromium, driven over the DevTools protocol (tests/cdp.py)
as a user would: pick a clip in the file input and watch the page. Against a real ``flickd api``
process and a real gpu worker, on Postgres and Redis."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flickd.core.settings import Settings
from synthetic import video as clips
from synthetic.procs import celery_worker, free_port, spawn
from tests.cdp import Chromium
from tests.conftest import catalog_fixture
from tests.models_fixtures import tiny_models
from tests.test_video_api import shots, video_catalog, with_broker
from tests.test_web_page import CHROMIUM, _wait_healthy

__all__ = ["tiny_models"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (apt-get update && apt-get install -y chromium)",
)

catalog = catalog_fixture(5, seed=8, dirname="video-web-catalog")
INLINE_SECONDS = 3.0


@pytest.fixture(scope="module")
def settings(pg_url, redis_url, tmp_path_factory, tiny_models, catalog) -> Settings:
    data = tmp_path_factory.mktemp("video-web") / "data"
    indexed = video_catalog(pg_url, data, tiny_models, catalog)
    return with_broker(indexed, redis_url, video_inline_seconds=INLINE_SECONDS)


@pytest.fixture(scope="module")
def api_url(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``flickd api`` and a gpu worker, each a process of its own, as deployed."""
    logs = tmp_path_factory.mktemp("video-web-logs")
    port = free_port()
    cmd = [sys.executable, "-m", "flickd.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    with (
        celery_worker(settings, "gpu", concurrency=1, log_path=logs / "gpu.log"),
        spawn(cmd, settings, logs / "api.log", ready=None) as api,
    ):
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, api, logs / "api.log")
        yield url


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("video-web-clips")


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Chromium]:
    assert CHROMIUM is not None
    with Chromium(CHROMIUM, tmp_path / "profile", "--window-size=1280,1000") as chromium:
        yield chromium


CARDS = """JSON.stringify([...document.querySelectorAll('#results article.video-card')].map(c => ({
  product_id: c.dataset.productId, match: c.dataset.match, score: c.dataset.score,
  ranges: c.dataset.timeRanges, thumb: c.querySelector('img').src.slice(0, 22),
  times: c.querySelector('.times').textContent})))"""
STATUS = "document.querySelector('#status').textContent"


def _pick(browser: Chromium, api_url: str, clip: Path) -> None:
    browser.navigate(api_url)
    browser.choose_file("#video-input", clip)


def _cards(browser: Chromium) -> list[dict[str, str]]:
    import json

    return list(json.loads(browser.evaluate(CARDS)))


def _expected_cards(result: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {
            "product_id": p["product_id"],
            "match": p["match"],
            "score": f"{p['score']:.4f}",
            "ranges": ";".join(f"{a:.2f}-{b:.2f}" for a, b in p["time_ranges"]),
            "thumb": "data:image/jpeg;base64",
        }
        for p in result["products"]
    ]


def _without_times(cards: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in card.items() if k != "times"} for card in cards]


def test_a_short_clip_shows_its_products_with_times_and_thumbnails(
    api_url, browser, catalog, clip_dir
):
    clip = clips.make_clip(shots(catalog, 2), clip_dir / "short.mp4", shot_seconds=(1.0, 1.2))
    assert clip.duration_s <= INLINE_SECONDS
    _pick(browser, api_url, clip.path)
    browser.wait_for("document.querySelectorAll('#results article.video-card').length", 60)
    cards = _cards(browser)
    # The page shows what the API answers for this clip (now stored: asked again, at once).
    response = httpx.post(
        f"{api_url}/search/video",
        files={"file": ("short.mp4", clip.path.read_bytes(), "video/mp4")},
        params={"top_k": 10},
        timeout=60,
    )
    assert response.headers["x-flickd-result"] == "stored"
    assert _without_times(cards) == _expected_cards(response.json())
    assert {shot.product_id for shot in clip.shots} & {card["product_id"] for card in cards}
    assert all(card["times"].startswith("0:0") for card in cards)
    assert "product" in browser.evaluate(STATUS)


def test_a_long_clip_is_polled_with_progress_until_its_products_show(
    api_url, browser, catalog, clip_dir
):
    clip = clips.make_clip(shots(catalog, 4), clip_dir / "long.mp4", shot_seconds=(1.5, 2.0))
    assert clip.duration_s > INLINE_SECONDS
    _pick(browser, api_url, clip.path)
    analysing = f"(t => t.includes('Analysing') ? t : '')({STATUS})"
    statuses = [browser.wait_for(analysing, 60)]
    deadline = time.monotonic() + 120
    while not browser.evaluate("document.querySelectorAll('#results article.video-card').length"):
        statuses.append(browser.evaluate(STATUS))
        assert time.monotonic() < deadline, statuses[-1]
        assert "failed" not in statuses[-1], statuses[-1]
        time.sleep(0.1)
    assert any("Analysing the video (job" in status for status in statuses), statuses
    job_id = int(statuses[0].split("(job ", 1)[1].split(",", 1)[0])
    job = httpx.get(f"{api_url}/search/video/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "done"
    assert _without_times(_cards(browser)) == _expected_cards(job["result"])
    assert browser.evaluate("document.querySelector('#video-progress').hidden") is True


def test_a_file_that_is_no_video_shows_the_reason(api_url, browser, tmp_path):
    page = tmp_path / "page.mp4"
    page.write_text("<!doctype html><p>not a clip</p>\n" * 40)
    _pick(browser, api_url, page)
    browser.wait_for("document.querySelector('#status').classList.contains('error')", 30)
    assert "not a video" in browser.evaluate(STATUS)
    assert _cards(browser) == []
