"""Stored video results and video jobs in Postgres (db/videos.py): keyed rows, claims that one
delivery wins, tokens that keep a superseded holder from writing, bounded attempts, and the
reconciler's view of stalled jobs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from db import videos
from db.schema import ModelVersion, VideoSearchJob, utcnow
from db.session import session_scope
from flickd.core.settings import Settings

SHA = "ab" * 32
RESULT = {"kind": "video", "products": [{"product_id": "p1"}]}


@pytest.fixture()
def version_id(pg_settings: Settings) -> int:
    with session_scope(pg_settings) as session:
        row = ModelVersion(kind="embedder", name="clip", version="v1", active=True)
        session.add(row)
        session.flush()
        return row.id


def _request(settings: Settings, version_id: int, top_k: int = 5) -> videos.JobRequest:
    with session_scope(settings) as session:
        return videos.request_job(session, SHA, version_id, top_k, SHA, 42.0)


def _claim(settings: Settings, job_id: int, lease: float = 60) -> videos.ClaimedJob | None:
    with session_scope(settings) as session:
        return videos.claim_job(session.connection(), job_id, settings.max_stage_attempts, lease)


def _view(settings: Settings, job_id: int) -> videos.JobView:
    with session_scope(settings) as session:
        view = videos.job_view(session, job_id)
    assert view is not None
    return view


def _age(settings: Settings, job_id: int, seconds: float) -> None:
    with session_scope(settings) as session:
        session.execute(
            update(VideoSearchJob)
            .where(VideoSearchJob.id == job_id)
            .values(updated_at=utcnow() - timedelta(seconds=seconds))
        )


def test_a_request_is_one_row_and_one_message_however_often_it_is_asked(pg_settings, version_id):
    first = _request(pg_settings, version_id)
    again = _request(pg_settings, version_id)
    assert first.send and first.status == "queued"
    assert (again.job_id, again.status, again.send) == (first.job_id, "queued", False)
    other_k = _request(pg_settings, version_id, top_k=3)
    assert other_k.job_id != first.job_id and other_k.send
    with session_scope(pg_settings) as session:
        assert videos.count_jobs(session, SHA) == 2
        assert videos.stored_result(session, SHA, version_id, 5) is None


def test_one_claim_wins_and_only_its_holder_writes_the_outcome(pg_settings, version_id):
    job_id = _request(pg_settings, version_id).job_id
    held = _claim(pg_settings, job_id)
    assert held is not None and held.token == 1 and held.blob_key == SHA
    assert _claim(pg_settings, job_id) is None  # a second delivery while the holder is alive
    with session_scope(pg_settings) as session:
        assert videos.renew_job(session.connection(), held, 0.5)
    assert _view(pg_settings, job_id).progress == 0.5
    # The holder's heartbeat stops: past the lease another delivery takes the job over.
    _age(pg_settings, job_id, 120)
    successor = _claim(pg_settings, job_id)
    assert successor is not None and successor.token == 2
    with session_scope(pg_settings) as session:
        conn = session.connection()
        assert not videos.finish_job(conn, held, {"stale": True})  # superseded: writes nothing
        assert not videos.renew_job(conn, held, 0.9)
        assert videos.finish_job(conn, successor, RESULT)
        assert not videos.finish_job(conn, successor, {"twice": True})
    view = _view(pg_settings, job_id)
    assert (view.status, view.progress, view.result) == ("done", 1.0, RESULT)
    with session_scope(pg_settings) as session:
        assert videos.stored_result(session, SHA, version_id, 5) == RESULT
    again = _request(pg_settings, version_id)
    assert (again.job_id, again.status, again.send) == (job_id, "done", False)


def test_attempts_are_bounded_and_the_last_error_is_the_detail(pg_settings, version_id):
    settings = pg_settings.model_copy(update={"max_stage_attempts": 2})
    job_id = _request(settings, version_id).job_id
    for _ in range(2):
        held = _claim(settings, job_id)
        assert held is not None
        with session_scope(settings) as session:
            assert videos.release_job(session.connection(), held, "RuntimeError: boom")
    assert _claim(settings, job_id) is None
    view = _view(settings, job_id)
    assert (view.status, view.reason) == ("failed", "attempts_exhausted")
    assert "after 2 attempts" in (view.detail or "") and "boom" in (view.detail or "")
    # Asking again starts the failed job afresh.
    again = _request(settings, version_id)
    assert (again.job_id, again.status, again.send) == (job_id, "queued", True)
    assert _view(settings, job_id).reason is None
    assert _claim(settings, job_id) is not None


def test_a_failed_video_keeps_its_reason(pg_settings, version_id):
    job_id = _request(pg_settings, version_id).job_id
    held = _claim(pg_settings, job_id)
    assert held is not None
    with session_scope(pg_settings) as session:
        assert videos.fail_job(session.connection(), held, "no_decodable_frames", "nothing")
    view = _view(pg_settings, job_id)
    assert (view.status, view.reason, view.detail) == ("failed", "no_decodable_frames", "nothing")


def test_stalled_jobs_are_taken_back_and_exhausted_ones_fail(pg_settings, version_id):
    fresh = _request(pg_settings, version_id, top_k=1).job_id
    lost = _request(pg_settings, version_id, top_k=2).job_id
    dead = _request(pg_settings, version_id, top_k=3).job_id
    spent = _request(pg_settings, version_id, top_k=4).job_id
    assert _claim(pg_settings, dead) is not None
    with session_scope(pg_settings) as session:
        session.execute(
            update(VideoSearchJob)
            .where(VideoSearchJob.id == spent)
            .values(attempts=pg_settings.max_stage_attempts, status="running")
        )
    for job_id in (lost, dead, spent):
        _age(pg_settings, job_id, 120)
    before = utcnow() - timedelta(seconds=60)
    with session_scope(pg_settings) as session:
        conn = session.connection()
        assert videos.fail_exhausted_jobs(conn, before, pg_settings.max_stage_attempts) == [spent]
        assert sorted(videos.take_stalled_jobs(conn, before, 100)) == sorted([lost, dead])
        # Stamped now: the next pass leaves them alone while their new message travels.
        assert videos.take_stalled_jobs(conn, before, 100) == []
    assert _view(pg_settings, dead).status == "queued"
    assert _view(pg_settings, fresh).status == "queued"
    assert _view(pg_settings, spent).reason == "attempts_exhausted"
    assert _claim(pg_settings, dead) is not None  # the re-driven job can be claimed again


def test_a_result_computed_in_the_request_is_stored_done(pg_settings, version_id):
    with session_scope(pg_settings) as session:
        job_id = videos.store_result(session, SHA, version_id, 5, RESULT, 3.0)
    with session_scope(pg_settings) as session:
        # Stored twice (two concurrent requests): still one row, still the first result.
        assert videos.store_result(session, SHA, version_id, 5, {"other": 1}, 3.0) == job_id
    with session_scope(pg_settings) as session:
        assert videos.stored_result(session, SHA, version_id, 5) == RESULT
        assert videos.count_jobs(session) == 1
    assert _view(pg_settings, job_id).status == "done"


def test_the_reconciler_sends_a_stalled_job_again_by_task_name(pg_settings, version_id):
    import base64
    import json

    import redis

    from workers.reconcile import reconcile_once

    settings = pg_settings.model_copy(update={"lease_seconds": 5})
    stalled = _request(settings, version_id, top_k=1).job_id
    waiting = _request(settings, version_id, top_k=2).job_id  # its message is still on its way
    _age(settings, stalled, 30)
    report = reconcile_once(settings)
    assert (report.video_jobs_redriven, report.video_jobs_exhausted) == ([stalled], [])
    client = redis.Redis.from_url(settings.broker_url or "")
    messages = [json.loads(m) for m in client.lrange(settings.broker_prefix + "gpu", 0, -1)]
    assert [m["headers"]["task"] for m in messages] == ["flickd.video_search"]
    assert json.loads(base64.b64decode(messages[0]["body"]))[0] == [stalled]
    assert _view(settings, waiting).status == "queued"
    assert reconcile_once(settings).video_jobs_redriven == []  # stamped: left alone a lease
