"""The whole pipeline shared-nothing: a download worker, a gpu worker (which runs the final
task) and two API processes, each with its own empty local directory, sharing only Postgres,
Redis and the storage: an S3-compatible server process (moto), or a file:// directory.

An ingest reaches done; the index the gpu worker builds is served by both API processes; a
model version published to the storage and promoted reaches both replicas without a restart.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import select

from db.schema import IngestRun, ModelVersion
from db.session import session_scope
from flickd.core.settings import Settings
from producer.ingest import ingest
from synthetic.procs import RedisServer, free_port, started_together, worker_command
from synthetic.server import CatalogServer
from tests.conftest import catalog_fixture, wait_until
from tests.models_fixtures import tiny_models
from tests.storage_fixtures import s3, storage_url

__all__ = ["s3", "tiny_models"]

catalog = catalog_fixture(8, seed=21)
POLL = 0.5  # FLICKD_INDEX_POLL_SECONDS of the API processes


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _run_done(settings: Settings, run_id: int) -> bool:
    with session_scope(settings) as session:
        run = session.get(IngestRun, run_id)
        return run.status == "done" and run.finalize_status not in (None, "queued", "running")


def _feed(path: Path, server: CatalogServer, images: list) -> Path:
    lines = ["product_id,image_url"]
    lines += [f"p-{image.filename},{server.base_url}/images/{image.filename}" for image in images]
    path.write_text("\n".join(lines) + "\n")
    return path


def _active(settings: Settings) -> ModelVersion:
    with session_scope(settings) as session:
        query = select(ModelVersion).where(ModelVersion.active.is_(True))
        return session.scalars(query).one()


def _promote(settings: Settings, workdir: Path) -> int:
    """Publish another tiny CLIP (seed 1) as a model version and promote it: record it, then
    start its re-embedding. Returns its id."""
    from db.versions import record_model_version
    from flickd.core.storage import STORE_PREFIX, storage_for
    from models.build import build_offline_models
    from models.loading import fingerprint_dir
    from workers.finalize import start_reembed

    files = build_offline_models(workdir, "tiny", 1)["clip"]
    key = "models/clip-seed1"
    storage_for(settings).publish_dir(key, files)
    name = STORE_PREFIX + key
    parent = _active(settings)
    version_id, _ = record_model_version(
        settings,
        name=name,
        version=f"{name}@{fingerprint_dir(files)[:12]}",
        parent_name=parent.name,
        parent_version=parent.version,
        metrics={"promoted": True},
        promoted=True,
        activate=False,
    )
    start_reembed(version_id, settings)
    return version_id


@pytest.fixture(params=["s3", "file"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return storage_url(request.param, tmp_path, request)


@pytest.mark.services
def test_pipeline_shared_nothing(pg_settings, tiny_models, catalog, shared, tmp_path) -> None:
    base = pg_settings.model_copy(
        update={
            "storage_url": shared,
            "last_stage": "analyze",
            "detector_model": "none",
            "embedding_model": str(tiny_models["clip"]),
            "device": "cpu",
            "finalize": "index",
            "download_batch_size": 4,
            "download_threads": 2,
            "analyze_batch_size": 4,
            "index_poll_seconds": POLL,
        }
    )

    def own(name: str) -> Settings:  # each process: its own empty local directory
        return base.model_copy(update={"data_dir": tmp_path / name})

    ports = [free_port(), free_port()]
    logs = tmp_path / "logs"
    with RedisServer(tmp_path / "redis") as broker, ExitStack() as stack:
        base = base.model_copy(update={"broker_url": broker.url})
        server = stack.enter_context(CatalogServer(catalog.root / "images"))
        processes = [
            (worker_command("download", 1, "dl@%h"), own("download"), logs / "dl.log", "ready"),
            (worker_command("gpu", 1, "gpu@%h"), own("gpu"), logs / "gpu.log", "ready"),
        ]
        for i, port in enumerate(ports):
            cmd = [sys.executable, "-m", "flickd.cli", "api", "--port", str(port)]
            processes.append((cmd, own(f"api{i}"), logs / f"api{i}.log", "Uvicorn running"))
        stack.enter_context(started_together(processes))  # the four at once
        health = [f"http://127.0.0.1:{port}/health" for port in ports]
        assert all(_get(url)[0] == 503 for url in health)  # nothing built yet

        producer = own("producer")
        images = catalog.images
        run_id = ingest(_feed(tmp_path / "feed.csv", server, images), producer).run_id
        wait_until(lambda: _run_done(base, run_id), 180, "the run to finish")
        with session_scope(base) as session:
            run = session.get(IngestRun, run_id)
            assert (run.status, run.finalize_status) == ("done", "indexed")
            base_version = session.scalars(select(ModelVersion)).one()

        def served(url: str) -> dict:
            status, body = _get(url)
            return body["index"] if status == 200 else {}

        for url in health:  # both replicas serve the gpu worker's index, no restart
            wait_until(lambda url=url: served(url).get("vectors") == len(images), 60, url)
            assert served(url)["model_version_id"] == base_version.id

        # A new model version is published to the storage and promoted, as the final task
        # does after a fine-tuning that wins (here without training, whose win on a catalog
        # this small is luck): the gpu worker re-embeds the catalog under it, builds its
        # index and makes it the active embedder.
        tuned_id = _promote(own("promoter"), tmp_path / "new-model")
        wait_until(lambda: _active(base).id == tuned_id, 120, "the promoted model to be active")
        tuned = _active(base)
        assert tuned.name.startswith("store:models/")

        for port, url in zip(ports, health, strict=True):  # the promoted model, no restart
            wait_until(lambda url=url: served(url).get("model_version_id") == tuned.id, 60, url)
            assert served(url)["vectors"] == len(images)
            status, body = _get(f"http://127.0.0.1:{port}/search?q=a%20red%20dress&k=3")
            assert status == 200 and body["model_version"] == tuned.version
            hits = body["items"][0]["results"]
            assert hits, body
            crop = hits[0]["thumbnail_url"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{crop}", timeout=10) as r:
                assert r.read()[:2] == b"\xff\xd8"  # the crop JPEG, from the storage

    # Shared nothing: no process wrote the shared things into its own directory.
    for name in ("download", "gpu", "api0", "api1", "producer"):
        local = tmp_path / name
        assert not (local / "index").exists() and not (local / "models").exists()
        if shared.startswith("s3://"):
            assert not (local / "blobs").exists()
