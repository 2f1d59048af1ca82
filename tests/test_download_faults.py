"""Every bad image URL the issue names, through the whole path (feed → worker → database):
each ends in one state with the right reason, the good images in the same batches are not lost,
and the worker survives."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from sqlalchemy import func, select

from db.schema import Image, IngestRun
from db.session import session_scope
from flickd.core.settings import Settings
from producer.ingest import ingest
from synthetic.server import CatalogServer
from tests.conftest import catalog_fixture, celery_worker, wait_for_run


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# path -> (state, reason, detail fragment)
CASES: dict[str, tuple[str, str | None, str | None]] = {
    "/fault/404": ("failed", "http_error", "404"),
    "/fault/flaky/{key}/2": ("downloaded", None, None),
    "/fault/500": ("failed", "http_error", "500"),
    "/fault/429/{key}/1": ("downloaded", None, None),
    "/fault/slow?seconds=2.5": ("failed", "timeout", None),
    "/fault/trickle?interval=0.25&seconds=8": ("failed", "timeout", None),
    "/fault/redirect-loop": ("failed", "too_many_redirects", None),
    "/fault/redirect-to?to=http://10.1.2.3/x.jpg": ("failed", "blocked_address", "10.1.2.3"),
    "/fault/redirect-to?to=http://169.254.169.254/latest": ("failed", "blocked_address", None),
    "/fault/huge?bytes=5000000": ("failed", "too_large", None),
    "/fault/html-as-jpeg": ("failed", "not_an_image", None),
    "/fault/truncated": ("failed", "corrupt_image", None),
    "/fault/empty": ("failed", "not_an_image", None),
    "/fault/bomb": ("failed", "decompression_bomb", None),
    "/fault/unsupported": ("failed", "unsupported_format", None),
    "/fault/cmyk": ("downloaded", None, None),
    "/fault/png16": ("downloaded", None, None),
    "/fault/palette": ("downloaded", None, None),
    "/fault/gif": ("downloaded", None, None),
    "/fault/exif": ("downloaded", None, None),
}


catalog = catalog_fixture(6, seed=11)


def _fault_feed(path, server, catalog, key: str) -> dict[str, tuple[str, str | None, str | None]]:
    """Bad URLs interleaved with good ones, so every batch mixes both."""
    expected: dict[str, tuple[str, str | None, str | None]] = {}
    good = [f"{server.base_url}/images/{img.filename}" for img in catalog.images]
    lines = ["product_id,image_url"]
    refused = f"http://127.0.0.1:{_closed_port()}/a.jpg"
    urls = [server.base_url + p.format(key=key) for p in CASES] + [refused]
    outcomes = [*CASES.values(), ("failed", "connection_error", None)]
    for i, (url, outcome) in enumerate(zip(urls, outcomes, strict=True)):
        lines.append(f"bad{i},{url}")
        expected[url] = outcome
        if good:
            g = good.pop()
            lines.append(f"good{i},{g}")
            expected[g] = ("downloaded", None, None)
    lines += [f"rest{i},{g}" for i, g in enumerate(good)]
    expected.update({g: ("downloaded", None, None) for g in good})
    path.write_text("\n".join(lines) + "\n")
    return expected


def _check_outcomes(settings: Settings, expected) -> None:
    with session_scope(settings) as session:
        rows = {img.url: img for img in session.scalars(select(Image))}
        assert set(rows) == set(expected)
        for url, (state, reason, fragment) in expected.items():
            image = rows[url]
            got = (image.state, image.failure_reason)
            assert got == (state, reason), f"{url}: {got} {image.failure_detail}"
            if fragment:
                assert fragment in (image.failure_detail or ""), image.failure_detail
            if state == "downloaded":
                assert image.blob_key and image.width and image.height
        exif = next(img for url, img in rows.items() if url.endswith("/fault/exif"))
        assert exif.height > exif.width  # orientation applied before measuring
        flaky = next(img for url, img in rows.items() if "/fault/flaky/" in url)
        assert flaky.attempts == 3
        forever = next(img for url, img in rows.items() if url.endswith("/fault/500"))
        assert forever.attempts == settings.max_attempts


def test_bad_urls_through_real_worker(pg_settings, catalog, server, tmp_path):
    feed = tmp_path / "faults.csv"
    expected = _fault_feed(feed, server, catalog, key=f"pg{time.time_ns()}")
    with celery_worker(pg_settings, queues="download", concurrency=2) as worker:
        summary = ingest(feed, pg_settings)
        assert wait_for_run(pg_settings, summary.run_id, timeout=120) == "done"
        _check_outcomes(pg_settings, expected)
        assert worker.poll() is None  # nothing crashed the worker
        # …and it still works: a retry of the 404s runs through the same process.
        from db.runs import reset_failed
        from flickd.core.broker import DOWNLOAD_TASK, enqueue

        with session_scope(pg_settings) as session:
            ids = reset_failed(session, summary.run_id, "http_error")
        assert len(ids) == 2
        enqueue(DOWNLOAD_TASK, ids, pg_settings.download_batch_size, pg_settings)
        assert wait_for_run(pg_settings, summary.run_id, timeout=60) == "done"
        assert worker.poll() is None
        with session_scope(pg_settings) as session:
            attempts = dict(session.execute(select(Image.url, Image.attempts)).all())
        assert attempts[server.base_url + "/fault/404"] == 2  # tried again, failed again


def test_bad_urls_embedded(embedded_settings, catalog, server, tmp_path):
    feed = tmp_path / "faults.csv"
    expected = _fault_feed(feed, server, catalog, key=f"emb{time.time_ns()}")
    summary = ingest(feed, embedded_settings)
    assert summary.status == "done"
    _check_outcomes(embedded_settings, expected)


def test_sigkill_mid_batch_loses_nothing(pg_settings, catalog, tmp_path):
    """SIGKILL the worker while it holds a batch; after a restart every image ends terminal,
    once, and nothing is duplicated."""
    settings = pg_settings.model_copy(
        update={
            "visibility_timeout": 6,
            "lease_seconds": 5,
            "task_soft_time_limit": 4,
            "task_time_limit": 5,
            "download_threads": 2,
            "download_batch_size": 6,
            "redelivery_sweep_seconds": 1,
        }
    )
    with CatalogServer(catalog.root / "images", latency=0.4) as slow_server:
        feed = tmp_path / "feed.csv"
        names = [img.filename for img in catalog.images]
        lines = ["product_id,image_url"] + [
            f"p{i},{slow_server.base_url}/images/{names[i % len(names)]}?v={i}" for i in range(36)
        ]
        feed.write_text("\n".join(lines) + "\n")
        with celery_worker(settings, queues="download", concurrency=1) as worker:
            summary = ingest(feed, settings)
            # Wait until the first batch is committed: the worker is then mid-run.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _count_state(settings, "downloaded") < 1:
                time.sleep(0.05)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        pending = _count_state(settings, "queued")
        assert pending > 0, "the kill came too late to prove anything"
        with celery_worker(settings, queues="download", concurrency=1):
            assert wait_for_run(settings, summary.run_id, timeout=90) == "done"
    with session_scope(settings) as session:
        states = dict(
            session.execute(select(Image.state, func.count()).group_by(Image.state)).all()
        )
        urls = session.scalar(select(func.count(func.distinct(Image.url))))
        run = session.get(IngestRun, summary.run_id)
    assert states == {"downloaded": 36}
    assert urls == 36
    assert run.status == "done"


def _count_state(settings: Settings, state: str) -> int:
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(Image).where(Image.state == state))


def test_worker_command_rejects_embedded_mode(tmp_path):
    from tests.conftest import run_flickd, settings_env

    env = settings_env(Settings(data_dir=tmp_path))
    proc = run_flickd("worker", env=env, timeout=60, expect_ok=False)
    assert proc.returncode != 0
    assert "FLICKD_BROKER_URL" in proc.stderr
