"""Running totals of what the reconciler did, kept in the database so that every pass (from
whichever process) adds to the same numbers and the metrics read them from anywhere."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, select

from db.schema import ReconcilerCounter, utcnow
from db.versions import dialect_insert

# What a reconciler pass counts (workers/reconcile.py), each summed over every pass.
RECONCILER_ACTIONS = (
    "requeued_download",
    "requeued_analyze",
    "exhausted",
    "runs_closed",
    "producers_lost",
    "finalize_redriven",
    "builds_redriven",
    "rebuilds_requested",
    "video_jobs_redriven",
    "video_jobs_exhausted",
)


def add_counts(conn: Connection, counts: Mapping[str, int]) -> None:
    table = ReconcilerCounter.__table__
    now = utcnow()
    for name, value in counts.items():
        if not value:
            continue
        stmt = dialect_insert(conn)(table).values(name=name, value=value, updated_at=now)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["name"],
                set_={"value": table.c.value + stmt.excluded.value, "updated_at": now},
            )
        )


def read_counts(conn: Connection) -> dict[str, int]:
    table = ReconcilerCounter.__table__
    return {row.name: int(row.value) for row in conn.execute(select(table.c.name, table.c.value))}
