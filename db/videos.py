"""Video searches: stored results, and the jobs that make them (claims, heartbeats, bounds).

A row of ``video_search_jobs`` is keyed by (video SHA-256, model version, top_k): asking again
for the same clip under the same index is answered from the row. A long clip's row is also its
job, durable like an image's stage (ARCHITECTURE.md, "Work that finishes by itself"):

* a worker *claims* the job (one conditional UPDATE: of any number of deliveries exactly one
  wins), which counts the attempt; the attempt number is the holder's token, so only the
  current holder can report progress, finish or fail it;
* the holder renews ``updated_at`` while it works; a job whose heartbeat stopped for longer
  than the lease is taken back by the reconciler (``take_stalled_jobs``) and sent again;
* past FLICKD_MAX_STAGE_ATTEMPTS claims it fails with ``attempts_exhausted`` and the last error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.images import exhausted_detail
from db.schema import VIDEO_JOB_PENDING, VideoJobStatus, VideoSearchJob, utcnow
from db.versions import dialect_insert
from flickd.core.reasons import FailureReason

JOBS = VideoSearchJob.__table__


@dataclass(frozen=True)
class JobView:
    """What the status endpoint reports about a job."""

    job_id: int
    status: str
    progress: float
    result: dict[str, Any] | None
    reason: str | None
    detail: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "progress": self.progress,
            "result": self.result,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class JobRequest:
    """The outcome of asking for a video search: the row's id and status, and whether the
    caller must send the job's message (after its commit)."""

    job_id: int
    status: str
    send: bool


def _key(sha256: str, model_version_id: int, top_k: int) -> Any:
    return and_(
        JOBS.c.sha256 == sha256,
        JOBS.c.model_version_id == model_version_id,
        JOBS.c.top_k == top_k,
    )


def stored_result(
    session: Session, sha256: str, model_version_id: int, top_k: int
) -> dict[str, Any] | None:
    """The stored result of this video under this model version, if one is done."""
    return session.scalar(
        select(JOBS.c.result).where(
            _key(sha256, model_version_id, top_k), JOBS.c.status == VideoJobStatus.DONE.value
        )
    )


def store_result(
    session: Session,
    sha256: str,
    model_version_id: int,
    top_k: int,
    result: dict[str, Any],
    duration_s: float | None,
) -> int:
    """Record a result computed in the request (a short clip): the row is ``done`` at once.
    A row already done is left as it is (the same video, the same models: the same answer)."""
    conn = session.connection()
    now = utcnow()
    values = {
        "status": VideoJobStatus.DONE.value,
        "progress": 1.0,
        "result": result,
        "reason": None,
        "detail": None,
        "duration_s": duration_s,
        "updated_at": now,
        "finished_at": now,
    }
    stmt = dialect_insert(conn)(JOBS).values(
        sha256=sha256,
        model_version_id=model_version_id,
        top_k=top_k,
        attempts=0,
        created_at=now,
        **values,
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["sha256", "model_version_id", "top_k"],
            set_=values,
            where=JOBS.c.status != VideoJobStatus.DONE.value,
        )
    )
    return int(
        conn.execute(select(JOBS.c.id).where(_key(sha256, model_version_id, top_k))).scalar_one()
    )


def request_job(
    session: Session,
    sha256: str,
    model_version_id: int,
    top_k: int,
    blob_key: str,
    duration_s: float | None,
) -> JobRequest:
    """The job for this video: a new one (queued), the one already pending or done, or a
    failed one started afresh (asking again is a retry, as ``flickd retry`` is for images).
    ``send`` is True when a message must go out: for a new or restarted job only; a pending
    job that lost its message is the reconciler's to re-drive."""
    conn = session.connection()
    now = utcnow()
    inserted = conn.scalar(
        dialect_insert(conn)(JOBS)
        .values(
            sha256=sha256,
            model_version_id=model_version_id,
            top_k=top_k,
            status=VideoJobStatus.QUEUED.value,
            progress=0.0,
            attempts=0,
            blob_key=blob_key,
            duration_s=duration_s,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["sha256", "model_version_id", "top_k"])
        .returning(JOBS.c.id)
    )
    if inserted is not None:
        return JobRequest(int(inserted), VideoJobStatus.QUEUED.value, send=True)
    restarted = conn.scalar(
        update(JOBS)
        .where(_key(sha256, model_version_id, top_k), JOBS.c.status == VideoJobStatus.FAILED)
        .values(
            status=VideoJobStatus.QUEUED.value,
            progress=0.0,
            attempts=0,
            blob_key=blob_key,
            reason=None,
            detail=None,
            last_error=None,
            updated_at=now,
            finished_at=None,
        )
        .returning(JOBS.c.id)
    )
    if restarted is not None:
        return JobRequest(int(restarted), VideoJobStatus.QUEUED.value, send=True)
    row = conn.execute(
        select(JOBS.c.id, JOBS.c.status).where(_key(sha256, model_version_id, top_k))
    ).one()
    return JobRequest(int(row.id), str(row.status), send=False)


def job_view(session: Session, job_id: int) -> JobView | None:
    row = session.get(VideoSearchJob, job_id)
    if row is None:
        return None
    return JobView(row.id, row.status, row.progress, row.result, row.reason, row.detail)


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    token: int  # the attempt number: only this holder may write the job's outcome
    sha256: str
    model_version_id: int
    top_k: int
    blob_key: str | None


def _claimable(lease_seconds: float) -> Any:
    """Queued, or running under a holder whose heartbeat stopped more than a lease ago."""
    expired = utcnow() - timedelta(seconds=lease_seconds)
    return or_(
        JOBS.c.status == VideoJobStatus.QUEUED.value,
        and_(JOBS.c.status == VideoJobStatus.RUNNING.value, JOBS.c.updated_at < expired),
    )


