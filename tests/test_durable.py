"""Work that finishes by itself whatever dies: real download and gpu workers, the scheduler
(the reconciler), Postgres, and a ``redis-server`` of the test's own that it kills.

Each test drives one fault and checks the same things: every image ends terminal with the
right reason, no crop or embedding is written twice, the run ends ``done``, exactly one final
task completes and one index is built, no manual command is run, and all of it settles within
a bound that follows from the lease.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, select

from db.counters import read_counts
from db.schema import Crop, Embedding, Image, IndexBuild, IngestRun
from db.session import session_scope
from flickd.core.broker import ANALYZE_TASK, DOWNLOAD_TASK, enqueue
from flickd.core.settings import Settings
from producer.ingest import ingest
from synthetic.procs import (
    ROOT,
    RedisServer,
    settings_env,
    spawn,
    stop_together,
    wait_for_log,
    worker_command,
)
from synthetic.server import CatalogServer
from tests.conftest import PG_ADMIN_URL, catalog_fixture, run_flickd, wait_until
from tests.models_fixtures import tiny_models
from workers.control import cancel_run

LEASE = 2
# Short leases and passes so that a test settles in seconds. Redis's own re-delivery (the
# visibility timeout) is far away: whatever comes back, the reconciler brought back.
RELIABILITY = {
    "lease_seconds": LEASE,
    "reconcile_interval": 1,
    "visibility_timeout": 300,
    "task_soft_time_limit": 100,
    "task_time_limit": 120,
    "redelivery_sweep_seconds": 1,
    "max_stage_attempts": 4,
    "publish_retries": 2,
}
# What the faults leave to the reconciler settles within a few leases, plus the work itself.
SETTLE_BOUND = 6 * LEASE + 60

# path on the catalog server -> (state, reason)
BAD = {
    "/fault/404": ("failed", "http_error"),
    "/fault/truncated": ("failed", "corrupt_image"),
    "/fault/html-as-jpeg": ("failed", "not_an_image"),
}


catalog = catalog_fixture(16, seed=5)


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def _settings(pg_settings: Settings, broker: RedisServer, tiny_models, **extra) -> Settings:
    return pg_settings.model_copy(
        update={
            "broker_url": broker.url,
            "last_stage": "analyze",
            "detector_model": "none",  # one whole-image crop per image: easy to count
            "embedding_model": str(tiny_models["clip"]),
            "device": "cpu",
            "finalize": "index",
            "download_batch_size": 4,
            "download_threads": 2,
            "analyze_batch_size": 4,
            **RELIABILITY,
            **extra,
        }
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _feed(path: Path, server: CatalogServer, catalog) -> dict[str, tuple[str, str | None]]:
    """Good and faulty URLs interleaved; returns url -> expected (state, reason)."""
    expected: dict[str, tuple[str, str | None]] = {}
    lines = ["product_id,image_url"]
    bad = [server.base_url + p for p in BAD] + [f"http://127.0.0.1:{_closed_port()}/x.jpg"]
    outcomes = [*BAD.values(), ("failed", "connection_error")]
    for i, image in enumerate(catalog.images):
        url = f"{server.base_url}/images/{image.filename}"
        lines.append(f"p{i},{url}")
        expected[url] = ("analyzed", None)
        if i % 4 == 0 and bad:
            lines.append(f"bad{i},{bad[-1]}")
            expected[bad.pop()] = outcomes.pop()
    path.write_text("\n".join(lines) + "\n")
    return expected


# --- the pieces a test starts and kills -----------------------------------------------------------
class Stack:
    """Workers and the scheduler as real processes, each restartable after a kill."""

    def __init__(self, settings: Settings, logs: Path, stack: ExitStack) -> None:
        self.settings, self.logs, self.stack = settings, logs, stack
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills = 0

    def start(self, *names: str) -> None:
        """Start these pieces at once; return when every one of them is ready."""
        started = []
        for name in names:
            log = self.logs / f"{name}-{self.kills}.log"
            if name == "scheduler":
                node = f"sched-{self.kills}@%h"
                cmd = [sys.executable, "-m", "flickd.cli", "scheduler", "-n", node]
            else:
                queue = "gpu" if name.partition("-")[0] == "gpu" else "download"
                cmd = worker_command(queue, concurrency=1, name=f"{name}-{self.kills}@%h")
            self.procs[name] = self.stack.enter_context(spawn(cmd, self.settings, log, ready=None))
            started.append((self.procs[name], log))
        for proc, log in started:
            wait_for_log(log, "ready", proc, timeout=60)

    def stop(self) -> None:
        """Stop every piece, all at once (each as :func:`spawn` stops it)."""
        stop_together(list(self.procs.values()))

    def kill(self, name: str, landed: Callable[[], bool] | None = None) -> None:
        """SIGKILL the whole process group, mid-whatever, and start a fresh one. ``landed``,
        checked the moment the process is dead (before the reconciler can have re-driven
        anything: its heartbeat is a fraction of a lease old), proves the kill came mid-work."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if landed is not None:
            assert landed(), f"the kill of {name} came too late to prove anything"
        self.kills += 1
        self.start(name)

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs.values())

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs.glob("*.log"))


