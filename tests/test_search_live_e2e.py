"""End to end with real processes: a crop analysed by a real gpu worker is returned by a real
``flickd api`` process while its run is still going (one image of the run hangs on a slow host),
with no index rebuild in between (the final task is off)."""

from __future__ import annotations

import csv
import dataclasses
import signal
import sys

import httpx
import pytest
from sqlalchemy import select

from db.schema import IngestRun, ModelVersion
from db.session import session_scope
from flickd.core.settings import Settings
from producer.ingest import ingest
from synthetic.catalog import write_feed
from synthetic.procs import celery_workers, free_port, spawn, stop_process_group
from tests.conftest import catalog_fixture, wait_for_run, wait_until
from tests.models_fixtures import tiny_models
from workers.indexing import build_from_database

HANG = 90  # seconds the slow image takes: the run stays open far longer than the test waits

catalog = catalog_fixture(5, seed=31)


@pytest.fixture()
def settings(pg_settings: Settings, tiny_models) -> Settings:
    return pg_settings.model_copy(
        update={
            "last_stage": "analyze",
            "finalize": "off",  # nothing rebuilds the index: only freshness can serve new crops
            "detector_model": "none",
            "embedding_model": str(tiny_models["clip"]),
            "device": "cpu",
            "download_batch_size": 1,
            "download_threads": 2,
            "analyze_batch_size": 1,
            "read_timeout": HANG + 30,
            "download_deadline": HANG + 30,
            "freshness_poll_seconds": 0.5,
        }
    )


@pytest.mark.services
def test_an_analysed_crop_is_searchable_before_its_run_ends(settings, catalog, server, tmp_path):
    first = dataclasses.replace(catalog, products=catalog.products[:3])
    logs = tmp_path / "logs"
    with celery_workers(
        settings,
        {"queues": "download", "concurrency": 2, "name": "dl@%h", "log_path": logs / "dl.log"},
        {"queues": "gpu", "concurrency": 1, "name": "gpu@%h", "log_path": logs / "gpu.log"},
    ) as (download, _):
        run = ingest(write_feed(first, tmp_path / "first.csv", server.base_url), settings)
        assert wait_for_run(settings, run.run_id, timeout=120) == "done"
        with session_scope(settings) as session:
            version = session.scalars(select(ModelVersion.id)).one()
        build_from_database(settings, version)

        port = free_port()
        cmd = [sys.executable, "-m", "flickd.cli", "api", "--port", str(port)]
        with spawn(cmd, settings, logs / "api.log", ready="Uvicorn running"):
            url = f"http://127.0.0.1:{port}"
            new = catalog.products[3]
            picture = catalog.image_path(new.images[0]).read_bytes()

            def top_hit() -> str | None:
                response = httpx.post(
                    f"{url}/search/image",
                    params={"k": 1, "detect": "false"},
                    files={"file": ("q.jpg", picture, "image/jpeg")},
                    timeout=30,
                )
                hits = response.json()["items"][0]["results"] if response.is_success else []
                return hits[0]["product_id"] if hits else None

            assert top_hit() not in (None, new.product_id)  # served index, without it

            feed = write_feed(
                dataclasses.replace(catalog, products=[new]),
                tmp_path / "second.csv",
                server.base_url,
            )
            with feed.open("a", newline="") as handle:  # plus one image on a hanging host
                csv.writer(handle).writerow(
                    ["slow-1", server.url(f"fault/slow?seconds={HANG}"), "Slow", "", "", ""]
                )
            second = ingest(feed, settings)
            wait_until(
                lambda: top_hit() == new.product_id,
                HANG - 30,
                "the analysed product to be returned by the API",
            )
            with session_scope(settings) as session:
                assert session.get(IngestRun, second.run_id).status != "done"  # still running
        # Nothing is left to check, and the download worker's one task hangs for HANG s on
        # purpose: a warm shutdown would wait for it (20 s, then SIGKILL), so it gets SIGKILL now.
        stop_process_group(download, signal.SIGKILL)
