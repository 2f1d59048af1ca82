"""durable work: stage attempts, progress timestamps, reconciler counters

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("state IN ('queued', 'downloaded')")


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("stage_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
    op.create_index(
        "ix_images_pending_progress",
        "images",
        ["state", "updated_at"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    with op.batch_alter_table("ingest_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("finalize_attempts", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("index_builds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "reconciler_counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_reconciler_counters")),
    )


def downgrade() -> None:
    op.drop_table("reconciler_counters")
    with op.batch_alter_table("index_builds", schema=None) as batch_op:
        batch_op.drop_column("updated_at")
    with op.batch_alter_table("ingest_runs", schema=None) as batch_op:
        batch_op.drop_column("finalize_attempts")
        batch_op.drop_column("updated_at")
    op.drop_index("ix_images_pending_progress", table_name="images")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("last_error")
        batch_op.drop_column("stage_attempts")