@contextmanager
def _running(settings: Settings, tmp_path: Path, *names: str) -> Iterator[Stack]:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    with ExitStack() as stack:
        pipeline = Stack(settings, logs, stack)
        pipeline.start(*names)
        try:
            yield pipeline
        finally:
            pipeline.stop()


def _scalar(settings: Settings, query) -> object:
    with session_scope(settings) as session:
        return session.scalar(query)


def _claimed(settings: Settings, state: str) -> bool:
    """A worker holds a batch of ``state`` images right now (claimed, not finished)."""
    query = select(func.count()).where(Image.state == state, Image.stage_attempts >= 1)
    return bool(_scalar(settings, query.select_from(Image)))


def _settle(settings: Settings, run_id: int, since: float) -> float:
    """Wait until the run is done and its final task has completed; return the seconds from
    ``since`` (the last fault)."""

    def settled() -> bool:
        with session_scope(settings) as session:
            run = session.get(IngestRun, run_id)
            building = session.scalar(
                select(func.count())
                .select_from(IndexBuild)
                .where(IndexBuild.status.in_(["pending", "building"]))
            )
            return (
                run.status == "done"
                and run.finalize_status not in (None, "queued", "running")
                and not building
            )

    wait_until(settled, SETTLE_BOUND, f"run {run_id} to settle")
    return time.monotonic() - since


def _check(
    settings: Settings, run_id: int, expected, pipeline: Stack, final: str = "indexed"
) -> None:
    with session_scope(settings) as session:
        images = {img.url: img for img in session.scalars(select(Image))}
        run = session.get(IngestRun, run_id)
        crops = session.execute(select(Crop.image_id, Crop.crop_index)).all()
        embeddings = session.execute(select(Embedding.crop_id, Embedding.model_version_id)).all()
        builds = session.scalars(select(IndexBuild)).all()
    assert {url: (img.state, img.failure_reason) for url, img in images.items()} == expected
    analyzed = {img.id for img in images.values() if img.state == "analyzed"}
    # Detection is off: exactly one whole-image crop per analysed image, one embedding each.
    assert sorted(image_id for image_id, _ in crops) == sorted(analyzed)
    # Each model version that embedded anything embedded every crop once (after a promoted
    # fine-tuning, the catalog is re-embedded under the new version).
    assert len(embeddings) == len(set(embeddings))
    per_version = Counter(version for _, version in embeddings)
    assert per_version and set(per_version.values()) == {len(crops)}, per_version
    assert run.status == "done"
    assert run.finalize_status == final
    assert len(builds) == 1 and builds[0].active and builds[0].n_vectors == len(crops)
    assert pipeline.log_text().count(f"finalize run_id={run_id} action=") == 1
    assert pipeline.alive()


# --- the faults ---------------------------------------------------------------------------------
@pytest.mark.services
def test_workers_killed_mid_download_mid_analysis_and_during_the_final_task(
    pg_settings, broker, tiny_models, catalog, tmp_path
):
    # A final task that fine-tunes: seconds of training, so the kill lands inside it.
    settings = _settings(
        pg_settings,
        broker,
        tiny_models,
        finalize="auto",
        finetune_min_new_crops=1,
        train_epochs=20,
        train_batch_size=8,
        train_lr=1e-3,
    )
    with CatalogServer(catalog.root / "images", latency=0.3) as server:
        expected = _feed(tmp_path / "feed.csv", server, catalog)
        with _running(settings, tmp_path, "scheduler", "download", "gpu") as pipeline:
            run_id = ingest(tmp_path / "feed.csv", settings).run_id
            wait_until(lambda: _claimed(settings, "queued"), 30, "a download batch in flight")
            pipeline.kill("download", landed=lambda: _claimed(settings, "queued"))
            wait_until(lambda: _claimed(settings, "downloaded"), 60, "an analysis batch in flight")
            pipeline.kill("gpu")
            finalizing = select(IngestRun.finalize_status)
            wait_until(
                lambda: _scalar(settings, finalizing) == "running",
                SETTLE_BOUND,
                "the final task to start",
            )
            pipeline.kill("gpu", landed=lambda: _scalar(settings, finalizing) == "running")
            last_fault = time.monotonic()
            seconds = _settle(settings, run_id, last_fault)
            _check(settings, run_id, expected, pipeline, final="finetuned")
    assert _scalar(settings, select(IngestRun.finalize_attempts)) == 2  # killed, then done
    assert seconds < SETTLE_BOUND


