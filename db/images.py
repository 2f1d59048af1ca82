"""State transitions of images, guarded so that a repeated task changes nothing twice."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, String, bindparam, update

from db.schema import PENDING_STATES, Image, ImageState, utcnow
from db.sql import id_in
from flickd.core.reasons import FailureReason


def transition(
    conn: Connection, from_state: str, rows: Sequence[dict[str, Any]], **values: Any
) -> None:
    """For each row (``b_id`` plus the bind parameters ``values`` name), set ``values`` on the
    image if it is still in ``from_state``: a batch delivered twice writes once."""
    if not rows:
        return
    table = Image.__table__
    guard = (table.c.id == bindparam("b_id")) & (table.c.state == from_state)
    conn.execute(update(table).where(guard).values(updated_at=utcnow(), **values), list(rows))


def record_failures(
    conn: Connection, from_state: str, failures: Sequence[tuple[int, str, str | None, int]]
) -> None:
    """``(image_id, reason, detail, attempts made)`` per failed image."""
    table = Image.__table__
    transition(
        conn,
        from_state,
        [{"b_id": i, "b_reason": r, "b_detail": d, "b_attempts": a} for i, r, d, a in failures],
        state=ImageState.FAILED.value,
        failure_reason=bindparam("b_reason"),
        failure_detail=bindparam("b_detail"),
        attempts=table.c.attempts + bindparam("b_attempts"),
    )


# --- claims and leases ---------------------------------------------------------------------------
# A stage *claims* the images of its batch before it works on them: the claim counts the attempt
# and stamps the image's progress time, which the worker renews (a heartbeat) while it works. The
# reconciler re-drives a pending image whose progress time is older than the lease, so a live
# worker's images are left alone and a dead worker's come back within one lease.
STAGE_OF_STATE = {ImageState.QUEUED.value: "download", ImageState.DOWNLOADED.value: "analyze"}


def exhausted_detail(state: str, attempts: Any, last_error: Any) -> Any:
    """The failure detail of an image whose stage never finished (a SQL expression)."""
    from sqlalchemy import cast, func, literal

    stage = STAGE_OF_STATE.get(state, state)
    return func.substr(
        literal(f"{stage} not finished after ")
        + cast(attempts, String)
        + literal(" attempts; last error: ")
        + func.coalesce(last_error, literal("none recorded (worker lost or message lost)")),
        1,
        1000,
    )


def claim(conn: Connection, image_ids: Sequence[int], state: str, max_attempts: int) -> list[int]:
    """Claim the images of ``image_ids`` still in ``state`` for one more attempt of its stage;
    return their ids. Images that already used ``max_attempts`` fail instead, with reason
    ``attempts_exhausted``: a stage that kills its worker (a poison image, a broken model)
    cannot be re-driven forever."""
    from sqlalchemy import select

    if not image_ids:
        return []
    table = Image.__table__
    now = utcnow()
    pending = id_in(conn, table.c.id, image_ids) & (table.c.state == state)
    conn.execute(
        update(table)
        .where(pending, table.c.stage_attempts >= max_attempts)
        .values(
            state=ImageState.FAILED.value,
            failure_reason=FailureReason.ATTEMPTS_EXHAUSTED.value,
            failure_detail=exhausted_detail(state, table.c.stage_attempts, table.c.last_error),
            updated_at=now,
        )
    )
    conn.execute(
        update(table)
        .where(pending)
        .values(stage_attempts=table.c.stage_attempts + 1, updated_at=now)
    )
    return list(conn.scalars(select(table.c.id).where(pending).order_by(table.c.id)))


def renew(conn: Connection, image_ids: Sequence[int], state: str) -> None:
    """The heartbeat of a worker holding these images: their lease starts again now."""
    table = Image.__table__
    conn.execute(
        update(table)
        .where(id_in(conn, table.c.id, image_ids), table.c.state == state)
        .values(updated_at=utcnow())
    )


def record_error(conn: Connection, image_ids: Sequence[int], state: str, error: str) -> None:
    """Why an attempt at these (still pending) images did not finish; shown once they fail."""
    table = Image.__table__
    conn.execute(
        update(table)
        .where(id_in(conn, table.c.id, image_ids), table.c.state == state)
        .values(last_error=error[:1000])
    )


def fail_exhausted(conn: Connection, state: str, before: datetime, max_attempts: int) -> list[Any]:
    """Stalled images of ``state`` that used up their attempts fail (attempts_exhausted);
    returns the runs they belong to (one of them may be complete now)."""
    table = Image.__table__
    rows = conn.execute(
        update(table)
        .where(
            table.c.state == state,
            table.c.updated_at < before,
            table.c.stage_attempts >= max_attempts,
        )
        .values(
            state=ImageState.FAILED.value,
            failure_reason=FailureReason.ATTEMPTS_EXHAUSTED.value,
            failure_detail=exhausted_detail(state, table.c.stage_attempts, table.c.last_error),
            updated_at=utcnow(),
        )
        .returning(table.c.run_id)
    ).all()
    return [row.run_id for row in rows]


def take_stalled(conn: Connection, state: str, before: datetime, limit: int) -> list[Any]:
    """Up to ``limit`` images of ``state`` whose last progress is older than ``before``, oldest
    first, with their stage attempts so far. Their progress time is stamped now, so the next
    pass leaves them alone for a lease while their new message travels. Rows another pass has
    locked are skipped (``FOR UPDATE SKIP LOCKED`` on Postgres)."""
    from sqlalchemy import select

    table = Image.__table__
    query = (
        select(table.c.id, table.c.stage_attempts)
        .where(table.c.state == state, table.c.updated_at < before)
        .order_by(table.c.updated_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = conn.execute(query).all()
    ids = [row.id for row in rows]
    for start in range(0, len(ids), 5000):
        conn.execute(
            update(table)
            .where(table.c.id.in_(ids[start : start + 5000]), table.c.state == state)
            .values(updated_at=utcnow())
        )
    return list(rows)


def stalled_counts(
    conn: Connection, before: datetime, run_id: int | None = None
) -> dict[str, tuple[int, datetime | None]]:
    """Per pending state (of one run, or all): how many images made no progress since
    ``before``, and the oldest progress time among its pending images (status, metrics)."""
    from sqlalchemy import case, func, select

    table = Image.__table__
    query = (
        select(
            table.c.state,
            func.sum(case((table.c.updated_at < before, 1), else_=0)),
            func.min(table.c.updated_at),
        )
        .where(table.c.state.in_(PENDING_STATES))
        .group_by(table.c.state)
    )
    if run_id is not None:
        query = query.where(table.c.run_id == run_id)
    rows = conn.execute(query).all()
    return {row[0]: (int(row[1] or 0), row[2]) for row in rows}
