"""What a serving replica reads to follow the catalog: each crop's filter facts, the embeddings
and product and image changes since a moment (``flickd/services/freshness.py``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import Connection, Select, and_, select

from db.schema import Crop, Embedding, Image, Product
from db.sql import id_in

CHUNK = 10_000  # ids per IN list, rows per streamed partition

# The facts of a crop, in this order: crop id, product id, catalog, brand, category, fine and
# coarse label, colour family, price, in stock (None: the feed does not say), served.
FACT_COLUMNS = (
    "crop_id",
    "product_id",
    "catalog",
    "brand",
    "category",
    "fine_label",
    "coarse_label",
    "colour_family",
    "price",
    "in_stock",
    "served",
)


def _facts_query() -> Select[Any]:
    # Served: the product is listed (NULL counts as listed: rows older than the column) and
    # the image is not retired.
    served = and_(Product.listed.is_not(False), Image.retired_at.is_(None)).label("served")
    query = (
        select(
            Crop.id,
            Image.product_id,
            Product.catalog,
            Product.brand,
            Product.category,
            Crop.fine_label,
            Crop.coarse_label,
            Crop.colour_family,
            Product.price,
            Product.in_stock,
            served,
        )
        .join(Image, Image.id == Crop.image_id)
        .join(Product, Product.id == Image.product_id)
    )
    return cast("Select[Any]", query)


def all_crop_facts(conn: Connection) -> Iterator[Sequence[Any]]:
    """The facts of every crop, streamed in partitions of rows (``FACT_COLUMNS``)."""
    query = _facts_query().execution_options(yield_per=CHUNK)
    yield from conn.execute(query).partitions()


def crop_facts(
    conn: Connection,
    *,
    crop_ids: Sequence[int] = (),
    product_ids: Sequence[int] = (),
    image_ids: Sequence[int] = (),
) -> list[Any]:
    """The facts of the named crops, of every crop of the named products and images."""
    rows: list[Any] = []
    for column, ids in (
        (Crop.id, crop_ids),
        (Image.product_id, product_ids),
        (Crop.image_id, image_ids),
    ):
        for s in range(0, len(ids), CHUNK):
            part = [int(i) for i in ids[s : s + CHUNK]]
            rows.extend(conn.execute(_facts_query().where(id_in(conn, column, part))))
    return rows


def embedded_since(conn: Connection, version_id: int, since: datetime) -> np.ndarray:
    """Crop ids of the embeddings of ``version_id`` stamped after ``since``."""
    ids = conn.scalars(
        select(Embedding.crop_id).where(
            Embedding.model_version_id == version_id, Embedding.created_at > since
        )
    ).all()
    return np.asarray(ids, dtype=np.int64)


def embedding_vectors(
    conn: Connection, version_id: int, crop_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(crop ids, float32 vectors) of the named crops that have an embedding of
    ``version_id``; crops without one are left out."""
    got: list[int] = []
    blobs: list[bytes] = []
    dim = 0
    for s in range(0, len(crop_ids), CHUNK):
        part = [int(i) for i in crop_ids[s : s + CHUNK]]
        for crop_id, d, vector in conn.execute(
            select(Embedding.crop_id, Embedding.dim, Embedding.vector).where(
                Embedding.model_version_id == version_id, id_in(conn, Embedding.crop_id, part)
            )
        ):
            got.append(crop_id)
            blobs.append(vector)
            dim = d
    vectors = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(got), dim or 1)
    return np.asarray(got, dtype=np.int64), vectors.astype(np.float32)


def products_changed_since(conn: Connection, since: datetime) -> list[int]:
    """Products whose row changed after ``since`` (listing, text, price, stock)."""
    return list(conn.scalars(select(Product.id).where(Product.updated_at > since)))


def images_retired_since(conn: Connection, since: datetime) -> list[int]:
    return list(conn.scalars(select(Image.id).where(Image.retired_at > since)))
