"""The flickd schema: one image's life from feed row to index entry.

    IngestRun ─┬─< RejectedRow            (rows the producer refused, with the reason)
               └─< Image >── Product      (one row per (product, image URL))
                     └─< Crop ─< Embedding >── ModelVersion ──< IndexBuild
                                                     └──< VideoSearchJob  (a video's result)

Every write that can be repeated (a feed ingested twice, a task delivered twice) is keyed by a
unique constraint and done with ``INSERT … ON CONFLICT``, so repeating it creates nothing new.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

if TYPE_CHECKING:
    from sqlalchemy import Table

# Stable constraint names so Alembic migrations work the same on Postgres and SQLite.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; Postgres gets a 64-bit key for big catalogs.
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class ImageState(StrEnum):
    QUEUED = "queued"  # recorded and enqueued for download
    DOWNLOADED = "downloaded"  # bytes stored, waiting for analysis
    ANALYZED = "analyzed"  # crops and embeddings stored
    FAILED = "failed"  # terminal, with a reason


TERMINAL_STATES = (ImageState.ANALYZED.value, ImageState.FAILED.value)
# States in which an image waits for a stage; the reconciler re-drives those that stall.
PENDING_STATES = (ImageState.QUEUED.value, ImageState.DOWNLOADED.value)


class RunStatus(StrEnum):
    RUNNING = "running"  # the producer is still reading the feed
    ENQUEUED = "enqueued"  # every accepted image is enqueued; workers are busy
    DONE = "done"  # every image of the run reached a terminal state
    FAILED = "failed"  # the feed could not be read
    CANCELLED = "cancelled"


class FinalizeStatus(StrEnum):
    """A run's final task: queued by the worker that closed the run, claimed (running) by the
    one task that does it, then what it did."""

    QUEUED = "queued"
    RUNNING = "running"
    FINETUNED = "finetuned"
    REEMBEDDING = "reembedding"  # a promoted model's re-embedding will build the index
    INDEXED = "indexed"
    NOTHING = "nothing"
    FAILED = "failed"  # this attempt failed; the reconciler tries again (bounded)


# Final-task statuses that still await work; the others are outcomes.
FINALIZE_PENDING = (FinalizeStatus.QUEUED.value, FinalizeStatus.RUNNING.value)


class ModelKind(StrEnum):
    EMBEDDER = "embedder"
    DETECTOR = "detector"


class IndexBuildStatus(StrEnum):
    PENDING = "pending"  # waiting for a re-embedding to finish
    BUILDING = "building"  # claimed by one worker
    READY = "ready"
    FAILED = "failed"  # re-driven FLICKD_MAX_STAGE_ATTEMPTS times without finishing


class VideoJobStatus(StrEnum):
    """A video search: queued (its message is on the gpu queue), running (claimed by one
    worker, which renews its heartbeat), then done (the result is stored) or failed."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


VIDEO_JOB_PENDING = (VideoJobStatus.QUEUED.value, VideoJobStatus.RUNNING.value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, int: Id}

    if TYPE_CHECKING:
        # Every model here is declared with __tablename__, so its __table__ is a Table;
        # DeclarativeBase types it as the wider FromClause.
        __table__: ClassVar[Table]


class IngestRun(Base):
    __tablename__ = "ingest_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    feed: Mapped[str] = mapped_column(Text)
    catalog: Mapped[str] = mapped_column(String(200), default="default")
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.RUNNING.value)
    error: Mapped[str | None] = mapped_column(Text)
    rows_read: Mapped[int] = mapped_column(default=0)
    blank_rows: Mapped[int] = mapped_column(default=0)
    accepted: Mapped[int] = mapped_column(default=0)  # valid (product, url) pairs in the feed
    invalid: Mapped[int] = mapped_column(default=0)
    duplicates_in_feed: Mapped[int] = mapped_column(default=0)
    already_known: Mapped[int] = mapped_column(default=0)  # pairs the database already had
    enqueued: Mapped[int] = mapped_column(default=0)
    invalid_by_reason: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Last sign of life of whoever holds the run: the producer (per chunk) while it is
    # ``running``, the final task (its heartbeat) while that is queued or running.
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The final task (FinalizeStatus): queued by the one worker that finished the run, then
    # claimed by exactly one task, then what it did.
    finalize_status: Mapped[str | None] = mapped_column(String(32))
    finalize_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Catalog sync: a full feed is the whole catalog (products missing from it are delisted),
    # a delta only adds and updates. What the run did to the catalog's products:
    full_feed: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    products_created: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    products_updated: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    products_unchanged: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    products_delisted: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    products_relisted: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Rows accepted with a value left out (unreadable_price, unknown_availability): reason ->
    # rows; the rows themselves are in rejected_rows under those reasons.
    notes_by_reason: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Why a full feed's delisting was refused (empty, cut short, too large a share): nothing
    # was delisted; its rows were recorded as a delta.
    sync_refused: Mapped[str | None] = mapped_column(Text)


