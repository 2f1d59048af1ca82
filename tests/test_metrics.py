"""Observability from real processes: the Prometheus exporter's gauges (``flickd metrics``), the
workers' per-stage histograms (prefork children, multiprocess mode), and the workers' structured
JSON logs carrying task, run and image ids."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from db.schema import IndexBuild, ModelVersion
from db.session import session_scope
from flickd.core.settings import Settings
from flickd.services.metrics import metrics_asgi_app, render_metrics
from producer.ingest import ingest
from synthetic.catalog import write_feed
from synthetic.procs import ROOT, settings_env, spawn, stop_process_group, wait_for_log
from tests.conftest import catalog_fixture, wait_for_run

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


catalog = catalog_fixture(5, seed=9)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_metrics(text: str) -> Samples:
    """``{sample name: {sorted label pairs: value}}``."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode())


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in samples.get(name, {}).items()}


@contextmanager
def json_worker(settings: Settings, logs: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A ``flickd worker`` with FLICKD_LOG_FORMAT=json; its stderr (the log) kept apart from
    stdout, where Celery prints its start-up banner."""
    env = settings_env(settings.model_copy(update={"log_format": "json"}))
    # These tests run as root; Celery's warning about that comes from `warnings`, not logging.
    env["PYTHONWARNINGS"] = "ignore::UserWarning"
    logs.mkdir(parents=True, exist_ok=True)
    err = logs / "worker.stderr"
    cmd = ["worker", "-Q", "download", "-c", "2", "-n", f"json-{uuid.uuid4().hex[:6]}@%h"]
    with open(logs / "worker.stdout", "wb") as out, open(err, "wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flickd.cli", *cmd],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=errors,
            start_new_session=True,
        )
    try:
        wait_for_log(err, " ready.", proc, timeout=60)
        yield proc, err
    finally:
        stop_process_group(proc)


def _fault_feed(path: Path, catalog, base_url: str) -> int:
    """The catalog's images plus two that fail (404, not an image); returns the image count."""
    lines = ["product_id,image_url"]
    lines += [f"p{i},{base_url}/images/{img.filename}" for i, img in enumerate(catalog.images)]
    lines += [f"bad1,{base_url}/fault/404", f"bad2,{base_url}/fault/html-as-jpeg"]
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def _check_json_log(path: Path, run_id: int) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    per_image = [r for r in records if "image_id" in r]
    assert {r["msg"].split(" detail=")[0] for r in per_image} == {
        "image failed reason=http_error",
        "image failed reason=not_an_image",
    }
    for record in per_image:  # logged from the download threads of a task
        assert record["run_id"] == run_id and record["task_id"], record
    batches = [r for r in records if r["msg"].startswith("download batch done")]
    assert batches and all(r["task_id"] and r["task"] == "flickd.download_batch" for r in batches)


def test_metrics_and_json_logs_after_an_ingest(pg_settings, catalog, server, tmp_path):
    worker_port, exporter_port = free_port(), free_port()
    settings = pg_settings.model_copy(update={"worker_metrics_port": worker_port})
    feed = tmp_path / "feed.csv"
    n = _fault_feed(feed, catalog, server.base_url)
    exporter = [sys.executable, "-m", "flickd.cli", "metrics", "--port", str(exporter_port)]
    with spawn(exporter, pg_settings, tmp_path / "metrics.log", ready="serving metrics"):
        with json_worker(settings, tmp_path / "logs") as (_, worker_log):
            summary = ingest(feed, settings)
            assert wait_for_run(settings, summary.run_id, timeout=60) == "done"
            _check_json_log(worker_log, summary.run_id)
            # Observed in the pool's child processes, served by the worker's main process.
            stages = by_label(scrape(worker_port), "flickd_stage_seconds_count", "stage")
            assert stages == {"download_batch": summary.messages}

        # With no worker left, a second ingest stays in the queue.
        second = tmp_path / "second.csv"
        write_feed(catalog, second, server.base_url + "/again")
        waiting = ingest(second, settings)
        samples = scrape(exporter_port)

    states = by_label(samples, "flickd_images", "state")
    assert states == {
        "queued": len(catalog.images),
        "downloaded": n - 2,
        "analyzed": 0,
        "failed": 2,
    }
    failures = by_label(samples, "flickd_image_failures", "reason")
    assert {r: v for r, v in failures.items() if v} == {"http_error": 1, "not_an_image": 1}
    assert failures["timeout"] == 0  # every known reason is present, so rates stay defined
    queues = by_label(samples, "flickd_queue_messages", "queue")
    assert queues == {"download": waiting.messages, "gpu": 0}
    runs = by_label(samples, "flickd_runs", "status")
    assert (runs["done"], runs["enqueued"]) == (1, 1)
    assert by_label(samples, "flickd_metrics_source_up", "source") == {
        "broker": 1,
        "database": 1,
    }


def test_model_and_index_gauges(pg_settings):
    with session_scope(pg_settings) as session:
        old = ModelVersion(kind="embedder", name="openai/clip", version="v1", active=False)
        new = ModelVersion(kind="embedder", name="/data/models/ft-2", version="v2", active=True)
        session.add_all([old, new])
        session.flush()
        session.add_all(
            [
                IndexBuild(
                    model_version_id=old.id, path="a", index_type="Flat", n_vectors=5, active=False
                ),
                IndexBuild(
                    model_version_id=new.id, path="b", index_type="HNSW", n_vectors=7, active=True
                ),
            ]
        )
    samples = parse_metrics(render_metrics(pg_settings).decode())
    assert samples["flickd_model_info"] == {
        (("kind", "embedder"), ("name", "/data/models/ft-2"), ("version", "v2")): 1.0
    }
    assert samples["flickd_index_vectors"] == {
        (("index_type", "HNSW"), ("model_version", "v2")): 7.0
    }


def test_scrape_survives_an_unreachable_broker(pg_settings):
    closed = pg_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    samples = parse_metrics(render_metrics(closed).decode())
    assert by_label(samples, "flickd_metrics_source_up", "source") == {
        "broker": 0,
        "database": 1,
    }
    assert "flickd_images" in samples and "flickd_queue_messages" not in samples


def test_embedded_mode_and_asgi_app(embedded_settings):
    from starlette.testclient import TestClient

    response = TestClient(metrics_asgi_app(embedded_settings)).get("/")
    assert response.status_code == 200
    samples = parse_metrics(response.text)
    assert by_label(samples, "flickd_queue_messages", "queue") == {"download": 0, "gpu": 0}
    assert by_label(samples, "flickd_images", "state")["queued"] == 0
