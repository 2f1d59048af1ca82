"""Queries about ingest runs: progress, failures, completion, retry."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from db.schema import (
    FinalizeStatus,
    Image,
    ImageState,
    IngestRun,
    Product,
    RunStatus,
    utcnow,
)
from flickd.core.settings import Settings


def terminal_states(last_stage: str) -> tuple[str, ...]:
    """States in which an image needs no more work, given the pipeline's last stage."""
    if last_stage == "download":
        return (ImageState.DOWNLOADED.value, ImageState.ANALYZED.value, ImageState.FAILED.value)
    return (ImageState.ANALYZED.value, ImageState.FAILED.value)


def finish_run_if_complete(session: Session, run_id: int, last_stage: str) -> bool:
    """Mark the run done once the producer finished and no image of it still needs work.

    A single conditional UPDATE, so of many workers finishing at once exactly one sees
    rowcount == 1: that one may start the run's follow-up work.
    """
    pending = exists().where(
        and_(Image.run_id == run_id, Image.state.not_in(terminal_states(last_stage)))
    )
    result = cast(
        "CursorResult[Any]",
        session.execute(
            update(IngestRun)
            .where(IngestRun.id == run_id, IngestRun.status == RunStatus.ENQUEUED.value, ~pending)
            .values(status=RunStatus.DONE.value, finished_at=utcnow())
            .execution_options(synchronize_session=False)
        ),
    )
    return result.rowcount == 1


def close_runs(settings: Settings, run_ids: Iterable[int | None]) -> list[int]:
    """Close every run of ``run_ids`` whose images are all terminal; return the runs *this*
    caller closed. When a final task is due, each closed run is marked for it in the same
    transaction, so the caller must send it (and a reconciler finds it if that send is lost)."""
    from db.session import session_scope

    closed = []
    for run_id in sorted({r for r in run_ids if r is not None}):
        with session_scope(settings) as session:
            if finish_run_if_complete(session, run_id, settings.last_stage):
                if settings.finalize_enabled:
                    session.execute(
                        update(IngestRun)
                        .where(IngestRun.id == run_id)
                        .values(finalize_status=FinalizeStatus.QUEUED.value, updated_at=utcnow())
                    )
                closed.append(run_id)
    return closed


def touch_run(session: Session, run_id: int | None, finalize_status: str | None = None) -> None:
    """The heartbeat of whoever holds the run: its producer, or (with ``finalize_status``) the
    final task holding that claim."""
    if run_id is None:
        return
    query = update(IngestRun).where(IngestRun.id == run_id)
    if finalize_status is not None:
        query = query.where(IngestRun.finalize_status == finalize_status)
    session.execute(query.values(updated_at=utcnow()).execution_options(synchronize_session=False))


def finalize_claimable(settings: Settings) -> Any:
    """Runs whose final task may be claimed now: queued, or failed, or held by a task whose
    heartbeat stopped more than a lease ago, and not yet out of attempts."""
    expired = utcnow() - timedelta(seconds=settings.lease_seconds)
    run = IngestRun
    return and_(
        run.status == RunStatus.DONE.value,
        run.finalize_attempts < settings.max_stage_attempts,
        or_(
            run.finalize_status.in_([FinalizeStatus.QUEUED.value, FinalizeStatus.FAILED.value]),
            and_(
                run.finalize_status == FinalizeStatus.RUNNING.value,
                or_(run.updated_at.is_(None), run.updated_at < expired),
            ),
        ),
    )


