"""``flickd flower`` against the local broker: refuses to start without credentials, its API
refuses requests without them, and with them lists the running workers and the tasks of an
ingest that ran while it watched."""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flickd.cli import main
from flickd.core.settings import Settings, reset_settings
from producer.ingest import ingest
from synthetic.catalog import write_feed
from synthetic.procs import settings_env, spawn
from synthetic.server import CatalogServer
from tests.conftest import catalog_fixture, celery_worker, wait_for_run
from tests.test_metrics import free_port

pytestmark = pytest.mark.services

AUTH = "ops:s3cret-pass"


catalog = catalog_fixture(6, seed=4)


def flower_get(port: int, path: str, auth: str | None = AUTH) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


@contextmanager
def running_flower(settings: Settings, port: int, log: Path) -> Iterator[None]:
    """``flickd flower`` (the compose service's command), answering HTTP when the block starts."""
    cmd = [sys.executable, "-m", "flickd.cli", "flower", "--port", str(port)]
    with spawn(cmd, settings.model_copy(update={"flower_basic_auth": AUTH}), log, ready=None):
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    tail = log.read_text()[-2000:]
                    raise TimeoutError(f"Flower did not answer:\n{tail}") from None
                time.sleep(0.2)
        yield


def wait_for_tasks(port: int, expected: int, timeout: float = 20) -> dict[str, Any]:
    """Flower's task list once it holds ``expected`` finished tasks (events arrive async)."""
    deadline = time.monotonic() + timeout
    while True:
        status, tasks = flower_get(port, "/api/tasks")
        assert status == 200
        done = {k: t for k, t in tasks.items() if t["state"] == "SUCCESS"}
        if len(done) >= expected or time.monotonic() > deadline:
            return done
        time.sleep(0.3)


def test_flower_requires_credentials_and_shows_workers_and_tasks(pg_settings, catalog, tmp_path):
    port = free_port()
    feed = tmp_path / "feed.csv"
    with (
        CatalogServer(catalog.root / "images") as server,
        running_flower(pg_settings, port, tmp_path / "flower.log"),
        celery_worker(pg_settings, "download", concurrency=1, name="watched@%h"),
    ):
        for auth in (None, "ops:wrong", "someone:s3cret-pass"):
            assert flower_get(port, "/api/workers", auth=auth)[0] == 401, auth

        write_feed(catalog, feed, server.base_url)
        summary = ingest(feed, pg_settings)
        assert wait_for_run(pg_settings, summary.run_id, timeout=60) == "done"

        status, workers = flower_get(port, "/api/workers?refresh=1")
        assert status == 200
        assert [name for name in workers if name.startswith("watched@")], workers
        tasks = wait_for_tasks(port, summary.messages)
    assert len(tasks) == summary.messages
    assert {t["name"] for t in tasks.values()} == {"flickd.download_batch"}
    assert all(t["worker"].startswith("watched@") for t in tasks.values())


def test_flower_refuses_to_start_without_credentials(pg_settings):
    for auth in (None, "nopassword", "a:b,c"):
        reset_settings()
        settings = pg_settings.model_copy(update={"flower_basic_auth": auth})
        env = {k: v for k, v in settings_env(settings).items() if k.startswith("FLICKD_")}
        result = CliRunner().invoke(main, ["flower"], env=env)
        assert result.exit_code != 0, auth
        assert "FLICKD_FLOWER_BASIC_AUTH" in result.output, result.output
    reset_settings()
