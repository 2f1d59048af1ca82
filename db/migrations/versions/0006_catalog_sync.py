"""catalog sync: listing state and change times of products, retired images, colour families

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-16 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("products") as batch:
        batch.add_column(sa.Column("listed", sa.Boolean(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("delisted_at", TZ, nullable=True))
        batch.add_column(sa.Column("in_stock", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("currency", sa.String(length=3), nullable=True))
        batch.add_column(sa.Column("seen_run_id", Id, nullable=True))
        batch.add_column(sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()))
    op.create_index("ix_products_updated_at", "products", ["updated_at"])
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("superseded_at", TZ, nullable=True))
        batch.add_column(sa.Column("retired_at", TZ, nullable=True))
    op.create_index("ix_images_retired_at", "images", ["retired_at"])
    with op.batch_alter_table("crops") as batch:
        batch.add_column(sa.Column("colour_family", sa.String(length=16), nullable=True))
    op.create_index("ix_crops_colour_family", "crops", ["colour_family"])
    op.create_index("ix_embeddings_created_at", "embeddings", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_embeddings_created_at", table_name="embeddings")
    op.drop_index("ix_crops_colour_family", table_name="crops")
    with op.batch_alter_table("crops") as batch:
        batch.drop_column("colour_family")
    op.drop_index("ix_images_retired_at", table_name="images")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("retired_at")
        batch.drop_column("superseded_at")
    op.drop_index("ix_products_updated_at", table_name="products")
    with op.batch_alter_table("products") as batch:
        for column in ("updated_at", "seen_run_id", "currency", "in_stock", "delisted_at"):
            batch.drop_column(column)
        batch.drop_column("listed")