def claim_finalize(settings: Settings, run_id: int) -> bool:
    """Claim the run's final task for this caller; False when another holds it or it is done.
    One conditional UPDATE: of concurrent deliveries exactly one wins."""
    from db.session import session_scope

    with session_scope(settings) as session:
        result = cast(
            "CursorResult[Any]",
            session.execute(
                update(IngestRun)
                .where(IngestRun.id == run_id, finalize_claimable(settings))
                .values(
                    finalize_status=FinalizeStatus.RUNNING.value,
                    finalize_attempts=IngestRun.finalize_attempts + 1,
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            ),
        )
    return result.rowcount == 1


@dataclass
class RunProgress:
    run_id: int
    feed: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    rows_read: int
    accepted: int
    invalid: int
    duplicates_in_feed: int
    already_known: int
    enqueued: int
    invalid_by_reason: dict[str, Any]
    images_by_state: dict[str, int] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    images_per_second: float | None = None
    # Pending images with no progress for longer than the lease, per state: their messages
    # were lost or their workers died; the reconciler re-drives them.
    stuck_by_state: dict[str, int] = field(default_factory=dict)
    finalize_status: str | None = None
    error: str | None = None
    # Catalog sync: full or delta, products created/updated/unchanged/delisted/relisted, and
    # why a full feed's delisting was refused.
    full_feed: bool = False
    products: dict[str, int] = field(default_factory=dict)
    sync_refused: str | None = None

    @property
    def images_total(self) -> int:
        return sum(self.images_by_state.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("created_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        data["images_total"] = self.images_total
        return data


def latest_run_id(session: Session) -> int | None:
    return session.scalar(select(func.max(IngestRun.id)))


def run_progress(
    session: Session, run_id: int, lease_seconds: int | None = None
) -> RunProgress | None:
    """The run's counters and its images per state (with ``lease_seconds``, also how many
    pending images are stuck: no progress for longer than the lease)."""
    run = session.get(IngestRun, run_id)
    if run is None:
        return None
    by_state = dict(
        session.execute(
            select(Image.state, func.count()).where(Image.run_id == run_id).group_by(Image.state)
        ).all()
    )
    by_reason = dict(
        session.execute(
            select(Image.failure_reason, func.count())
            .where(Image.run_id == run_id, Image.state == ImageState.FAILED.value)
            .group_by(Image.failure_reason)
        ).all()
    )
    done = sum(n for state, n in by_state.items() if state != ImageState.QUEUED.value)
    end = run.finished_at or utcnow()
    start = run.created_at
    elapsed = (_aware(end) - _aware(start)).total_seconds()
    rate = done / elapsed if elapsed > 0 else None
    return RunProgress(
        run_id=run.id,
        feed=run.feed,
        status=run.status,
        created_at=run.created_at,
        finished_at=run.finished_at,
        rows_read=run.rows_read,
        accepted=run.accepted,
        invalid=run.invalid,
        duplicates_in_feed=run.duplicates_in_feed,
        already_known=run.already_known,
        enqueued=run.enqueued,
        invalid_by_reason=dict(run.invalid_by_reason or {}),
        images_by_state=by_state,
        failures_by_reason={str(k): v for k, v in by_reason.items()},
        images_per_second=rate,
        stuck_by_state=_stuck(session, run_id, lease_seconds),
        finalize_status=run.finalize_status,
        error=run.error,
        full_feed=run.full_feed,
        products={
            name: getattr(run, f"products_{name}")
            for name in ("created", "updated", "unchanged", "delisted", "relisted")
        },
        sync_refused=run.sync_refused,
    )


def _stuck(session: Session, run_id: int, lease_seconds: int | None) -> dict[str, int]:
    from db.images import stalled_counts

    if lease_seconds is None:
        return {}
    before = utcnow() - timedelta(seconds=lease_seconds)
    counts = stalled_counts(session.connection(), before, run_id)
    return {state: stuck for state, (stuck, _) in counts.items() if stuck}


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    from datetime import UTC

    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def failures(
    session: Session, run_id: int | None, reason: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    query = (
        select(
            Image.id,
            Image.url,
            Product.external_id,
            Image.failure_reason,
            Image.failure_detail,
            Image.attempts,
        )
        .join(Product, Product.id == Image.product_id)
        .where(Image.state == ImageState.FAILED.value)
        .order_by(Image.id)
    )
    if run_id is not None:
        query = query.where(Image.run_id == run_id)
    if reason:
        query = query.where(Image.failure_reason == reason)
    if limit:
        query = query.limit(limit)
    return [
        {
            "image_id": row.id,
            "url": row.url,
            "product_id": row.external_id,
            "reason": row.failure_reason,
            "detail": row.failure_detail,
            "attempts": row.attempts,
        }
        for row in session.execute(query)
    ]


def reset_failed(session: Session, run_id: int | None, reason: str | None) -> list[int]:
    """Put failed images back to ``queued`` and return their ids (for re-enqueueing).

    The run they belong to goes back to ``enqueued`` so that it finishes again."""
    query = select(Image.id).where(Image.state == ImageState.FAILED.value)
    if run_id is not None:
        query = query.where(Image.run_id == run_id)
    if reason:
        query = query.where(Image.failure_reason == reason)
    ids = list(session.scalars(query.order_by(Image.id)))
    run_ids = set(session.scalars(query.with_only_columns(Image.run_id).distinct()))
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        session.execute(
            update(Image)
            .where(Image.id.in_(chunk), Image.state == ImageState.FAILED.value)
            .values(
                state=ImageState.QUEUED.value,
                failure_reason=None,
                failure_detail=None,
                stage_attempts=0,
                last_error=None,
                updated_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
    run_ids.discard(None)
    if run_ids:
        session.execute(
            update(IngestRun)
            .where(IngestRun.id.in_(run_ids))
            .where(IngestRun.status == RunStatus.DONE.value)
            .values(status=RunStatus.ENQUEUED.value, finished_at=None)
            .execution_options(synchronize_session=False)
        )
    return ids


def wait_for_run(settings: Settings, run_id: int, timeout: float = 120, poll: float = 0.3) -> str:
    """Poll until the run is finished (done, failed or cancelled); return its status."""
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        with session_scope(settings) as session:
            status = session.scalar(select(IngestRun.status).where(IngestRun.id == run_id))
        if status in (RunStatus.DONE, RunStatus.FAILED, RunStatus.CANCELLED):
            return str(status)
        time.sleep(poll)
    raise TimeoutError(f"run {run_id} still {status} after {timeout}s")
