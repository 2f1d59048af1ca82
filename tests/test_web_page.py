"""The search page in headless Chromium, against a real ``flickd api`` process on loopback.

Chromium runs the page's JavaScript: ``/?q=…`` searches on load, and ``--dump-dom`` prints the
DOM after the fetches completed (``--virtual-time-budget``). Install on Debian/Ubuntu with
``apt-get update && apt-get install -y chromium``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import pytest

from flickd.core.settings import Settings
from flickd.services.search import SearchService
from synthetic.procs import ROOT, settings_env, stop_process_group
from synthetic.server import CatalogServer
from tests.cdp import HEADLESS_ARGS
from tests.conftest import catalog_fixture
from tests.models_fixtures import tiny_models
from tests.test_search_api import build_index, ingest_products, vision_settings

CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (apt-get update && apt-get install -y chromium)",
)


catalog = catalog_fixture(8, seed=3, dirname="web-catalog")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_models, catalog) -> Settings:
    settings = vision_settings(tmp_path_factory.mktemp("web") / "data", tiny_models, False)
    with CatalogServer(catalog.root / "images") as server:
        ingest_products(settings, catalog, server, len(catalog.products))
    build_index(settings)
    return settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def api_url(indexed: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``flickd api`` as its own process, exactly as deployed."""
    port = _free_port()
    log = tmp_path_factory.mktemp("api-log") / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flickd.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            env=settings_env(indexed),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        stop_process_group(proc)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flickd api exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"flickd api not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _chromium(tmp_path: Path, *args: str) -> str:
    command = [
        str(CHROMIUM),
        *HEADLESS_ARGS,
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000",  # virtual time waits for the page's fetches
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


class _Cards(HTMLParser):
    """Result cards (product id, score, match) and the status line of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, str]] = []
        self.status = ""
        self.status_classes = ""
        self._in_status = False
        self._in_template = 0  # the card <template> is markup, not a rendered result

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        classes = attributes.get("class", "").split()
        self._in_template += tag == "template"
        if tag == "article" and "result-card" in classes and not self._in_template:
            self.cards.append(attributes)
        if attributes.get("id") == "status":
            self._in_status = True
            self.status_classes = attributes.get("class", "")

    def handle_endtag(self, tag: str) -> None:
        self._in_template -= tag == "template"
        if tag == "p":
            self._in_status = False

    def handle_data(self, data: str) -> None:
        if self._in_status:
            self.status += data


def _dump(tmp_path: Path, url: str) -> _Cards:
    parser = _Cards()
    parser.feed(_chromium(tmp_path, "--dump-dom", url))
    return parser


def test_text_query_in_the_url_renders_the_gallery(api_url, indexed, tmp_path):
    page = _dump(tmp_path, f"{api_url}/?q={quote_plus('a red dress')}&k=5")
    expected = SearchService(indexed).search_text("a red dress", 5).items[0].results
    assert [card["data-product-id"] for card in page.cards] == [h.product_id for h in expected]
    assert [card["data-score"] for card in page.cards] == [f"{h.score:.4f}" for h in expected]
    assert [card["data-match"] for card in page.cards] == [h.match.value for h in expected]
    assert "5 results" in page.status


def test_a_refused_url_shows_the_reason(api_url, tmp_path):
    page = _dump(tmp_path, f"{api_url}/?url={quote_plus('http://10.0.0.7/dress.jpg')}")
    assert page.cards == []
    assert "error" in page.status_classes
    assert "not a public address" in page.status


def test_screenshot_of_results(api_url, tmp_path):
    """A PNG of the rendered page, kept under tmp_path for a human look."""
    shot = tmp_path / "search.png"
    _chromium(
        tmp_path,
        f"--screenshot={shot}",
        "--window-size=1280,1000",
        "--hide-scrollbars",
        f"{api_url}/?q=a+blue+shirt&k=8",
    )
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # more than a blank page


def test_filters_in_the_url_filter_the_gallery_and_bad_ones_say_why(api_url, indexed, tmp_path):
    from flickd.services.filters import make_filter

    everything = SearchService(indexed).search_text("a dress", 8).items[0].results
    colour = everything[0].colour_family
    assert colour
    page = _dump(tmp_path, f"{api_url}/?q={quote_plus('a dress')}&k=8&colour={colour}")
    wanted = make_filter(colour=colour)
    expected = SearchService(indexed).search_text("a dress", 8, wanted).items[0].results
    assert [card["data-product-id"] for card in page.cards] == [h.product_id for h in expected]
    assert {card["data-colour-family"] for card in page.cards} == {colour}
    page = _dump(tmp_path, f"{api_url}/?q={quote_plus('a dress')}&colour=pumpkin")
    assert page.cards == [] and "error" in page.status_classes
    assert "use one of: black, white" in page.status
