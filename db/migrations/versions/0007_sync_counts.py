"""catalog sync, continued: what a run did to its catalog, and the lookups sync needs

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-17 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTS = (
    "products_created",
    "products_updated",
    "products_unchanged",
    "products_delisted",
    "products_relisted",
)


def upgrade() -> None:
    with op.batch_alter_table("ingest_runs") as batch:
        batch.add_column(sa.Column("full_feed", sa.Boolean(), nullable=False, server_default="0"))
        for name in COUNTS:
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("notes_by_reason", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("sync_refused", sa.Text(), nullable=True))
    delisted = sa.text("delisted_at IS NOT NULL")
    op.create_index(
        "ix_products_delisted_at",
        "products",
        ["delisted_at"],
        postgresql_where=delisted,
        sqlite_where=delisted,
    )
    stored = sa.text("blob_key IS NOT NULL")
    for name, column in (
        ("ix_images_stored_url_hash", "url_hash"),
        ("ix_images_blob_key", "blob_key"),
    ):
        op.create_index(name, "images", [column], postgresql_where=stored, sqlite_where=stored)
    op.create_index("ix_crops_blob_key", "crops", ["blob_key"])


def downgrade() -> None:
    op.drop_index("ix_crops_blob_key", table_name="crops")
    op.drop_index("ix_images_blob_key", table_name="images")
    op.drop_index("ix_images_stored_url_hash", table_name="images")
    op.drop_index("ix_products_delisted_at", table_name="products")
    with op.batch_alter_table("ingest_runs") as batch:
        batch.drop_column("sync_refused")
        batch.drop_column("notes_by_reason")
        for name in reversed(COUNTS):
            batch.drop_column(name)
        batch.drop_column("full_feed")
