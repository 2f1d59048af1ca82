"""The reconciler's rules, pass by pass, on real Postgres and Redis with no workers: what it
re-drives, what it leaves alone, and what it finishes. (tests/test_durable.py drives the same
passes against real faults and real workers.)"""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import timedelta

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import select

from db.runs import claim_finalize
from db.schema import Image, IndexBuild, IngestRun, ModelVersion, Product, utcnow
from db.session import session_scope
from flickd.cli.main import main
from flickd.core.broker import DOWNLOAD_TASK, ENQUEUED_AT_HEADER, get_app
from flickd.core.settings import Settings
from workers.reconcile import reconcile_once

LEASE = 5


@pytest.fixture()
def settings(pg_settings: Settings) -> Settings:
    return pg_settings.model_copy(
        update={
            "lease_seconds": LEASE,
            "max_stage_attempts": 3,
            "finalize": "index",
            "last_stage": "analyze",
        }
    )


def _run(settings: Settings, status: str = "enqueued", **values) -> int:
    with session_scope(settings) as session:
        run = IngestRun(feed="seed.csv", status=status, **values)
        session.add(run)
        session.flush()
        return run.id


def _image(settings: Settings, run_id: int, state: str, age: float, **values) -> int:
    """An image in ``state`` whose last progress was ``age`` seconds ago."""
    with session_scope(settings) as session:
        product = Product(external_id=f"p-{time.time_ns()}")
        session.add(product)
        session.flush()
        image = Image(
            product_id=product.id,
            url=f"http://example.com/{product.id}.jpg",
            url_hash=str(product.id),
            run_id=run_id,
            state=state,
            updated_at=utcnow() - timedelta(seconds=age),
            **values,
        )
        session.add(image)
        session.flush()
        return image.id


def _queued_batches(settings: Settings, queue: str) -> list[list[int]]:
    """The first argument of each message waiting in ``queue`` (a batch of ids, or the run id
    of a final task), oldest first."""
    client = redis.Redis.from_url(settings.broker_url or "")
    raw = client.lrange(settings.broker_prefix + queue, 0, -1)
    batches = []
    for message in reversed(raw):
        args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(message)["body"]))
        batches.append(args[0])
    return batches


@pytest.mark.services
def test_stalled_images_are_sent_again_and_fresh_ones_left_alone(settings):
    run_id = _run(settings)
    stalled = _image(settings, run_id, "queued", age=3 * LEASE)
    fresh = _image(settings, run_id, "queued", age=LEASE / 5)  # its message may still travel
    waiting = _image(settings, run_id, "downloaded", age=3 * LEASE)
    report = reconcile_once(settings)
    assert report.requeued == {"download": 1, "analyze": 1}
    assert _queued_batches(settings, "download") == [[stalled]]
    assert _queued_batches(settings, "gpu") == [[waiting]]
    # Sent again means progress: the next pass leaves them alone for a lease.
    again = reconcile_once(settings)
    assert sum(again.requeued.values()) == 0
    assert fresh not in {i for b in _queued_batches(settings, "download") for i in b}


@pytest.mark.services
def test_an_older_message_still_waiting_holds_the_reconciler_back(settings):
    """A queue is first in, first out: an image recorded after the oldest waiting message may
    still be behind it, so only images older than that message count as lost."""
    run_id = _run(settings)
    behind = _image(settings, run_id, "queued", age=20)
    lost = _image(settings, run_id, "queued", age=60)
    get_app(settings).send_task(
        DOWNLOAD_TASK, args=[[999_999]], headers={ENQUEUED_AT_HEADER: time.time() - 30}
    )
    report = reconcile_once(settings)
    assert report.requeued["download"] == 1
    assert _queued_batches(settings, "download") == [[999_999], [lost]]
    assert behind not in _queued_batches(settings, "download")[-1]


@pytest.mark.services
def test_images_out_of_attempts_fail_with_their_last_error_and_the_run_finishes(settings):
    run_id = _run(settings)
    spent = _image(
        settings, run_id, "queued", age=3 * LEASE, stage_attempts=3, last_error="boom: x"
    )
    retried = _image(settings, run_id, "queued", age=3 * LEASE, stage_attempts=2)
    report = reconcile_once(settings)
    assert report.exhausted == 1 and report.requeued["download"] == 1
    # An image whose earlier attempts died goes out in a smaller batch (halved per attempt).
    assert _queued_batches(settings, "download") == [[retried]]
    with session_scope(settings) as session:
        image = session.get(Image, spent)
        assert (image.state, image.failure_reason) == ("failed", "attempts_exhausted")
        assert image.failure_detail == (
            "download not finished after 3 attempts; last error: boom: x"
        )
        session.execute(
            Image.__table__.update().where(Image.id == retried).values(state="analyzed")
        )
    report = reconcile_once(settings)
    assert report.runs_closed == [run_id]
    with session_scope(settings) as session:
        run = session.get(IngestRun, run_id)
        assert (run.status, run.finalize_status) == ("done", "queued")
    assert _queued_batches(settings, "gpu") == [run_id]  # its one final task (args: run id)


@pytest.mark.services
def test_a_producer_that_died_mid_feed_hands_its_rows_on(settings):
    dead = _run(settings, status="running", updated_at=utcnow() - timedelta(seconds=3 * LEASE))
    alive = _run(settings, status="running", updated_at=utcnow())
    report = reconcile_once(settings)
    assert report.producers_lost == [dead]
    assert report.runs_closed == [dead]  # it recorded nothing that still needs work
    with session_scope(settings) as session:
        assert session.get(IngestRun, alive).status == "running"
        assert "producer stopped" in session.get(IngestRun, dead).error