@pytest.mark.services
def test_broker_restarted_empty_while_batches_hand_off(
    pg_settings, broker, tiny_models, catalog, tmp_path
):
    settings = _settings(pg_settings, broker, tiny_models)
    with CatalogServer(catalog.root / "images", latency=0.3) as server:
        expected = _feed(tmp_path / "feed.csv", server, catalog)
        with _running(settings, tmp_path, "scheduler", "download", "gpu") as pipeline:
            run_id = ingest(tmp_path / "feed.csv", settings).run_id
            wait_until(lambda: _claimed(settings, "queued"), 30, "a download batch in flight")
            broker.kill()  # the batch in flight finishes while the broker is gone
            time.sleep(1.5)
            broker.start()  # back, empty: every queued and unacknowledged message is lost
            last_fault = time.monotonic()
            pending = _scalar(
                settings,
                select(func.count()).select_from(Image).where(Image.state == "queued"),
            )
            assert pending, "the restart came too late to lose anything"
            seconds = _settle(settings, run_id, last_fault)
            _check(settings, run_id, expected, pipeline)
    with session_scope(settings) as session:
        counts = read_counts(session.connection())
    assert counts.get("requeued_download", 0) > 0  # brought back by the reconciler
    assert seconds < SETTLE_BOUND


@pytest.mark.services
def test_producer_reports_an_unreachable_broker_and_the_run_still_finishes(
    pg_settings, broker, tiny_models, catalog, tmp_path, capsys
):
    """The broker goes away while the producer publishes (`flickd ingest` itself refuses to
    start without one: tests/test_first_hour.py): every row is still recorded, the summary says
    what was not sent, and the reconciler sends it once the broker is back."""
    from flickd.cli.ingest import _print_summary

    settings = _settings(pg_settings, broker, tiny_models)
    with CatalogServer(catalog.root / "images") as server:
        expected = _feed(tmp_path / "feed.csv", server, catalog)
        broker.kill()
        summary = ingest(tmp_path / "feed.csv", settings)
        assert summary.not_sent == len(expected) and "Connection" in (summary.broker_error or "")
        _print_summary(summary.to_dict())
        printed = capsys.readouterr().err
        assert "not yet sent" in printed and "the reconciler sends them" in printed
        with session_scope(settings) as session:
            run = session.get(IngestRun, summary.run_id)
            recorded = session.scalar(select(func.count()).select_from(Image))
        assert run.status == "enqueued" and recorded == len(expected)  # nothing lost
        broker.start()
        last_fault = time.monotonic()
        with _running(settings, tmp_path, "scheduler", "download", "gpu") as pipeline:
            seconds = _settle(settings, run.id, last_fault)
            _check(settings, run.id, expected, pipeline)
    assert seconds < SETTLE_BOUND


def _terminate_backends(database: str) -> int:
    with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


@pytest.mark.services
def test_postgres_backends_terminated_while_queries_run(
    pg_settings, broker, tiny_models, catalog, tmp_path
):
    settings = _settings(pg_settings, broker, tiny_models)
    database = pg_settings.database_url.rsplit("/", 1)[1]
    terminated: list[int] = []
    with CatalogServer(catalog.root / "images", latency=0.2) as server:
        expected = _feed(tmp_path / "feed.csv", server, catalog)
        with _running(settings, tmp_path, "scheduler", "download", "gpu") as pipeline:
            run_id = ingest(tmp_path / "feed.csv", settings).run_id

            def terminate() -> None:
                for _ in range(3):
                    time.sleep(0.7)
                    terminated.append(_terminate_backends(database))

            killer = threading.Thread(target=terminate)
            killer.start()
            killer.join()
            last_fault = time.monotonic()
            seconds = _settle(settings, run_id, last_fault)
            _check(settings, run_id, expected, pipeline)
    assert sum(terminated) >= 3  # the workers' connections really were cut
    assert seconds < SETTLE_BOUND


