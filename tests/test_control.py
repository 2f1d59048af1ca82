"""Operator control against real workers, Postgres and Redis: pausing a queue mid-run loses
nothing (and binds workers started while paused, and a solo worker that missed the broadcast),
cancel, reprocess after a model change, and ``flickd status --watch``."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import func, select, update

from db.schema import Crop, Embedding, Image, IngestRun, ModelVersion, Product
from db.session import session_scope
from flickd.cli import main
from flickd.core.broker import ANALYZE_TASK, enqueue, queue_lengths
from flickd.core.settings import Settings, reset_settings
from producer.ingest import ingest
from synthetic.procs import stop_together, wait_for_log
from synthetic.server import CatalogServer
from tests.conftest import ROOT, catalog_fixture, celery_worker, settings_env, wait_until
from tests.models_fixtures import tiny_models
from workers.control import (
    PAUSE_POLL_SECONDS,
    PAUSED_KEY,
    ControlError,
    cancel_run,
    pause_queue,
    paused_queues,
    reprocess,
)

pytestmark = pytest.mark.services


catalog = catalog_fixture(4, seed=7)


def _feed(path: Path, base_url: str, catalog, n: int) -> Path:
    """``n`` distinct URLs (the query differs) over the catalog's files."""
    names = [img.filename for img in catalog.images]
    lines = ["product_id,image_url"]
    lines += [f"p{i},{base_url}/images/{names[i % len(names)]}?v={i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _states(settings: Settings) -> dict[str, int]:
    with session_scope(settings) as session:
        return dict(session.execute(select(Image.state, func.count()).group_by(Image.state)).all())


def _queued_message_ids(settings: Settings, queue: str) -> list[int]:
    """The image ids carried by the messages waiting in ``queue`` (kombu's JSON envelopes)."""
    client = redis.Redis.from_url(settings.broker_url or "")
    ids: list[int] = []
    for raw in client.lrange(settings.broker_prefix + queue, 0, -1):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        ids += args[0]
    return ids


def _nothing_in_flight(settings: Settings) -> bool:
    return queue_lengths(settings)[1] == 0


def test_pause_mid_run_loses_nothing(pg_settings, catalog, tmp_path):
    settings = pg_settings.model_copy(update={"download_batch_size": 2, "download_threads": 2})
    n = 30
    with CatalogServer(catalog.root / "images", latency=0.25) as slow:
        feed = _feed(tmp_path / "feed.csv", slow.base_url, catalog, n)
        with celery_worker(settings, "download", concurrency=1, name="first@%h") as first:
            summary = ingest(feed, settings)
            wait_until(
                lambda: _states(settings).get("downloaded", 0) >= 2, 30, "no progress at all"
            )

            paused = _invoke(settings, "pause", "--queue", "download")
            assert paused.exit_code == 0, paused.output
            assert re.search(r"first@\S+: stopped consuming download", paused.output), paused.output
            assert paused_queues(settings) == {"download"}
            # The batch in hand finishes; then nothing moves while messages wait in Redis.
            wait_until(lambda: _nothing_in_flight(settings), 20, "tasks still in flight")
            before = _states(settings)
            queued = before.get("queued", 0)
            assert 0 < queued < n, before
            with session_scope(settings) as session:
                queued_ids = set(session.scalars(select(Image.id).where(Image.state == "queued")))
            assert set(_queued_message_ids(settings, "download")) == queued_ids

            # A worker started while paused takes nothing either.
            with celery_worker(settings, "download", concurrency=1, name="late@%h") as late:
                time.sleep(1.5)
                assert _states(settings) == before
                assert set(_queued_message_ids(settings, "download")) == queued_ids

                slow.latency = 0.0
                resumed = _invoke(settings, "resume", "--queue", "download")
                assert resumed.exit_code == 0, resumed.output
                assert len(re.findall(r"(first|late)@\S+: consuming download", resumed.output)) == 2
                assert paused_queues(settings) == set()
                # `flickd status --watch` follows the run to its end, then prints its status.
                watch = subprocess.run(
                    [sys.executable, "-m", "flickd.cli", "status", str(summary.run_id), "--watch"],
                    env=settings_env(settings),
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                # Both workers' warm shutdowns at once rather than one after the other.
                stop_together([late, first])
    assert watch.returncode == 0, watch.stderr
    assert f"run {summary.run_id}: done" in watch.stdout
    assert f"run {summary.run_id}" in watch.stderr and "img" in watch.stderr  # the bar
    assert _states(settings) == {"downloaded": n}
    with session_scope(settings) as session:
        assert session.scalar(select(func.count(func.distinct(Image.url)))) == n


def test_a_busy_solo_worker_follows_the_pause_flag_without_the_broadcast(
    pg_settings, tiny_models, tmp_path
):
    """A solo (GPU) worker mid-batch misses broadcasts; it must still obey the flag."""
    # A gpu worker checks its models before it starts: give it usable (offline) ones.
    settings = pg_settings.model_copy(
        update={
            "last_stage": "analyze",
            "detector_model": "none",
            "embedding_model": str(tiny_models["clip"]),
        }
    )
    client = redis.Redis.from_url(settings.broker_url or "")
    flag = PAUSED_KEY.format(prefix=settings.broker_prefix, queue="gpu")
    log = tmp_path / "gpu-worker.log"
    with celery_worker(settings, "gpu", log_path=log) as worker:
        client.set(flag, "1")  # no broadcast at all
        wait_for_log(log, "queue paused by an operator", worker, timeout=PAUSE_POLL_SECONDS + 5)
        enqueue(ANALYZE_TASK, [101, 102, 103], 1, settings)  # no such images: quick no-ops
        time.sleep(1.0)
        assert queue_lengths(settings)[0]["gpu"] == 3

        client.delete(flag)
        wait_until(
            lambda: queue_lengths(settings) == ({"download": 0, "gpu": 0}, 0),
            PAUSE_POLL_SECONDS + 10,
            "the worker did not take the queue up again",
        )


def test_pause_refuses_unknown_queue_and_embedded_mode(pg_settings, embedded_settings):
    with pytest.raises(ControlError, match="unknown queue"):
        pause_queue("uploads", pg_settings)
    with pytest.raises(ControlError, match="FLICKD_BROKER_URL"):
        pause_queue("download", embedded_settings)


def _invoke(settings: Settings, *args: str):  # type: ignore[no-untyped-def]
    reset_settings()  # the CLI reads its settings from this environment
    result = CliRunner().invoke(main, list(args), env=settings_env(settings))
    reset_settings()
    return result


def test_cancel_fails_pending_images_and_workers_skip_them(pg_settings, catalog, tmp_path):
    with CatalogServer(catalog.root / "images") as server:
        feed = _feed(tmp_path / "feed.csv", server.base_url, catalog, 12)
        summary = ingest(feed, pg_settings)  # no worker yet: every message waits in Redis
        result = _invoke(pg_settings, "cancel", str(summary.run_id))
        assert result.exit_code == 0, result.output
        assert f"run {summary.run_id} cancelled (was enqueued): 12 image(s)" in result.output
        assert _states(pg_settings) == {"failed": 12}

        with celery_worker(pg_settings, "download", concurrency=1):
            wait_until(
                lambda: queue_lengths(pg_settings) == ({"download": 0, "gpu": 0}, 0),
                20,
                "messages of the cancelled run not drained",
            )
    with session_scope(pg_settings) as session:
        reasons = set(session.scalars(select(Image.failure_reason)))
        run = session.get(IngestRun, summary.run_id)
    assert reasons == {"cancelled"}  # drained as no-ops: nothing was downloaded
    assert run.status == "cancelled" and run.finished_at is not None

    again = cancel_run(summary.run_id, pg_settings)
    assert (again.previous_status, again.cancelled_images) == ("cancelled", 0)
    missing = _invoke(pg_settings, "cancel", "999")
    assert missing.exit_code != 0 and "no run 999" in missing.output


def test_cancel_keeps_finished_images(pg_settings):
    run_id = _seed_run(pg_settings, {"analyzed": 2, "downloaded": 3, "queued": 1, "failed": 1})
    result = cancel_run(run_id, pg_settings.model_copy(update={"last_stage": "analyze"}))
    assert result.cancelled_images == 4
    assert result.images_by_state == {"analyzed": 2, "failed": 5}
    with pytest.raises(ControlError, match="already done"):
        cancel_run(_seed_run(pg_settings, {"analyzed": 1}, status="done"), pg_settings)


# --- reprocess --------------------------------------------------------------------------------
def _seed_run(settings: Settings, states: dict[str, int], status: str = "enqueued") -> int:
    """A run with images in the given states (rows only; no bytes behind them)."""
    with session_scope(settings) as session:
        run = IngestRun(feed="seed.csv", status=status)
        product = Product(external_id=f"seed-{time.time_ns()}")
        session.add_all([run, product])
        session.flush()
        for state, count in states.items():
            for i in range(count):
                session.add(
                    Image(
                        product_id=product.id,
                        url=f"http://example.com/{run.id}/{state}/{i}.jpg",
                        url_hash=f"{run.id}-{state}-{i}",
                        run_id=run.id,
                        state=state,
                        failure_reason="http_error" if state == "failed" else None,
                    )
                )
        return run.id


def _crop(session, image_id: int, index: int, versions: list[int]) -> None:  # type: ignore[no-untyped-def]
    crop = Crop(
        image_id=image_id,
        crop_index=index,
        **dict.fromkeys(("x0", "y0", "nx0", "ny0"), 0.0),
        **dict.fromkeys(("x1", "y1", "nx1", "ny1"), 1.0),
    )
    session.add(crop)
    session.flush()
    for version_id in versions:
        vector = b"\0" * 8
        session.add(Embedding(crop_id=crop.id, model_version_id=version_id, dim=2, vector=vector))


def test_reprocess_enqueues_only_images_missing_the_active_embedding(pg_settings):
    settings = pg_settings.model_copy(update={"last_stage": "analyze", "analyze_batch_size": 2})
    run_id = _seed_run(settings, {"analyzed": 4, "failed": 1, "downloaded": 1}, status="done")
    other_run = _seed_run(settings, {"analyzed": 1}, status="done")
    with session_scope(settings) as session:
        old = ModelVersion(kind="embedder", name="clip", version="old", active=False)
        new = ModelVersion(kind="embedder", name="clip-ft", version="new", active=True)
        session.add_all([old, new])
        session.flush()
        ids = list(
            session.scalars(
                select(Image.id).where(Image.run_id == run_id, Image.state == "analyzed")
            )
        )
        complete, old_only, partial, no_crops = ids
        _crop(session, complete, 0, [old.id, new.id])
        _crop(session, complete, 1, [new.id])
        _crop(session, old_only, 0, [old.id])
        _crop(session, partial, 0, [new.id])
        _crop(session, partial, 1, [old.id])
        (elsewhere,) = session.scalars(select(Image.id).where(Image.run_id == other_run))
        _crop(session, elsewhere, 0, [old.id])

    result = reprocess(settings, run_id=run_id)
    assert (result.images, result.messages, result.active_version) == (3, 2, "new")
    assert sorted(_queued_message_ids(settings, "gpu")) == sorted([old_only, partial, no_crops])
    with session_scope(settings) as session:
        states = dict(session.execute(select(Image.id, Image.state)).all())
        runs = dict(session.execute(select(IngestRun.id, IngestRun.status)).all())
    assert [states[i] for i in (complete, old_only, partial, no_crops)] == [
        "analyzed",
        "downloaded",
        "downloaded",
        "downloaded",
    ]
    assert states[elsewhere] == "analyzed"  # another run: not asked for
    assert runs == {run_id: "enqueued", other_run: "done"}  # finishes again once re-analysed

    # --all takes every analysed image, embedded or not; all runs without --run.
    redis.Redis.from_url(settings.broker_url or "").delete(settings.broker_prefix + "gpu")
    result = _invoke(settings, "reprocess", "--all")
    assert result.exit_code == 0, result.output
    assert "re-analysing 2 image(s) in 1 message(s) (every analysed image" in result.output
    assert sorted(_queued_message_ids(settings, "gpu")) == sorted([complete, elsewhere])


def test_reprocess_without_an_active_embedder_takes_every_analysed_image(pg_settings):
    settings = pg_settings.model_copy(update={"last_stage": "analyze"})
    _seed_run(settings, {"analyzed": 3, "queued": 2})
    with session_scope(settings) as session:
        session.execute(update(ModelVersion).values(active=False))
    assert reprocess(settings).images == 3
    with pytest.raises(ControlError, match="download"):
        reprocess(pg_settings)  # FLICKD_LAST_STAGE=download: analysis is off