@pytest.mark.services
def test_a_final_task_is_claimed_once_and_re_driven_when_its_worker_dies(settings):
    run_id = _run(settings, status="done", finalize_status="queued", updated_at=utcnow())
    wins: list[bool] = []
    barrier = threading.Barrier(6)

    def claim() -> None:
        barrier.wait()
        wins.append(claim_finalize(settings, run_id))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 5 + [True]
    assert reconcile_once(settings).finalize_redriven == []  # its holder is alive (fresh)
    with session_scope(settings) as session:  # ... until its heartbeat stops for a lease
        session.get(IngestRun, run_id).updated_at = utcnow() - timedelta(seconds=3 * LEASE)
    assert reconcile_once(settings).finalize_redriven == [run_id]
    assert _queued_batches(settings, "gpu") == [run_id]
    assert claim_finalize(settings, run_id)  # the re-sent task may claim it


@pytest.mark.services
def test_an_index_build_whose_builder_died_is_claimed_again(settings):
    with session_scope(settings) as session:
        version = ModelVersion(kind="embedder", name="m", version="v1", active=True)
        session.add(version)
        session.flush()
        build = IndexBuild(
            model_version_id=version.id,
            status="building",
            params={"up_to_crop_id": 0},
            updated_at=utcnow() - timedelta(seconds=3 * LEASE),
        )
        session.add(build)
        session.flush()
        build_id, version_id = build.id, version.id
    assert reconcile_once(settings).builds_redriven == [build_id]
    with session_scope(settings) as session:
        assert session.get(IndexBuild, build_id).status == "pending"
    # No crop is missing its embedding: one empty batch lets a worker claim and build.
    client = redis.Redis.from_url(settings.broker_url or "")
    raw = client.lrange(settings.broker_prefix + "gpu", 0, -1)
    args = json.loads(base64.b64decode(json.loads(raw[0])["body"]))[0]
    assert args == [[], version_id]


@pytest.mark.services
def test_operator_sees_stuck_images_and_retries_them(settings):
    run_id = _run(settings)
    stuck = _image(settings, run_id, "queued", age=3 * LEASE)
    env = {f"FLICKD_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v}
    env["FLICKD_ALLOWED_NETWORKS"] = ",".join(settings.allowed_networks)
    runner = CliRunner()
    status = runner.invoke(main, ["status", str(run_id)], env=env)
    assert status.exit_code == 0, status.output
    assert "stuck queued" in status.output and "retry --stuck" in status.output
    # An older message waits in the queue: the reconciler would wait; the operator need not.
    get_app(settings).send_task(
        DOWNLOAD_TASK, args=[[999_999]], headers={ENQUEUED_AT_HEADER: time.time() - 60}
    )
    result = runner.invoke(main, ["retry", "--stuck"], env=env)
    assert result.exit_code == 0, result.output
    assert "re-enqueued 1 stuck download" in result.output
    assert _queued_batches(settings, "download")[-1] == [stuck]


def test_reconcile_by_hand_in_embedded_mode(tmp_path):
    result = CliRunner().invoke(
        main, ["reconcile", "--json"], env={"FLICKD_DATA_DIR": str(tmp_path / "data")}
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped"] is False and report["requeued_download"] == 0


def test_scheduler_refuses_embedded_mode(tmp_path):
    result = CliRunner().invoke(
        main, ["scheduler"], env={"FLICKD_DATA_DIR": str(tmp_path / "data")}
    )
    assert result.exit_code != 0 and "embedded mode needs no scheduler" in result.output


@pytest.mark.services
def test_metrics_show_the_oldest_pending_image_and_what_the_reconciler_did(settings):
    from flickd.services.metrics import render_metrics
    from tests.test_metrics import by_label, parse_metrics

    run_id = _run(settings)
    _image(settings, run_id, "queued", age=3 * LEASE)
    _image(settings, run_id, "downloaded", age=1)
    before = parse_metrics(render_metrics(settings).decode())
    oldest = by_label(before, "flickd_oldest_pending_seconds", "state")
    assert oldest["queued"] >= 3 * LEASE and 0 < oldest["downloaded"] < LEASE
    assert by_label(before, "flickd_stuck_images", "state") == {"queued": 1, "downloaded": 0}
    reconcile_once(settings)
    after = parse_metrics(render_metrics(settings).decode())
    done = by_label(after, "flickd_reconciler_total", "action")
    assert done["requeued_download"] == 1 and done["exhausted"] == 0
    assert by_label(after, "flickd_stuck_images", "state")["queued"] == 0  # sent again: progress


@pytest.mark.services
def test_reprocessing_starts_the_attempts_of_analysis_afresh(settings):
    from workers.control import reprocess

    run_id = _run(settings, status="done")
    image_id = _image(settings, run_id, "analyzed", age=1, stage_attempts=5, last_error="old")
    assert reprocess(settings, all_analyzed=True).images == 1
    with session_scope(settings) as session:
        image = session.get(Image, image_id)
        # Five earlier deliveries must not make the new round fail as attempts_exhausted.
        assert (image.state, image.stage_attempts, image.last_error) == ("downloaded", 0, None)
