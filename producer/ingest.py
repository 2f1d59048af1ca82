"""Producer: read a feed in chunks, record products and images, enqueue downloads.

Per chunk: validated rows (producer/feeds/) are staged in a temporary table (COPY on
Postgres), then two set-based ``INSERT … SELECT … ON CONFLICT`` statements record products and
images; ``RETURNING`` gives the ids of the images that are new, and only those are enqueued,
in batches, after the chunk's transaction has committed. Ingesting the same feed twice
therefore creates nothing and enqueues nothing the second time.

Catalog sync: a product whose title, brand, category, price, currency, stock or attributes
changed is updated in place (its ``updated_at`` moves; an unchanged one is not written at all),
a delisted one that returns is relisted, and neither downloads anything. Once the whole feed is
read, one transaction applies it to the catalog (db/catalog.py ``finish_sync``): seen marks,
images the feed no longer names superseded, and the delisting — of rows that ask for it, and
with ``full`` of every product the feed left out, under the guards of producer/sync.py.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    MetaData,
    String,
    Table,
    Text,
    insert,
    literal,
    select,
    update,
)

from db.catalog import (
    ChunkCounts,
    SyncOutcome,
    classify_products,
    create_run_tables,
    drop_run_tables,
    finish_sync,
    product_changed,
    remember_chunk,
    restore_named_images,
)
from db.runs import close_runs, touch_run
from db.schema import Image, ImageState, IngestRun, Product, RejectedRow, RunStatus, utcnow
from db.session import get_engine, session_scope
from db.versions import dialect_insert
from flickd.core.broker import BROKER_ERRORS, DOWNLOAD_TASK, enqueue, send_final_tasks
from flickd.core.lease import heartbeat
from flickd.core.settings import Settings
from producer.feeds import FeedChunk, FeedColumns, FeedError, read_feed, url_hash
from producer.sync import catalog_lock, delisting_guard, looks_cut

log = logging.getLogger(__name__)

# A run that adds this many products and images refreshes the planner's statistics before it
# applies the feed to the catalog (db/catalog.py finish_sync).
BULK_ROWS = 10_000

_stage_meta = MetaData()
STAGE_PRODUCTS = Table(
    "flickd_stage_products",
    _stage_meta,
    Column("external_id", String(512)),
    Column("title", Text),
    Column("brand", Text),
    Column("category", Text),
    Column("price", Float),
    Column("currency", String(3)),
    Column("in_stock", Boolean),
    Column("delist", Boolean),  # the row asks for its product to be delisted
    Column("attributes", Text),  # JSON text; cast on the way in
    prefixes=["TEMPORARY"],
)
STAGE_IMAGES = Table(
    "flickd_stage_images",
    _stage_meta,
    Column("external_id", String(512)),
    Column("url", Text),
    Column("url_hash", String(32)),
    prefixes=["TEMPORARY"],
)


@dataclass
class IngestSummary:
    run_id: int
    feed: str
    status: str = RunStatus.RUNNING.value
    rows_read: int = 0
    blank_rows: int = 0
    accepted: int = 0
    invalid: int = 0
    invalid_by_reason: Counter[str] = field(default_factory=Counter)
    duplicates_in_feed: int = 0
    already_known: int = 0
    new_images: int = 0
    enqueued: int = 0
    messages: int = 0
    error: str | None = None
    # Recorded images whose messages could not be sent (the broker was unreachable): they are
    # safe in the database and the reconciler sends them once the broker is back.
    not_sent: int = 0
    broker_error: str | None = None
    # Catalog sync: what the run did to its catalog's products.
    full: bool = False
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    delisted: int = 0
    relisted: int = 0
    notes_by_reason: Counter[str] = field(default_factory=Counter)
    sync_refused: str | None = None  # why a full feed's delisting was refused
    lock_wait_seconds: float = 0.0  # waiting for another full feed of the catalog
    last_row: int = 0  # the highest source row number read
    last_rejected: int | None = None  # the row number of the last rejected row

    @property
    def products_named(self) -> int:
        """Products the feed named that stay listed (delisting rows not counted)."""
        return self.created + self.updated + self.unchanged + self.relisted

    def add(self, counts: ChunkCounts) -> None:
        self.created += counts.created
        self.updated += counts.updated
        self.unchanged += counts.unchanged
        self.relisted += counts.relisted

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "feed": self.feed,
            "status": self.status,
            "rows": self.rows_read,
            "blank_rows": self.blank_rows,
            "accepted": self.accepted,
            "invalid": self.invalid,
            "invalid_by_reason": dict(self.invalid_by_reason),
            "duplicates": self.duplicates_in_feed + self.already_known,
            "duplicates_in_feed": self.duplicates_in_feed,
            "already_known": self.already_known,
            "enqueued": self.enqueued,
            "messages": self.messages,
            "not_sent": self.not_sent,
            "broker_error": self.broker_error,
            "error": self.error,
            "full": self.full,
            "products": {
                "created": self.created,
                "updated": self.updated,
                "unchanged": self.unchanged,
                "delisted": self.delisted,
                "relisted": self.relisted,
            },
            "notes_by_reason": dict(self.notes_by_reason),
            "sync_refused": self.sync_refused,
            "lock_wait_seconds": round(self.lock_wait_seconds, 3),
        }


def _none_if_nan(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _stage(conn: Connection, table: Table, frame: pd.DataFrame, analyze: bool = False) -> None:
    """Load ``frame`` into a temporary staging table: COPY on Postgres, executemany elsewhere.

    ``analyze``: give the planner statistics for a table that is joined afterwards."""
    columns = [c.name for c in table.columns]
    if conn.dialect.name == "postgresql":
        raw = conn.connection.driver_connection
        assert raw is not None  # a connection in use has its driver (psycopg) connection
        with raw.cursor() as cursor:
            cursor.execute(f"TRUNCATE {table.name}")
            if frame.empty:
                return
            sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
            with cursor.copy(sql) as copy:
                copy.write(_csv_bytes(frame[columns]))
            if analyze:
                # Temporary tables have no statistics: without them the planner guesses a few
                # dozen rows and may scan the whole products table once per chunk.
                cursor.execute(f"ANALYZE {table.name}")
        return
    conn.execute(table.delete())
    if frame.empty:
        return
    records = [
        {c: _none_if_nan(v) for c, v in zip(columns, row, strict=True)}
        for row in frame[columns].itertuples(index=False, name=None)
    ]
    conn.execute(insert(table), records)


def _csv_bytes(frame: pd.DataFrame) -> memoryview:
    """CSV for COPY, written by Arrow (an order of magnitude faster than pandas). Nulls come
    out unquoted and empty, which COPY reads as NULL; empty strings come out as ``""``."""
    out = pa.BufferOutputStream()
    pacsv.write_csv(
        pa.Table.from_pandas(frame, preserve_index=False),
        out,
        pacsv.WriteOptions(include_header=False),
    )
    return memoryview(out.getvalue())


def _products_frame(images: pd.DataFrame) -> pd.DataFrame:
    first = images.drop_duplicates("product_id", keep="first")
    attributes = first["extra"].map(
        lambda extra: json.dumps(extra, ensure_ascii=False) if extra else None
    )
    return pd.DataFrame(
        {
            "external_id": first["product_id"].to_numpy(),
            "title": first["title"].to_numpy(),
            "brand": first["brand"].to_numpy(),
            "category": first["category"].to_numpy(),
            "price": first["price"].astype("float64").to_numpy(),
            "currency": first["currency"].to_numpy(),
            "in_stock": first["in_stock"].to_numpy(),
            "delist": first["delist"].astype(bool).to_numpy(),
            "attributes": attributes.to_numpy(),
        }
    )


def record_chunk(
    conn: Connection, run_id: int, catalog: str, images: pd.DataFrame
) -> tuple[list[int], ChunkCounts]:
    """Record the chunk's products and images; return the ids of the images that are new and
    how the chunk's products compared with the catalog (counted before they were written).

    Products a row asks to delist are not written here (nor are their images): the run's end
    delists them (db/catalog.py ``finish_sync``), so that a refused full feed delists nothing.
    """
    if images.empty:
        return [], ChunkCounts()
    insert_for = dialect_insert(conn)
    products_frame = _products_frame(images)
    delisting = set(products_frame["external_id"][products_frame["delist"]])
    listed_images = images[~images["product_id"].isin(delisting)] if delisting else images
    _stage(conn, STAGE_PRODUCTS, products_frame)
    _stage(
        conn,
        STAGE_IMAGES,
        pd.DataFrame(
            {
                "external_id": listed_images["product_id"].to_numpy(),
                "url": listed_images["url"].to_numpy(),
                "url_hash": listed_images["url"].map(url_hash).to_numpy(),
            }
        ),
        analyze=True,
    )
    counts = classify_products(conn, catalog, STAGE_PRODUCTS)
    now = utcnow()
    products = Product.__table__
    staged = STAGE_PRODUCTS.c
    attributes = (
        staged.attributes.cast(Product.attributes.type)
        if conn.dialect.name == "postgresql"
        else staged.attributes
    )
    fields = ["title", "brand", "category", "price", "currency", "in_stock"]
    product_rows = select(
        literal(catalog),
        staged.external_id,
        *(staged[name] for name in fields),
        attributes,
        literal(True),
        literal(run_id),
        literal(now),
        literal(now),
    ).where(~staged.delist)
    stmt = insert_for(products).from_select(
        [
            "catalog",
            "external_id",
            *fields,
            "attributes",
            "listed",
            "seen_run_id",
            "created_at",
            "updated_at",
        ],
        product_rows,
    )
    # Only a product that changed (or returns) is written: replicas poll updated_at, and
    # rewriting unchanged rows would be wasted I/O.
    changed = product_changed(conn, products.c, stmt.excluded) | ~products.c.listed
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["catalog", "external_id"],
            set_={
                **{name: stmt.excluded[name] for name in fields},
                "attributes": stmt.excluded.attributes,
                "listed": True,
                "delisted_at": None,
                "seen_run_id": run_id,  # the run's end marks the unchanged ones
                "updated_at": now,
            },
            where=changed,
        )
    )
    restore_named_images(conn, catalog, STAGE_IMAGES)
    images_table = Image.__table__
    image_rows = (
        select(
            products.c.id,
            STAGE_IMAGES.c.url,
            STAGE_IMAGES.c.url_hash,
            literal(run_id),
            literal(ImageState.QUEUED.value),
            literal(0),
            literal(now),
            literal(now),
        )
        .select_from(STAGE_IMAGES)
        .join(
            products,
            (products.c.catalog == catalog)
            & (products.c.external_id == STAGE_IMAGES.c.external_id),
        )
    )
    stmt = (
        insert_for(images_table)
        .from_select(
            [
                "product_id",
                "url",
                "url_hash",
                "run_id",
                "state",
                "attempts",
                "created_at",
                "updated_at",
            ],
            image_rows,
        )
        .on_conflict_do_nothing(index_elements=["product_id", "url_hash"])
    )
    if listed_images["url"].duplicated().any():
        # Siblings (one URL under several products) side by side, so that they share a
        # batch and its one fetch (workers/download.py).
        rows = conn.execute(stmt.returning(images_table.c.id, images_table.c.url_hash))
        new_ids = [row.id for row in sorted(rows, key=lambda r: (r.url_hash, r.id))]
    else:
        new_ids = sorted(conn.execute(stmt.returning(images_table.c.id)).scalars())
    remember_chunk(conn, STAGE_PRODUCTS, STAGE_IMAGES)
    return new_ids, counts


def _record_rejected(conn: Connection, run_id: int, chunk: FeedChunk) -> None:
    """The chunk's rejected rows, and the notes on rows accepted with a value left out."""
    if not chunk.rejected and not chunk.notes:
        return
    conn.execute(
        insert(RejectedRow.__table__),
        [
            {
                "run_id": run_id,
                "row_number": r.row_number,
                "reason": r.reason.value,
                "detail": r.detail,
                "raw": r.raw,
            }
            for r in (*chunk.rejected, *chunk.notes)
        ],
    )


