"""fetch() against the real loopback CatalogServer: retries, limits, redirects, the guard."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import urllib3.util.connection

from flickd.core.reasons import FailureReason, ImageFailure
from flickd.fetching.fetch import (
    HttpClient,
    backoff_delay,
    fetch,
    make_session,
    parse_retry_after,
)
from flickd.fetching.imaging import decode_image
from synthetic import faults
from synthetic.server import CatalogServer
from tests.conftest_download import SleepRecorder, make_settings

CATALOG_JPEG = faults.jpeg((10, 120, 200), (40, 30))


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalog")
    (root / "shoes").mkdir()
    (root / "shoes" / "red sneaker.jpg").write_bytes(CATALOG_JPEG)
    (root.parent / "secret.txt").write_text("outside the catalog")
    return root


@pytest.fixture(scope="module")
def server(catalog_dir: Path) -> Iterator[CatalogServer]:
    with CatalogServer(catalog_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def settings() -> Any:
    return make_settings()


@pytest.fixture(scope="module")
def session(settings: Any) -> Iterator[HttpClient]:
    with make_session(settings) as s:
        yield s


def _fail(url: str, session: HttpClient, settings: Any, **kw: Any) -> ImageFailure:
    with pytest.raises(ImageFailure) as info:
        fetch(url, session, settings, **kw)
    return info.value


# --- success ---------------------------------------------------------------------------------


def test_fetches_a_catalog_file(server: CatalogServer, session, settings) -> None:
    url = server.image_url("shoes/red sneaker.jpg")
    result = fetch(url, session, settings)
    assert result.content == CATALOG_JPEG
    assert (result.status, result.content_type, result.attempts) == (200, "image/jpeg", 1)
    assert result.final_url == url


def test_keep_alive_reuses_one_connection(server: CatalogServer, settings) -> None:
    with make_session(settings) as session:
        url = server.url("fault/jpeg")
        for _ in range(3):
            fetch(url, session, settings)
        # RecentlyUsedContainer refuses plain iteration; keys() is its API.
        pools = [session.pools[key] for key in session.pools.keys()]  # noqa: SIM118
        assert len(pools) == 1
        assert pools[0].num_connections == 1  # sockets opened: one, used three times


def test_sends_user_agent_and_image_accept_and_ignores_env_proxy(
    server: CatalogServer, settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy from the environment would make the guard check the proxy, not the host.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with make_session(settings) as session:
        echoed = fetch(server.url("fault/headers"), session, settings).content.decode()
    assert f"User-Agent: {settings.user_agent}" in echoed
    assert "image/webp" in echoed and "avif" not in echoed


def test_concurrent_fetches_share_one_session(server: CatalogServer, session, settings) -> None:
    urls = [server.url(f"fault/flaky/concurrent-{i}/1") for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda u: fetch(u, session, settings), urls))
    assert all(r.attempts == 2 and r.content == faults.jpeg() for r in results)


# --- HTTP errors and retries -----------------------------------------------------------------


def test_404_is_final(server: CatalogServer, session, settings) -> None:
    sleep = SleepRecorder()
    failure = _fail(server.url("fault/404"), session, settings, sleep=sleep)
    assert (failure.reason, failure.detail, failure.retryable) == (
        FailureReason.HTTP_ERROR,
        "HTTP 404",
        False,
    )
    assert failure.attempts == 1  # type: ignore[attr-defined]
    assert sleep.delays == []


def test_500_recovers_on_retry(server: CatalogServer, session, settings) -> None:
    sleep = SleepRecorder()
    result = fetch(server.url("fault/flaky/recover/2"), session, settings, sleep=sleep)
    assert result.attempts == 3
    assert server.hits("fault/flaky/recover/2") == 3
    # Full jitter under an exponential ceiling: base, then 2 x base.
    assert len(sleep.delays) == 2
    assert 0 <= sleep.delays[0] <= 0.01 and 0 <= sleep.delays[1] <= 0.02


def test_500_forever_gives_up_after_max_attempts(server: CatalogServer, session) -> None:
    settings = make_settings(max_attempts=4)
    before = server.hits("fault/500")
    sleep = SleepRecorder()
    failure = _fail(server.url("fault/500"), session, settings, sleep=sleep)
    assert failure.reason is FailureReason.HTTP_ERROR
    assert failure.detail == "HTTP 500 after 4 attempts"
    assert failure.attempts == 4  # type: ignore[attr-defined]
    assert server.hits("fault/500") - before == 4
    assert len(sleep.delays) == 3


def test_429_honours_retry_after_seconds(server: CatalogServer, session, settings) -> None:
    sleep = SleepRecorder()
    result = fetch(server.url("fault/429/seconds/1.5"), session, settings, sleep=sleep)
    assert result.attempts == 2
    assert sleep.delays == [1.5]  # the server's floor beats a jitter of at most 0.01 s


def test_429_retry_after_is_capped(server: CatalogServer, session, settings) -> None:
    sleep = SleepRecorder()
    fetch(server.url("fault/429/capped/3600"), session, settings, sleep=sleep)
    assert sleep.delays == [settings.max_retry_after]


def test_429_retry_after_http_date(server: CatalogServer, session) -> None:
    settings = make_settings(max_retry_after=120)
    sleep = SleepRecorder()
    fetch(server.url("fault/429/date/30?date=1"), session, settings, sleep=sleep)
    assert len(sleep.delays) == 1 and 28 <= sleep.delays[0] <= 31  # HTTP-dates have 1 s steps


def test_429_real_sleep_waits(server: CatalogServer, session, settings) -> None:
    started = time.monotonic()
    fetch(server.url("fault/429/measured/0.3"), session, settings)
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0.25", 0.25),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(value, now=lambda: now) == expected


def test_backoff_ceiling_doubles_then_caps() -> None:
    settings = make_settings(backoff_base=0.5, backoff_max=8.0, max_retry_after=30.0)
    top = [backoff_delay(n, settings, rand=lambda: 1.0) for n in range(1, 8)]
    assert top == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff_delay(3, settings, rand=lambda: 0.0) == 0.0
    assert backoff_delay(1, settings, retry_after=5.0, rand=lambda: 0.5) == 5.0
    assert backoff_delay(1, settings, retry_after=500.0, rand=lambda: 0.5) == 30.0


# --- time limits -----------------------------------------------------------------------------


def test_read_timeout_is_retried_then_reported(server: CatalogServer, session) -> None:
    settings = make_settings(read_timeout=0.3, max_attempts=2)
    path = "fault/slow?seconds=3"
    before = server.hits(path)
    failure = _fail(server.url(path), session, settings)
    assert failure.reason is FailureReason.TIMEOUT
    assert "read timeout" in failure.detail and failure.detail.endswith("after 2 attempts")
    assert server.hits(path) - before == 2


def test_trickle_past_deadline_times_out(server: CatalogServer, session) -> None:
    # A byte every 50 ms never trips the 0.5 s read timeout; only the deadline stops it.
    settings = make_settings(download_deadline=1.0)
    path = "fault/trickle?interval=0.05&seconds=10"
    before = server.hits(path)
    started = time.monotonic()
    failure = _fail(server.url(path), session, settings)
    elapsed = time.monotonic() - started
    assert failure.reason is FailureReason.TIMEOUT
    assert "not complete within 1s" in failure.detail
    assert 1.0 <= elapsed < 2.0
    assert server.hits(path) - before == 1  # a spent deadline is not retried


# --- connection failures ---------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_refused(session, settings) -> None:
    sleep = SleepRecorder()
    failure = _fail(f"http://127.0.0.1:{_closed_port()}/x.jpg", session, settings, sleep=sleep)
    assert failure.reason is FailureReason.CONNECTION_ERROR
    assert "refused" in failure.detail.lower()
    assert failure.detail.endswith(f"after {settings.max_attempts} attempts")
    assert len(sleep.delays) == settings.max_attempts - 1


@pytest.mark.parametrize("route", ["fault/reset", "fault/short"])
def test_dropped_connections_are_retried(
    server: CatalogServer, session, settings, route: str
) -> None:
    before = server.hits(route)
    failure = _fail(server.url(route), session, settings, sleep=SleepRecorder())
    assert failure.reason is FailureReason.CONNECTION_ERROR
    assert server.hits(route) - before == settings.max_attempts


def test_invalid_url_is_not_retried(session, settings) -> None:
    failure = _fail("ftp://127.0.0.1/x.jpg", session, settings)
    assert failure.reason is FailureReason.INVALID_URL
    assert failure.attempts == 1  # type: ignore[attr-defined]


# --- redirects -------------------------------------------------------------------------------


def test_redirect_chain_within_limit(server: CatalogServer, session, settings) -> None:
    result = fetch(server.url("fault/redirect-chain/3"), session, settings)
    assert result.final_url.endswith("/fault/redirect-chain/0")
    assert result.content == faults.jpeg()


def test_too_many_redirects(server: CatalogServer, session, settings) -> None:
    before = [server.hits(f"fault/redirect-chain/{n}") for n in (1, 0)]
    failure = _fail(server.url("fault/redirect-chain/4"), session, settings)
    assert failure.reason is FailureReason.TOO_MANY_REDIRECTS
    assert "more than 3" in failure.detail
    after = [server.hits(f"fault/redirect-chain/{n}") for n in (1, 0)]
    assert after == [before[0] + 1, before[1]]  # followed 3 hops, refused the 4th


def test_redirect_loop(server: CatalogServer, session, settings) -> None:
    failure = _fail(server.url("fault/redirect-loop"), session, settings)
    assert failure.reason is FailureReason.TOO_MANY_REDIRECTS
    assert "loop" in failure.detail
    assert failure.attempts == 1  # type: ignore[attr-defined]


def test_relative_redirect(server: CatalogServer, session, settings) -> None:
    result = fetch(server.url("fault/redirect-to?to=/fault/jpeg&status=307"), session, settings)
    assert result.final_url == server.url("fault/jpeg")


@pytest.mark.parametrize(
    ("target", "address"),
    [
        ("http://10.0.0.1/x.jpg", "10.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://0x0a000001/x.jpg", "10.0.0.1"),
        ("http://[::1]/x.jpg", "::1"),
        ("https://192.168.1.1/x.jpg", "192.168.1.1"),
    ],
)
def test_redirect_to_internal_address_is_refused_before_connecting(
    server: CatalogServer, session, settings, connections: list[str], target: str, address: str
) -> None:
    url = server.url(f"fault/redirect-to?to={target}")
    failure = _fail(url, session, settings)
    assert failure.reason is FailureReason.BLOCKED_ADDRESS
    assert address in failure.detail
    assert failure.attempts == 1  # type: ignore[attr-defined]
    assert all(host == "127.0.0.1" for host in connections)  # only ever the test server


def test_redirect_to_other_scheme_is_invalid(server: CatalogServer, session, settings) -> None:
    failure = _fail(server.url("fault/redirect-to?to=file:///etc/passwd"), session, settings)
    assert failure.reason is FailureReason.INVALID_URL


# --- size limits -----------------------------------------------------------------------------


def test_streamed_body_over_cap(server: CatalogServer, session, settings) -> None:
    failure = _fail(server.url("fault/huge?bytes=2000000"), session, settings)
    assert failure.reason is FailureReason.TOO_LARGE
    assert "body exceeds" in failure.detail
    assert failure.attempts == 1  # type: ignore[attr-defined]


def test_declared_length_over_cap_is_refused_without_reading(
    server: CatalogServer, session, settings
) -> None:
    # The server sends 1 KiB and then stalls for 5 s: only an early refusal is quick.
    started = time.monotonic()
    failure = _fail(server.url("fault/huge?declare=1&hold=5"), session, settings)
    assert failure.reason is FailureReason.TOO_LARGE
    assert "Content-Length" in failure.detail
    assert time.monotonic() - started < 0.4


def test_gzip_bomb_counts_decoded_bytes(server: CatalogServer, session, settings) -> None:
    failure = _fail(server.url("fault/gzip-bomb?bytes=5000000"), session, settings)
    assert failure.reason is FailureReason.TOO_LARGE


def test_body_at_cap_is_accepted(server: CatalogServer, session) -> None:
    settings = make_settings(max_download_bytes=len(faults.jpeg()))
    assert fetch(server.url("fault/jpeg"), session, settings).content == faults.jpeg()


# --- fault routes end to end (fetch, then decode) --------------------------------------------


@pytest.mark.parametrize(
    ("route", "reason", "detail"),
    [
        ("empty", FailureReason.NOT_AN_IMAGE, "empty body"),
        ("html-as-jpeg", FailureReason.NOT_AN_IMAGE, "looks like HTML"),
        ("truncated", FailureReason.CORRUPT_IMAGE, "truncated"),
        ("bomb", FailureReason.DECOMPRESSION_BOMB, "pixels"),
        ("unsupported", FailureReason.UNSUPPORTED_FORMAT, "ICO"),
        ("pdf", FailureReason.UNSUPPORTED_FORMAT, "PDF"),
    ],
)
def test_fault_images_end_with_their_reason(
    server: CatalogServer, session, settings, route: str, reason: FailureReason, detail: str
) -> None:
    fetched = fetch(server.url(f"fault/{route}"), session, settings)
    assert fetched.status == 200
    with pytest.raises(ImageFailure) as info:
        decode_image(fetched.content, settings.max_image_pixels)
    assert info.value.reason is reason
    assert detail in info.value.detail


@pytest.mark.parametrize(
    ("route", "size"),
    [("cmyk", (32, 32)), ("png16", (16, 16)), ("palette", (32, 32)), ("gif", (16, 16)),
     ("webp", (16, 16)), ("exif", (40, 60))],
)  # fmt: skip
def test_odd_but_valid_images_decode(
    server: CatalogServer, session, settings, route: str, size: tuple[int, int]
) -> None:
    fetched = fetch(server.url(f"fault/{route}"), session, settings)
    decoded = decode_image(fetched.content, settings.max_image_pixels)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == size


# --- the server itself -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_path",
    [
        "/images/../secret.txt",
        "/images/%2e%2e/secret.txt",
        "/images/shoes/../../secret.txt",
        "/images//etc/passwd",
        "/images/%2fetc%2fpasswd",
    ],
)
def test_server_refuses_path_traversal(server: CatalogServer, raw_path: str) -> None:
    # http.client sends the path verbatim; an HTTP client library would normalise the dots.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        assert response.status == 404
        assert b"outside the catalog" not in response.read()
    finally:
        conn.close()


def test_server_latency_is_adjustable(server: CatalogServer, session, settings) -> None:
    server.latency = 0.2
    try:
        started = time.monotonic()
        fetch(server.url("fault/jpeg"), session, settings)
        assert time.monotonic() - started >= 0.2
    finally:
        server.latency = 0.0


def test_server_hit_counts_are_thread_safe(catalog_dir: Path) -> None:
    with CatalogServer(catalog_dir) as srv:
        url = srv.image_url("shoes/red sneaker.jpg")

        def get() -> int:
            with urllib3.PoolManager() as pool:
                return sum(pool.request("GET", url, timeout=5).status == 200 for _ in range(10))

        threads_ok: list[int] = []
        workers = [threading.Thread(target=lambda: threads_ok.append(get())) for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert sum(threads_ok) == 80
        assert srv.hits("images/shoes/red sneaker.jpg") == 80