@pytest.mark.services
def test_the_same_batches_delivered_twice_at_once_write_nothing_twice(
    pg_settings, broker, tiny_models, catalog, tmp_path
):
    settings = _settings(pg_settings, broker, tiny_models)
    with CatalogServer(catalog.root / "images", latency=0.2) as server:
        expected = _feed(tmp_path / "feed.csv", server, catalog)
        with _running(settings, tmp_path, "download", "gpu") as pipeline:
            pipeline.start("download-2", "gpu-2")  # a second worker of each queue takes the copies
            run_id = ingest(tmp_path / "feed.csv", settings).run_id
            with session_scope(settings) as session:
                ids = sorted(session.scalars(select(Image.id)))
            # Every batch once more, at once: both copies of a batch run side by side.
            enqueue(DOWNLOAD_TASK, ids, settings.download_batch_size, settings)
            wait_until(lambda: _claimed(settings, "downloaded"), 60, "analysis under way")
            enqueue(ANALYZE_TASK, ids, settings.analyze_batch_size, settings)
            enqueue(ANALYZE_TASK, ids, settings.analyze_batch_size, settings)
            _settle(settings, run_id, time.monotonic())
            _check(settings, run_id, expected, pipeline)


@pytest.mark.services
def test_a_stage_broken_for_good_runs_out_of_attempts_and_the_run_finishes(
    pg_settings, broker, tiny_models, catalog, tmp_path
):
    # A model directory with its configs in place and its weights damaged: the gpu worker's
    # start-up check (which reads configs, not weights) passes, and every load then fails.
    broken = tmp_path / "damaged-model"
    shutil.copytree(tiny_models["clip"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    settings = _settings(
        pg_settings, broker, tiny_models, embedding_model=str(broken), max_stage_attempts=2
    )
    with CatalogServer(catalog.root / "images") as server:
        expected = _feed(tmp_path / "feed.csv", server, catalog)
        with _running(settings, tmp_path, "scheduler", "download", "gpu") as pipeline:
            run_id = ingest(tmp_path / "feed.csv", settings).run_id

            def finished() -> bool:
                status = select(IngestRun.status).where(IngestRun.id == run_id)
                return _scalar(settings, status) == "done"

            wait_until(finished, SETTLE_BOUND, "the run to finish")
            assert pipeline.alive()
    with session_scope(settings) as session:
        images = {img.url: img for img in session.scalars(select(Image))}
    for url, (state, reason) in expected.items():
        image = images[url]
        if state == "analyzed":  # analysis can never work: out of attempts, with the cause
            assert (image.state, image.failure_reason) == ("failed", "attempts_exhausted")
            assert "analyze not finished after 2 attempts" in image.failure_detail
            assert "SafetensorError" in image.failure_detail  # the cause, as the worker saw it
        else:  # the download faults keep their own reasons
            assert (image.state, image.failure_reason) == (state, reason)


@pytest.mark.services
def test_a_cancelled_run_resumed_finishes_and_finalizes(
    pg_settings, broker, tiny_models, catalog, tmp_path
):
    settings = _settings(pg_settings, broker, tiny_models)
    with CatalogServer(catalog.root / "images", latency=0.2) as server:
        expected = _feed(tmp_path / "feed.csv", server, catalog)
        with _running(settings, tmp_path, "download") as pipeline:
            run_id = ingest(tmp_path / "feed.csv", settings).run_id
            downloaded = select(func.count()).select_from(Image).where(Image.state == "downloaded")
            wait_until(lambda: bool(_scalar(settings, downloaded)), 30, "some images downloaded")
            cancelled = cancel_run(run_id, settings)
            assert cancelled.cancelled_images > 0
            out = run_flickd("resume", "--run", str(run_id), env=settings_env(settings))
            assert f"run {run_id} resumed" in out.stdout
            assert "straight to analysis" in out.stdout and "(0 straight" not in out.stdout
            pipeline.start("gpu", "scheduler")
            _settle(settings, run_id, time.monotonic())
            _check(settings, run_id, expected, pipeline)
    again = run_flickd("resume", "--run", str(run_id), env=settings_env(settings), expect_ok=False)
    assert again.returncode != 0 and "is done, not cancelled" in again.stderr