def _save_summary(summary: IngestSummary, settings: Settings, **closing: Any) -> None:
    """Write the run's counters; ``closing`` (status, timestamps) only applies while the run
    is still ``running``: an operator may have cancelled it meanwhile, and that must stick."""
    counters = {
        "rows_read": summary.rows_read,
        "blank_rows": summary.blank_rows,
        "accepted": summary.accepted,
        "invalid": summary.invalid,
        "invalid_by_reason": dict(summary.invalid_by_reason),
        "duplicates_in_feed": summary.duplicates_in_feed,
        "already_known": summary.already_known,
        "enqueued": summary.enqueued,
        "error": summary.error,
        "products_created": summary.created,
        "products_updated": summary.updated,
        "products_unchanged": summary.unchanged,
        "products_delisted": summary.delisted,
        "products_relisted": summary.relisted,
        "notes_by_reason": dict(summary.notes_by_reason),
        "sync_refused": summary.sync_refused,
    }
    run = IngestRun.__table__
    with session_scope(settings) as session:
        session.execute(update(run).where(run.c.id == summary.run_id).values(**counters))
        if closing:
            session.execute(
                update(run)
                .where(run.c.id == summary.run_id, run.c.status == RunStatus.RUNNING.value)
                .values(**closing)
            )
        # The run's row exists (created before its feed is read), and status is NOT NULL.
        summary.status = cast(
            str, session.scalar(select(run.c.status).where(run.c.id == summary.run_id))
        )