def _exhausted_values() -> dict[str, Any]:
    now = utcnow()
    return {
        "status": VideoJobStatus.FAILED.value,
        "reason": FailureReason.ATTEMPTS_EXHAUSTED.value,
        "detail": exhausted_detail("video search", JOBS.c.attempts, JOBS.c.last_error),
        "updated_at": now,
        "finished_at": now,
    }


def claim_job(
    conn: Connection, job_id: int, max_attempts: int, lease_seconds: float
) -> ClaimedJob | None:
    """Claim the job for one more attempt; None when it is done, failed, or held by a live
    worker. A job that already used ``max_attempts`` fails instead (attempts_exhausted)."""
    mine = and_(JOBS.c.id == job_id, _claimable(lease_seconds))
    conn.execute(
        update(JOBS).where(mine, JOBS.c.attempts >= max_attempts).values(**_exhausted_values())
    )
    row = conn.execute(
        update(JOBS)
        .where(mine, JOBS.c.attempts < max_attempts)
        .values(
            status=VideoJobStatus.RUNNING.value, attempts=JOBS.c.attempts + 1, updated_at=utcnow()
        )
        .returning(
            JOBS.c.id,
            JOBS.c.attempts,
            JOBS.c.sha256,
            JOBS.c.model_version_id,
            JOBS.c.top_k,
            JOBS.c.blob_key,
        )
    ).one_or_none()
    if row is None:
        return None
    return ClaimedJob(
        row.id, row.attempts, row.sha256, row.model_version_id, row.top_k, row.blob_key
    )


def _held(job: ClaimedJob) -> Any:
    return and_(
        JOBS.c.id == job.job_id,
        JOBS.c.status == VideoJobStatus.RUNNING.value,
        JOBS.c.attempts == job.token,
    )


def renew_job(conn: Connection, job: ClaimedJob, progress: float | None = None) -> bool:
    """The holder's heartbeat, with its progress (0..1) when it has one to report. False when
    the job is no longer this holder's (another delivery took it over after a lost lease)."""
    values: dict[str, Any] = {"updated_at": utcnow()}
    if progress is not None:
        values["progress"] = min(1.0, max(0.0, progress))
    return _changed(conn.execute(update(JOBS).where(_held(job)).values(**values)))


def finish_job(conn: Connection, job: ClaimedJob, result: dict[str, Any]) -> bool:
    """Store the result; False (nothing written) when the job is not this holder's any more."""
    now = utcnow()
    return _changed(
        conn.execute(
            update(JOBS)
            .where(_held(job))
            .values(
                status=VideoJobStatus.DONE.value,
                progress=1.0,
                result=result,
                blob_key=None,
                updated_at=now,
                finished_at=now,
            )
        )
    )


def fail_job(conn: Connection, job: ClaimedJob, reason: str, detail: str) -> bool:
    """The video cannot be searched (a bad video, no index): the job fails for good."""
    now = utcnow()
    return _changed(
        conn.execute(
            update(JOBS)
            .where(_held(job))
            .values(
                status=VideoJobStatus.FAILED.value,
                reason=reason,
                detail=detail[:1000],
                updated_at=now,
                finished_at=now,
            )
        )
    )


def release_job(conn: Connection, job: ClaimedJob, error: str) -> bool:
    """An attempt that broke off (an unexpected error): the job goes back to ``queued`` with
    the error, and the reconciler sends it again after the lease (bounded by its attempts)."""
    return _changed(
        conn.execute(
            update(JOBS)
            .where(_held(job))
            .values(
                status=VideoJobStatus.QUEUED.value, last_error=error[:1000], updated_at=utcnow()
            )
        )
    )


def _changed(result: Any) -> bool:
    return bool(result.rowcount == 1)


# --- the reconciler ----------------------------------------------------------------------------
def _stalled(before: datetime) -> Any:
    return and_(JOBS.c.status.in_(VIDEO_JOB_PENDING), JOBS.c.updated_at < before)


def fail_exhausted_jobs(conn: Connection, before: datetime, max_attempts: int) -> list[int]:
    """Stalled jobs that used up their attempts fail (attempts_exhausted); returns their ids."""
    return list(
        conn.scalars(
            update(JOBS)
            .where(_stalled(before), JOBS.c.attempts >= max_attempts)
            .values(**_exhausted_values())
            .returning(JOBS.c.id)
        )
    )


def take_stalled_jobs(conn: Connection, before: datetime, limit: int) -> list[int]:
    """Up to ``limit`` pending jobs with no progress since ``before`` (their message was lost,
    or their worker died): put back to ``queued`` and stamped now, so the next pass leaves
    them alone for a lease while their new message travels. Rows another pass has locked are
    skipped (``FOR UPDATE SKIP LOCKED`` on Postgres)."""
    query = select(JOBS.c.id).where(_stalled(before)).order_by(JOBS.c.updated_at).limit(limit)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    ids = list(conn.scalars(query))
    if ids:
        conn.execute(
            update(JOBS)
            .where(JOBS.c.id.in_(ids), JOBS.c.status.in_(VIDEO_JOB_PENDING))
            .values(status=VideoJobStatus.QUEUED.value, updated_at=utcnow())
        )
    return ids


def count_jobs(session: Session, sha256: str | None = None) -> int:
    """Rows stored (for one video, or all): asking again must not add one."""
    query = select(func.count()).select_from(JOBS)
    if sha256 is not None:
        query = query.where(JOBS.c.sha256 == sha256)
    return int(session.scalar(query) or 0)