class RejectedRow(Base):
    __tablename__ = "rejected_rows"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("ingest_runs.id", ondelete="CASCADE"), index=True
    )
    row_number: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")
    raw: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        UniqueConstraint("catalog", "external_id"),
        # The reconciler purges products delisted longer than the grace period. Partial: the
        # listed products (nearly all) are not in it, and their inserts never touch it.
        Index(
            "ix_products_delisted_at",
            "delisted_at",
            postgresql_where=text("delisted_at IS NOT NULL"),
            sqlite_where=text("delisted_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    catalog: Mapped[str] = mapped_column(String(200), default="default")
    external_id: Mapped[str] = mapped_column(String(512))
    title: Mapped[str | None] = mapped_column(Text)
    brand: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(Text)
    price: Mapped[float | None] = mapped_column(Float)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Listing state, kept by catalog sync: a delisted product leaves search at once; its rows
    # stay for FLICKD_DELIST_GRACE_SECONDS (a return relists it without a download), then go.
    listed: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    delisted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    in_stock: Mapped[bool | None] = mapped_column(Boolean)  # None: the feed does not say
    currency: Mapped[str | None] = mapped_column(String(3))  # ISO 4217 of ``price``
    seen_run_id: Mapped[int | None] = mapped_column(Id)  # the last run whose feed had it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Any change a search replica must see (listing, text, price): replicas poll by it.
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.now(), index=True
    )

    images: Mapped[list[Image]] = relationship(back_populates="product")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("product_id", "url_hash"),
        Index("ix_images_run_state", "run_id", "state"),
        # The reconciler's question, "which pending images stalled?": a partial index holds
        # only the images still waiting, so it stays small however large the catalog grows.
        # Stored images by URL and by blob: a sibling (the same URL under another product)
        # takes the bytes or the analysis instead of redoing them, and a purge deletes a blob
        # only when nothing else uses it. Partial, so the producer's inserts (no blob yet)
        # never touch them.
        Index(
            "ix_images_stored_url_hash",
            "url_hash",
            postgresql_where=text("blob_key IS NOT NULL"),
            sqlite_where=text("blob_key IS NOT NULL"),
        ),
        Index(
            "ix_images_blob_key",
            "blob_key",
            postgresql_where=text("blob_key IS NOT NULL"),
            sqlite_where=text("blob_key IS NOT NULL"),
        ),
        Index(
            "ix_images_pending_progress",
            "state",
            "updated_at",
            postgresql_where=text("state IN ('queued', 'downloaded')"),
            sqlite_where=text("state IN ('queued', 'downloaded')"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    url_hash: Mapped[str] = mapped_column(String(32))
    # The run that last enqueued the image. No foreign key on purpose: the check would run once
    # per inserted row (a quarter of the producer's insert time) and runs are never deleted.
    run_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    # Indexed with run_id (ix_images_run_state): every state query is per run. Each index
    # costs every one of the millions of inserts, so the only other is partial (pending rows).
    state: Mapped[str] = mapped_column(String(16), default=ImageState.QUEUED.value)
    failure_reason: Mapped[str | None] = mapped_column(String(32))
    failure_detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # HTTP attempts of the download
    # Deliveries that started the image's current stage (reset when it moves on); bounded by
    # FLICKD_MAX_STAGE_ATTEMPTS, so a stage broken for good cannot loop.
    stage_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)  # why the last attempt did not finish
    content_hash: Mapped[str | None] = mapped_column(String(64))
    blob_key: Mapped[str | None] = mapped_column(String(80))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Last progress: the last state change, hand-off or heartbeat of the worker holding it.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    downloaded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    analyzed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The product's feed now names another URL: this image is served until the new one is
    # analysed, then retired (leaves search; its crops go with the product's purge).
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)

    product: Mapped[Product] = relationship(back_populates="images")
    crops: Mapped[list[Crop]] = relationship(back_populates="image", order_by="Crop.crop_index")


class ModelVersion(Base):
    """A set of weights that produced embeddings (the base CLIP, or a fine-tuned one)."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("kind", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # ModelKind
    name: Mapped[str] = mapped_column(Text)  # hub id or directory it was loaded from
    version: Mapped[str] = mapped_column(String(128))  # content-derived identifier
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Crop(Base):
    """One detected item (or the whole image when nothing was detected)."""

    __tablename__ = "crops"
    __table_args__ = (UniqueConstraint("image_id", "crop_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    crop_index: Mapped[int] = mapped_column(Integer)
    x0: Mapped[float] = mapped_column(Float)
    y0: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    nx0: Mapped[float] = mapped_column(Float)
    ny0: Mapped[float] = mapped_column(Float)
    nx1: Mapped[float] = mapped_column(Float)
    ny1: Mapped[float] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float)
    fine_label: Mapped[str | None] = mapped_column(String(64))
    coarse_label: Mapped[str | None] = mapped_column(String(32), index=True)
    whole_image: Mapped[bool] = mapped_column(Boolean, default=False)
    # Why the crop is what it is, when that is not plain detection: "detection failed (…);
    # whole image used", "crop padded from 8x8000 to 400x8000 for the models (…)".
    detail: Mapped[str | None] = mapped_column(Text)
    colour_name: Mapped[str | None] = mapped_column(String(64))
    colour_rgb: Mapped[str | None] = mapped_column(String(7))  # "#rrggbb"
    # Everyday colour word (models.colour.COLOUR_FAMILIES): "navy", "beige", "multicolour".
    colour_family: Mapped[str | None] = mapped_column(String(16), index=True)
    prompt: Mapped[str | None] = mapped_column(Text)
    blob_key: Mapped[str | None] = mapped_column(String(80), index=True)
    detector_version: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    image: Mapped[Image] = relationship(back_populates="crops")


class Embedding(Base):
    """A crop's vector under one model version; a later model lives beside the old one."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("crop_id", "model_version_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    crop_id: Mapped[int] = mapped_column(ForeignKey("crops.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, L2-normalised, little-endian
    # Indexed: serving replicas poll for vectors newer than their index (freshness).
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class IndexBuild(Base):
    __tablename__ = "index_builds"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    # IndexBuildStatus: pending (waiting for re-embedding) -> building -> ready; the one
    # serving is also active.
    status: Mapped[str] = mapped_column(
        String(16), default=IndexBuildStatus.READY.value, server_default="ready"
    )
    path: Mapped[str | None] = mapped_column(Text)
    index_type: Mapped[str | None] = mapped_column(String(128))
    n_vectors: Mapped[int] = mapped_column(BigInteger, default=0)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Last progress while pending (a re-embedding batch landed) or building (heartbeat).
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class VideoSearchJob(Base):
    """One video searched under one embedder: the stored result, and the job that makes it.

    Keyed by the video's SHA-256, the model version of the index it was searched in and the
    number of matches asked per track, so asking again is answered from this row. A clip short
    enough to answer in the request is stored ``done`` at once; a longer one is a job.
    """

    __tablename__ = "video_search_jobs"
    __table_args__ = (
        UniqueConstraint("sha256", "model_version_id", "top_k"),
        # The reconciler's question, "which jobs stalled?": only the pending rows.
        Index(
            "ix_video_search_jobs_pending_progress",
            "status",
            "updated_at",
            postgresql_where=text("status IN ('queued', 'running')"),
            sqlite_where=text("status IN ('queued', 'running')"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    top_k: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=VideoJobStatus.QUEUED.value)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # Claims so far (each delivery that started the job); bounded by FLICKD_MAX_STAGE_ATTEMPTS.
    # The claim number is also the holder's token: only the current holder may finish the job.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    blob_key: Mapped[str | None] = mapped_column(String(80))  # the video bytes, while pending
    duration_s: Mapped[float | None] = mapped_column(Float)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # a VideoSearchResult
    reason: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)  # why the last attempt did not finish
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Last progress: the claim, a progress report or the heartbeat of the worker holding it.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ReconcilerCounter(Base):
    """What the reconciler has done, summed over every pass (the metrics read it)."""

    __tablename__ = "reconciler_counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