def create_run(feed: str, catalog: str, settings: Settings, full: bool = False) -> int:
    with session_scope(settings) as session:
        run = IngestRun(
            feed=feed,
            catalog=catalog,
            full_feed=full,
            status=RunStatus.RUNNING.value,
            updated_at=utcnow(),
        )
        session.add(run)
        session.flush()
        return run.id


def ingest(
    feed: Path,
    settings: Settings,
    *,
    columns: FeedColumns | None = None,
    catalog: str = "default",
    fmt: str | None = None,
    full: bool = False,
    force: bool = False,
    on_progress: Callable[[IngestSummary, int], None] | None = None,
) -> IngestSummary:
    """Read ``feed``, record it, enqueue its new images. Returns once everything is enqueued
    (in embedded mode the tasks have then already run).

    ``full``: the feed is the whole of ``catalog``; the products it does not name are delisted
    once it is read to its end, unless producer/sync.py's guards refuse (``force`` overrides
    them). Without it the feed is a delta: it adds and updates, and delists only the rows that
    ask for it."""
    columns = columns or FeedColumns()
    started_at = utcnow()
    summary = IngestSummary(
        run_id=create_run(str(feed), catalog, settings, full), feed=str(feed), full=full
    )
    engine = get_engine(settings)
    try:
        with engine.connect() as conn:
            _stage_meta.create_all(conn)
            create_run_tables(conn)
            conn.commit()
            with (
                _heartbeat(summary.run_id, settings),
                catalog_lock(conn, catalog, settings, enabled=full) as waited,
            ):
                summary.lock_wait_seconds = waited
                _record_feed(conn, feed, columns, catalog, fmt, settings, summary, on_progress)
                cut = looks_cut(feed, fmt, summary.last_row, summary.last_rejected)
                guard = delisting_guard(
                    catalog,
                    settings,
                    force=force,
                    products_named=summary.products_named,
                    cut=cut,
                )
                with conn.begin():
                    outcome = finish_sync(
                        conn,
                        catalog,
                        summary.run_id,
                        full=full,
                        started_at=started_at,
                        refuse=guard if full else None,
                        bulk=summary.created + summary.enqueued >= BULK_ROWS,
                    )
            _sync_outcome(summary, outcome)
            _stage_meta.drop_all(conn)
            drop_run_tables(conn)
            conn.commit()
    except FeedError as error:
        summary.status = RunStatus.FAILED.value
        summary.error = str(error)
        if full:
            summary.sync_refused = (
                "the feed could not be read to its end, so it is not the whole catalog: "
                "nothing was delisted"
            )
        _save_summary(summary, settings, status=summary.status, finished_at=utcnow())
        log.warning("feed rejected run_id=%s error=%s", summary.run_id, error)
        return summary
    summary.status = RunStatus.ENQUEUED.value
    _save_summary(summary, settings, status=summary.status, enqueued_at=utcnow())
    # Workers may all have finished before the producer did; one of us closes the run.
    closed = close_runs(settings, [summary.run_id])
    if closed:
        summary.status = RunStatus.DONE.value
        try:
            send_final_tasks(closed, settings)
        except BROKER_ERRORS as error:  # queued in the database: the reconciler sends it
            summary.broker_error = summary.broker_error or f"{type(error).__name__}: {error}"
    log.info("ingest enqueued run_id=%s %s", summary.run_id, summary.to_dict())
    return summary


