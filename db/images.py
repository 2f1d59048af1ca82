"""State transitions of images, guarded so that a repeated task changes nothing twice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, update

from db.schema import Image, ImageState, utcnow


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
