"""Index builds in the database: the embeddings an index is built from, and the build rows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.schema import Crop, Embedding, Image, IndexBuild, IndexBuildStatus, Product, utcnow
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


@dataclass(frozen=True)
class Drift:
    """How far the catalog moved from the served build: vectors added since (not in the build)
    and crops in the build that left search since (delisted product, retired image)."""

    build_id: int
    model_version_id: int
    n_vectors: int
    added: int
    left: int

    @property
    def share(self) -> float:
        return (self.added + self.left) / max(1, self.n_vectors)


def served_build_drift(session: Session) -> Drift | None:
    """The drift of the active, ready build; None when there is none, when another build is
    pending or running, or when the build does not say what it holds (older builds)."""
    build = session.scalars(
        select(IndexBuild)
        .where(IndexBuild.active.is_(True), IndexBuild.status == IndexBuildStatus.READY)
        .order_by(IndexBuild.id.desc())
    ).first()
    busy = session.scalar(
        select(func.count())
        .select_from(IndexBuild)
        .where(IndexBuild.status.in_([IndexBuildStatus.PENDING, IndexBuildStatus.BUILDING]))
    )
    params = (build.params or {}) if build is not None else {}
    if build is None or busy or "top_embedding_id" not in params or "catalog_as_of" not in params:
        return None
    top = int(params["top_embedding_id"])
    as_of = datetime.fromisoformat(str(params["catalog_as_of"]))
    version = Embedding.model_version_id == build.model_version_id
    added = session.scalar(select(func.count()).where(version, Embedding.id > top)) or 0
    left_search = or_(
        and_(Product.listed.is_(False), Product.updated_at > as_of), Image.retired_at > as_of
    )
    left = (
        session.scalar(
            select(func.count())
            .select_from(Embedding)
            .join(Crop, Crop.id == Embedding.crop_id)
            .join(Image, Image.id == Crop.image_id)
            .join(Product, Product.id == Image.product_id)
            .where(version, Embedding.id <= top, left_search)
        )
        or 0
    )
    return Drift(build.id, build.model_version_id, int(build.n_vectors), added, left)


def request_build(session: Session, version_id: int, reason: dict[str, Any]) -> None:
    """A pending build of ``version_id`` over every crop there is now: the embedding task
    that takes it (``flickd.embed_crops`` with no crops) claims and builds it."""
    up_to = session.scalar(select(func.max(Crop.id))) or 0
    session.add(
        IndexBuild(
            model_version_id=version_id,
            status=IndexBuildStatus.PENDING.value,
            n_vectors=0,
            params={"up_to_crop_id": up_to, **reason},
            updated_at=utcnow(),
        )
    )