def _record_feed(
    conn: Connection,
    feed: Path,
    columns: FeedColumns,
    catalog: str,
    fmt: str | None,
    settings: Settings,
    summary: IngestSummary,
    on_progress: Callable[[IngestSummary, int], None] | None,
) -> None:
    """Every chunk of the feed: recorded in its own transaction, its new images sent after."""
    chunks = _prefetched(
        read_feed(
            feed,
            columns,
            chunk_rows=settings.feed_chunk_rows,
            fmt=fmt,
            max_url_length=settings.max_url_length,
        )
    )
    sender = _Sender(settings)
    try:
        with sender:
            for chunk in chunks:
                with conn.begin():
                    new_ids, counts = record_chunk(conn, summary.run_id, catalog, chunk.images)
                    _record_rejected(conn, summary.run_id, chunk)
                _count(summary, chunk, len(new_ids))
                summary.add(counts)
                # Committed above: now the workers may see the rows.
                sender.send(new_ids)
                summary.enqueued += len(new_ids)
                if on_progress:
                    on_progress(summary, chunk.rows_read)
    finally:  # what was recorded was sent (or left to the reconciler), even after an error
        summary.messages = sender.messages
        summary.not_sent, summary.broker_error = sender.unsent, sender.broker_error


def _sync_outcome(summary: IngestSummary, outcome: SyncOutcome) -> None:
    summary.delisted = outcome.delisted
    summary.sync_refused = outcome.refused
    if outcome.refused:
        log.warning("full feed refused run_id=%s reason=%s", summary.run_id, outcome.refused)


