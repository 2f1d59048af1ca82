"""Index builds in the database: the embeddings an index is built from, and the build rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, and_, func, select, update

from db.schema import Crop, Embedding, Image, IndexBuild, IndexBuildStatus, Product
from db.session import session_scope
from flickd.core.settings import Settings


@dataclass(frozen=True)
class EmbeddingChunks:
    """The embeddings of one model version, read in chunks of (crop ids, float32 vectors).

    Each call of :meth:`chunks` is one pass over the same rows: those with an id up to ``top_id``,
    the highest when the reader was made, so rows added meanwhile wait for the next build.
    Only served crops count: a delisted product's or a retired image's crops stay out of the
    index (``_served``; the passes must agree, so a listing change between two passes of one
    build is an error, and the build is retried)."""

    settings: Settings
    model_version_id: int
    n: int
    dim: int
    top_id: int
    chunk_rows: int = 5_000

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        query = (
            _served(select(Embedding.crop_id, Embedding.vector))
            .where(Embedding.model_version_id == self.model_version_id, Embedding.id <= self.top_id)
            .order_by(Embedding.id)
            .execution_options(yield_per=self.chunk_rows)
        )
        with session_scope(self.settings) as session:
            for rows in session.execute(query).partitions():
                ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
                blob = b"".join(r[1] for r in rows)
                yield ids, np.frombuffer(blob, dtype="<f4").reshape(len(rows), self.dim)


def _served(query: Any) -> Any:
    """``query`` over embeddings, limited to crops a search may return: the product listed
    (NULL counts as listed) and the image not retired."""
    served: ColumnElement[bool] = and_(Product.listed.is_not(False), Image.retired_at.is_(None))
    return (
        query.join(Crop, Crop.id == Embedding.crop_id)
        .join(Image, Image.id == Crop.image_id)
        .join(Product, Product.id == Image.product_id)
        .where(served)
    )


def embedding_chunks(
    settings: Settings, model_version_id: int, *, chunk_rows: int = 5_000
) -> EmbeddingChunks:
    """A reader of every embedding of ``model_version_id``; ValueError when there is none, or
    when they do not all have one dimension."""
    of_version = Embedding.model_version_id == model_version_id
    with session_scope(settings) as session:
        top = session.scalar(select(func.max(Embedding.id)).where(of_version))
        n, dims = session.execute(
            _served(select(func.count(), func.count(func.distinct(Embedding.dim)))).where(
                of_version, Embedding.id <= (top or 0)
            )
        ).one()
        dim = session.scalar(select(Embedding.dim).where(of_version).limit(1))
    if not n or dims != 1:
        raise ValueError(f"model version {model_version_id}: {n} embeddings of {dims} dims")
    assert dim is not None  # n > 0 embeddings of this version, and dim is NOT NULL
    return EmbeddingChunks(settings, model_version_id, n, dim, int(top or 0), chunk_rows)


def record_index_build(
    settings: Settings,
    model_version_id: int,
    *,
    path: str,
    index_type: str,
    n_vectors: int,
    params: dict[str, Any],
) -> None:
    """Record a written index as the one active build. The finalize task claims a build row
    (status "building") before an index is built: that row is filled in; without one, a new
    row is added."""
    with session_scope(settings) as session:
        session.execute(update(IndexBuild).values(active=False))
        claimed = session.scalars(
            select(IndexBuild).where(
                IndexBuild.model_version_id == model_version_id,
                IndexBuild.status == IndexBuildStatus.BUILDING,
            )
        ).first()
        build = claimed or IndexBuild(model_version_id=model_version_id)
        build.path, build.index_type = path, index_type
        build.n_vectors, build.params, build.active = n_vectors, params, True
        build.status = IndexBuildStatus.READY.value
        session.add(build)
