"""Shared fixtures: a fresh Postgres database and Redis db per test session, real Celery worker
processes, settings for embedded (SQLite) and distributed (Postgres + Redis) modes, and a
module's small synthetic catalog with its loopback image server."""

from __future__ import annotations

import os

# One OpenMP thread per process (this one and every child a test starts inherits it), unless
# the caller set another count. The tests' models are tiny: their ops take microseconds, and
# on a small, busy box OpenMP's thread hand-offs cost more than the ops themselves (see
# tests.models_fixtures.torch_single_thread); a test run starts several such processes at once
# on two cores. Set before anything imports torch or faiss, which read it when they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from db.migrate import upgrade
from db.runs import wait_for_run
from db.session import dispose_engines
from flickd.core.settings import Settings, reset_settings
from synthetic.catalog import Catalog, generate_catalog
from synthetic.procs import ROOT, celery_worker, settings_env, stop_process_group
from synthetic.server import CatalogServer

__all__ = [
    "ROOT",
    "catalog_fixture",
    "celery_worker",
    "run_flickd",
    "settings_env",
    "stop_process_group",
    "wait_for_run",
    "wait_until",
]

PG_ADMIN_URL = os.environ.get(
    "FLICKD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE = os.environ.get("FLICKD_TEST_REDIS", "redis://127.0.0.1:6379")

# Tests must never reach the network beyond loopback, nor a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FLICKD_ENV_KEYS = [
    k for k in os.environ if k.startswith("FLICKD_") and not k.startswith("FLICKD_TEST")
]
for _key in FLICKD_ENV_KEYS:  # a developer's own settings must not leak into tests
    del os.environ[_key]


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


def _redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_BASE, socket_connect_timeout=3).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh Postgres database, migrated to head, dropped at the end."""
    if not _pg_available():
        pytest.fail("Postgres is not reachable at 127.0.0.1:5432 (start it: see .ci/run)")
    import psycopg

    name = f"flickd_test_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN_URL.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    upgrade(Settings(database_url=url))
    yield url
    dispose_engines()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Every key a test session writes starts with this prefix (each test adds its own part), so
# concurrent sessions on one Redis never touch each other's messages.
SESSION_PREFIX = f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database of the shared server; the session's keys are removed at the end."""
    if not _redis_available():
        pytest.fail("Redis is not reachable at 127.0.0.1:6379 (start it: see .ci/run)")
    import redis

    url = f"{REDIS_BASE}/{1 + (os.getpid() % 14)}"
    yield url
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{SESSION_PREFIX}*", count=1000):
        client.delete(key)


def _truncate_all(url: str) -> None:
    from sqlalchemy import text

    from db.schema import Base
    from db.session import get_engine

    engine = get_engine(Settings(database_url=url))
    tables = ", ".join(t.name for t in reversed(Base.metadata.sorted_tables))
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture()
def pg_settings(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Distributed-mode settings against the session's Postgres and Redis, clean tables."""
    _truncate_all(pg_url)
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_url,
        # A fresh key prefix per test: it starts with an empty broker of its own.
        broker_prefix=f"{SESSION_PREFIX}{uuid.uuid4().hex[:8]}:",
        data_dir=tmp_path / "data",
        allowed_networks=["127.0.0.0/8"],
        **FAST_DOWNLOADS,
    )
    yield settings


@pytest.fixture()
def embedded_settings(tmp_path: Path) -> Iterator[Settings]:
    """Embedded-mode settings: SQLite under tmp_path, tasks in-process."""
    settings = Settings(
        data_dir=tmp_path / "data", allowed_networks=["127.0.0.0/8"], **FAST_DOWNLOADS
    )
    upgrade(settings)
    yield settings


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.02
) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def catalog_fixture(
    n_products: int, *, seed: int, dirname: str = "catalog"
) -> Callable[..., Catalog]:
    """A module-scoped fixture: a small synthetic catalog of ``n_products`` from ``seed``,
    generated once per module under a temporary folder named ``dirname``. Each module states
    its own, under the fixture name it assigns it to::

        catalog = catalog_fixture(6, seed=11)

    The :func:`server` fixture serves whichever ``catalog`` the module has."""

    @pytest.fixture(scope="module")
    def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
        root = tmp_path_factory.mktemp(dirname)
        return generate_catalog(root, n_products, seed=seed, size="small")

    return catalog


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[CatalogServer]:
    """The module's ``catalog`` images on a loopback server, at ``{base_url}/images/...``."""
    with CatalogServer(catalog.root / "images") as srv:
        yield srv


# Short timeouts and backoff so failure paths finish in a test's time.
FAST_DOWNLOADS = {
    "connect_timeout": 1.0,
    "read_timeout": 1.0,
    "download_deadline": 3.0,
    "backoff_base": 0.05,
    "backoff_max": 0.3,
    "max_retry_after": 2.0,
    "max_download_bytes": 2 * 1024 * 1024,
    "download_batch_size": 8,
    "download_threads": 8,
    "last_stage": "download",
}


def run_flickd(
    *args: str, env: dict[str, str], timeout: float = 300, expect_ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the `flickd` command line as a user would, in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-m", "flickd.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(autouse=True)
def _fresh_settings_cache() -> Iterator[None]:
    reset_settings()
    yield
    reset_settings()


@pytest.fixture()
def connections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Hosts urllib3 opened sockets to during the test (the fetch tests: was a connection
    opened at all, and to which address)."""
    opened: list[str] = []
    real = urllib3.util.connection.create_connection

    def spy(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        opened.append(address[0])
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", spy)
    return opened
