"""Embeddings: a crop's vector under one model version, written once however often asked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import Connection, and_, exists, select
from sqlalchemy.orm import Session

from db.schema import Crop, Embedding, utcnow
from db.versions import dialect_insert


def insert_embeddings(
    conn: Connection, version_id: int, crop_ids: Sequence[int], vectors: np.ndarray
) -> None:
    """Store ``vectors[i]`` as crop ``crop_ids[i]``'s embedding under ``version_id``; a pair
    that already has one keeps it (``ON CONFLICT DO NOTHING``), so a repeated batch adds
    nothing. Vectors are stored as little-endian float32."""
    if not len(crop_ids):
        return
    now = utcnow()
    conn.execute(
        dialect_insert(conn)(Embedding.__table__).on_conflict_do_nothing(
            index_elements=["crop_id", "model_version_id"]
        ),
        [
            {
                "crop_id": crop_id,
                "model_version_id": version_id,
                "dim": int(vector.shape[0]),
                "vector": vector.astype("<f4").tobytes(),
                "created_at": now,
            }
            for crop_id, vector in zip(crop_ids, vectors, strict=True)
        ],
    )


def missing_crop_ids(
    session: Session, version_id: int, up_to: int | None = None, limit: int | None = None
) -> list[int]:
    """Crops with no embedding under ``version_id`` (only ids <= ``up_to`` when given)."""
    has_embedding = exists().where(
        and_(Embedding.crop_id == Crop.id, Embedding.model_version_id == version_id)
    )
    query = select(Crop.id).where(~has_embedding).order_by(Crop.id)
    if up_to is not None:
        query = query.where(Crop.id <= up_to)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))
