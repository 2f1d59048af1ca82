"""Model versions in the database: which weights produced which embeddings."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.schema import ModelKind, ModelVersion, utcnow
from db.session import session_scope
from flickd.core.settings import Settings


def dialect_insert(conn: Connection) -> Any:
    """The INSERT construct with ON CONFLICT support for this connection's database."""
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


def embedder_version_id(conn: Connection, name: str, version: str) -> int:
    """The model_versions row of this embedder (created on first sight; the first one is
    active, so a fresh catalog has something to search)."""
    table = ModelVersion.__table__
    has_active = conn.scalar(
        select(table.c.id)
        .where(table.c.kind == ModelKind.EMBEDDER, table.c.active.is_(True))
        .limit(1)
    )
    conn.execute(
        dialect_insert(conn)(table)
        .values(
            kind=ModelKind.EMBEDDER.value,
            name=name,
            version=version,
            active=has_active is None,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["kind", "version"])
    )
    # The row exists now: inserted above, or already there (the conflict).
    return cast(
        int,
        conn.scalar(
            select(table.c.id).where(table.c.kind == ModelKind.EMBEDDER, table.c.version == version)
        ),
    )


def activate_embedder(session: Session, version_id: int) -> None:
    """Make ``version_id`` the one active embedder."""
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == ModelKind.EMBEDDER)
        .values(active=ModelVersion.id == version_id)
        .execution_options(synchronize_session=False)
    )


def active_embedder(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(
            ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.active.is_(True)
        )
    ).first()


def record_model_version(
    settings: Settings,
    *,
    name: str,
    version: str,
    parent_name: str,
    parent_version: str,
    metrics: dict[str, Any],
    promoted: bool,
    activate: bool = True,
) -> tuple[int, int]:
    """All of fine-tuning's database writes, in one transaction: the parent's row (created if
    this base model never embedded anything), the new row (updated when a deterministic re-run
    produced the same weights), and on promotion the switch of the active embedder.
    Returns ``(new_id, parent_id)``."""
    with session_scope(settings) as session:
        parent_id = embedder_version_id(session.connection(), parent_name, parent_version)
        row = session.scalar(
            select(ModelVersion).where(
                ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.version == version
            )
        )
        if row is None:
            row = ModelVersion(
                kind=ModelKind.EMBEDDER.value, version=version, active=False, created_at=utcnow()
            )
            session.add(row)
        row.name, row.parent_id, row.metrics = name, parent_id, metrics
        session.flush()
        if promoted and activate:
            activate_embedder(session, row.id)
        return row.id, parent_id
