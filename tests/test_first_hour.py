"""The first hour: every configuration or infrastructure mistake a new user makes is answered
in one line that names the problem, with the documented exit code (3: configuration, 4: a
service unreachable), and no traceback unless asked for; a broken model path fails before
anything is downloaded; `flickd doctor` says what is wrong."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from flickd.core.settings import Settings
from synthetic.procs import ROOT
from synthetic.server import CatalogServer
from tests.conftest import PG_ADMIN_URL, catalog_fixture
from tests.models_fixtures import tiny_models

catalog = catalog_fixture(2, seed=3)

EXIT_CONFIG, EXIT_UNAVAILABLE = 3, 4


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A user's shell: no FLICKD_* but those given (as a user sets them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLICKD_")}
    env["FLICKD_DATA_DIR"] = str(tmp_path / "data")
    env.update({f"FLICKD_{k.upper()}": v for k, v in settings.items()})
    return env


def _flickd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flickd.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line(out: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == code, out.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def empty_database() -> str:
    """A Postgres database that exists but was never upgraded."""
    name = f"flickd_empty_{uuid.uuid4().hex[:8]}"
    admin = PG_ADMIN_URL.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0].replace("+psycopg", "") + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_database_url_that_is_not_one(tmp_path):
    out = _flickd(_env(tmp_path, database_url="not a url"), "status")
    _one_line(out, EXIT_CONFIG, "FLICKD_DATABASE_URL is not a database URL")


@pytest.mark.services
def test_an_unreachable_postgres_and_a_missing_database(tmp_path, pg_url):
    closed = f"postgresql://postgres@127.0.0.1:{_closed_port()}/flickd"
    out = _flickd(_env(tmp_path, database_url=closed), "status")
    _one_line(out, EXIT_UNAVAILABLE, "cannot reach the database", "Connection refused")
    missing = pg_url.rsplit("/", 1)[0].replace("+psycopg", "") + "/no_such_db"
    out = _flickd(_env(tmp_path, database_url=missing), "status")
    _one_line(out, EXIT_CONFIG, "'no_such_db', which does not exist", "flickd db upgrade")


@pytest.mark.services
def test_a_database_never_upgraded(tmp_path, empty_database):
    out = _flickd(_env(tmp_path, database_url=empty_database), "status")
    _one_line(out, EXIT_CONFIG, "has no flickd schema", "run `flickd db upgrade`")


@pytest.mark.services
def test_redis_unreachable(tmp_path, pg_url, catalog):
    env = _env(
        tmp_path,
        database_url=pg_url.replace("+psycopg", ""),
        broker_url=f"redis://127.0.0.1:{_closed_port()}/0",
    )
    feed = tmp_path / "feed.csv"
    feed.write_text("product_id,image_url\np1,http://example.com/a.jpg\n")
    for command in (["ingest", str(feed)], ["worker", "-Q", "download"], ["pause"]):
        out = _flickd(env, *command)
        _one_line(out, EXIT_UNAVAILABLE, "cannot reach the broker", "FLICKD_BROKER_URL")
    # status needs no broker: it answers from the database, and says nothing of Redis.
    out = _flickd(env, "status")
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("{tmp}/no-such-dir", "does not exist"),
        ("{tmp}/empty-dir", "not a model directory (no config.json)"),
        ("openai/clip-vit-base-patch32", "is a Hugging Face hub id, not in the local cache"),
    ],
)
def test_a_broken_model_fails_ingest_before_any_download(tmp_path, catalog, model, fragment):
    (tmp_path / "empty-dir").mkdir()
    env = _env(tmp_path, detector_model="none", allowed_networks="127.0.0.0/8")
    env["FLICKD_EMBEDDING_MODEL"] = model.format(tmp=tmp_path)
    env["HF_HUB_OFFLINE"] = "1"
    with CatalogServer(catalog.root / "images") as server:
        feed = tmp_path / "feed.csv"
        image = catalog.images[0].filename
        feed.write_text(f"product_id,image_url\np1,{server.base_url}/images/{image}\n")
        out = _flickd(env, "ingest", str(feed))
        line = _one_line(out, EXIT_CONFIG, "FLICKD_EMBEDDING_MODEL", fragment)
        assert "flickd models build DIR" in line
        assert server.hits(f"/images/{image}") == 0  # refused before the first download


def test_a_gpu_worker_with_a_broken_model_refuses_to_start(tmp_path):
    env = _env(
        tmp_path,
        broker_url="redis://127.0.0.1:6379/0",
        detector_model="none",
        embedding_model=str(tmp_path / "missing"),
    )
    out = _flickd(env, "worker", "-Q", "gpu")
    _one_line(out, EXIT_CONFIG, "FLICKD_EMBEDDING_MODEL", "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    out = _flickd(_env(tmp_path, database_url="not a url"), "--debug", "status")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_doctor_checks_everything_and_says_what_to_fix(tmp_path, tiny_models):
    env = _env(
        tmp_path,
        detector_model=str(tiny_models["detector"]),
        embedding_model=str(tiny_models["clip"]),
    )
    out = _flickd(env, "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    names = {line.split()[1]: line.split()[0] for line in out.stdout.splitlines()}
    assert {k: names.get(k) for k in ("database", "broker", "storage", "detector", "embedder")} == {
        k: "ok" for k in ("database", "broker", "storage", "detector", "embedder")
    }
    assert "loads and runs" in out.stdout and "disk" in names
    env["FLICKD_EMBEDDING_MODEL"] = str(tmp_path / "gone")
    out = _flickd(env, "doctor")
    assert out.returncode == EXIT_CONFIG
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and "embedder" in failed[0] and "flickd models build" in failed[0]


def test_metrics_answer_with_and_without_the_slash(tmp_path):
    from db.migrate import upgrade
    from flickd.services.api import create_app

    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings)
    with TestClient(create_app(settings), follow_redirects=False) as client:
        for path in ("/metrics", "/metrics/"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert "flickd_images" in response.text


def test_the_readme_names_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [f"FLICKD_{name.upper()}" for name in Settings.model_fields]
    assert [name for name in missing if f"`{name}`" not in readme] == []