def _heartbeat(run_id: int, settings: Settings) -> AbstractContextManager[None]:
    """While the producer reads the feed it renews its run's lease: a producer that dies
    mid-feed is noticed by the reconciler, which hands what it recorded to the workers."""

    def renew() -> None:
        with session_scope(settings) as session:
            touch_run(session, run_id)

    return heartbeat(settings.lease_seconds, renew, enabled=not settings.embedded)


def _prefetched(chunks: Iterator[FeedChunk], depth: int = 1) -> Iterator[FeedChunk]:
    """Read (parse, validate) the next chunk in a thread while this one is being recorded:
    Arrow's parser releases the GIL and the database works in its own process, so the two
    overlap instead of taking turns."""
    done = object()
    pending: queue.Queue[object] = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for chunk in chunks:
                pending.put(chunk)
            pending.put(done)
        except BaseException as error:  # handed to the consumer, raised there
            pending.put(error)

    threading.Thread(target=produce, name="feed-reader", daemon=True).start()
    while True:
        item = pending.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield cast(FeedChunk, item)  # neither the end marker nor an error: a chunk


class _Sender:
    """Publishes a chunk's download messages while the next chunk is parsed and recorded.

    Publishing is a broker round trip per message and recording waits on the database, so
    overlapping the two nearly halves a large ingest. At most ``depth`` chunks wait to be sent,
    which bounds memory. In embedded mode sending *runs* the tasks, so it stays inline.
    """

    def __init__(self, settings: Settings, depth: int = 2) -> None:
        self.settings = settings
        self.depth = depth
        self.messages = 0
        # Images recorded but not sent because the broker could not be reached, and why. The
        # rows are committed and due: the reconciler sends them once the broker is back.
        self.unsent = 0
        self.broker_error: str | None = None
        self._pool = None if settings.embedded else ThreadPoolExecutor(1, "enqueue")
        self._pending: deque[Future[int]] = deque()

    def _publish(self, ids: list[int]) -> int:
        if self.broker_error is not None:  # down a moment ago: do not wait on it per chunk
            self.unsent += len(ids)
            return 0
        try:
            return enqueue(DOWNLOAD_TASK, ids, self.settings.download_batch_size, self.settings)
        except BROKER_ERRORS as error:
            self.broker_error = f"{type(error).__name__}: {error}"
            self.unsent += len(ids)
            log.warning("broker unreachable: recorded images are left to the reconciler: %s", error)
            return 0

    def send(self, ids: list[int]) -> None:
        if self._pool is None:
            self.messages += enqueue(
                DOWNLOAD_TASK, ids, self.settings.download_batch_size, self.settings
            )
            return
        self._pending.append(self._pool.submit(self._publish, ids))
        while len(self._pending) > self.depth:
            self.messages += self._pending.popleft().result()

    def __enter__(self) -> _Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        # Even when reading failed half-way, what was recorded is sent: those rows are real.
        try:
            while self._pending:
                self.messages += self._pending.popleft().result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def _count(summary: IngestSummary, chunk: FeedChunk, new_images: int) -> None:
    summary.rows_read += chunk.rows_read
    summary.blank_rows += chunk.blank
    summary.accepted += len(chunk.images)
    summary.invalid += len(chunk.rejected)
    summary.invalid_by_reason.update(r.reason for r in chunk.rejected)
    summary.duplicates_in_feed += chunk.duplicates
    summary.already_known += len(chunk.images) - new_images
    summary.notes_by_reason.update(r.reason for r in chunk.notes)
    numbers = [r.row_number for r in (*chunk.rejected, *chunk.notes)]
    if not chunk.images.empty:
        numbers.append(int(chunk.images["row_number"].max()))
    summary.last_row = max([summary.last_row, *numbers])
    if chunk.rejected:
        summary.last_rejected = max(r.row_number for r in chunk.rejected)
