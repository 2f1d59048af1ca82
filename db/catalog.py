"""Catalog sync in SQL: what a feed run saw, the delisting of what it did not, image supersession
and retirement, and the purge of products delisted past the grace period.

A run records its feed chunk by chunk (producer/ingest.py); the run-wide temporary tables here
remember, across its chunks, which products and (product, image URL) pairs the feed named and
which products it asked to delist. Once the whole feed is read, :func:`finish_sync` applies the
feed to the catalog in one transaction: the seen marks, the superseded images, the delisting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    String,
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    union,
    update,
)
from sqlalchemy.orm import aliased

from db.schema import Crop, Image, ImageState, Product, VideoSearchJob, utcnow
from db.sql import id_in
from db.versions import dialect_insert

_run_meta = MetaData()
# Products the feed named (delisting rows included), once each.
RUN_PRODUCTS = Table(
    "flickd_run_products",
    _run_meta,
    Column("external_id", String(512), primary_key=True),
    prefixes=["TEMPORARY"],
)
# (product, image URL) pairs the feed named: a product's other images are superseded. The
# reader already dropped repeated pairs, so this is a plain heap (cheap appends per chunk),
# indexed once at the run's end.
RUN_IMAGES = Table(
    "flickd_run_images",
    _run_meta,
    Column("external_id", String(512)),
    Column("url_hash", String(32)),
    prefixes=["TEMPORARY"],
)
# Products a row asked to delist (availability "discontinued", deleted = true …).
RUN_DELIST = Table(
    "flickd_run_delist",
    _run_meta,
    Column("external_id", String(512), primary_key=True),
    prefixes=["TEMPORARY"],
)


def create_run_tables(conn: Connection) -> None:
    _run_meta.drop_all(conn, checkfirst=True)
    _run_meta.create_all(conn)


def drop_run_tables(conn: Connection) -> None:
    _run_meta.drop_all(conn, checkfirst=True)


def _attributes_differ(conn: Connection, old: Any, new: Any) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        # json has no equality; jsonb compares values, whatever the key order.
        return old.cast(JSONB).is_distinct_from(new.cast(JSONB))
    return old.is_distinct_from(new)


def product_changed(conn: Connection, old: Any, new: Any) -> Any:
    """SQL: the feed's ``new`` row says something the stored ``old`` product does not."""
    return or_(
        *(
            getattr(old, name).is_distinct_from(getattr(new, name))
            for name in ("title", "brand", "category", "price", "currency", "in_stock")
        ),
        _attributes_differ(conn, old.attributes, new.attributes),
    )


@dataclass
class ChunkCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    relisted: int = 0


def classify_products(conn: Connection, catalog: str, staged: Table) -> ChunkCounts:
    """How the staged products (``external_id``, the product fields, ``delist``) compare with
    the catalog, before they are written; products an earlier chunk of the run named are not
    counted again. Rows that ask to delist are counted when the run ends (:func:`finish_sync`).
    """
    products = Product.__table__
    s = staged.c
    known = products.c.id.is_not(None)
    changed = product_changed(conn, products.c, s)
    live = ~s.delist

    def flag(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    row = conn.execute(
        select(
            flag(live & ~known),
            flag(live & known & products.c.listed & changed),
            flag(live & known & products.c.listed & ~changed),
            flag(live & known & ~products.c.listed),
        )
        .select_from(
            staged.outerjoin(
                products,
                and_(products.c.catalog == catalog, products.c.external_id == s.external_id),
            )
        )
        .where(~exists().where(RUN_PRODUCTS.c.external_id == s.external_id))
    ).one()
    return ChunkCounts(*(int(v) for v in row))


def remember_chunk(conn: Connection, staged: Table, staged_images: Table) -> None:
    """Add the chunk's products, (product, URL) pairs and delisting rows to the run's tables."""
    s = staged.c
    insert = dialect_insert(conn)
    conn.execute(
        insert(RUN_PRODUCTS)
        .from_select(["external_id"], select(s.external_id).distinct().where(literal(True)))
        .on_conflict_do_nothing(index_elements=["external_id"])
    )
    conn.execute(
        insert(RUN_DELIST)
        .from_select(["external_id"], select(s.external_id).distinct().where(s.delist))
        .on_conflict_do_nothing(index_elements=["external_id"])
    )
    si = staged_images.c
    conn.execute(
        RUN_IMAGES.insert().from_select(
            ["external_id", "url_hash"], select(si.external_id, si.url_hash)
        )
    )


def _same_product(products: Table, catalog: str, staged: Any) -> Any:
    return and_(products.c.catalog == catalog, products.c.external_id == staged.external_id)


def restore_named_images(conn: Connection, catalog: str, staged_images: Table) -> None:
    """Images the feed names again after they were superseded (or retired) are current again:
    their analysis is still there, so nothing is downloaded. A retired one returns to search,
    so its product's change time moves (replicas poll it). Driven from the chunk's rows (the
    unique (product, URL) index), never by scanning the images table."""
    images, products = Image.__table__, Product.__table__
    si = staged_images.c
    named = (
        select(images.c.id, images.c.product_id, images.c.retired_at)
        .select_from(staged_images)
        .join(products, _same_product(products, catalog, si))
        .join(
            images,
            and_(images.c.product_id == products.c.id, images.c.url_hash == si.url_hash),
        )
        .where(images.c.superseded_at.is_not(None))
    )
    rows = conn.execute(named).all()
    if not rows:
        return
    returning = sorted({row.product_id for row in rows if row.retired_at is not None})
    if returning:
        conn.execute(
            update(products)
            .where(id_in(conn, products.c.id, returning))
            .values(updated_at=utcnow())
        )
    conn.execute(
        update(images)
        .where(id_in(conn, images.c.id, [row.id for row in rows]))
        .values(superseded_at=None, retired_at=None)
    )


def retire_replaced(
    conn: Connection, product_ids: Any, now: datetime | None = None, *, dropped: bool = False
) -> int:
    """Retire the superseded images of ``product_ids`` (ids, or a subquery of them) whose
    replacement is analysed: they leave search. Returns how many were retired.

    A *replacement* of a superseded image is a current image of its product recorded since
    it was superseded (``superseded_at`` is the start of the run whose feed named the new
    URL). This runs in the transaction that commits a new image's analysis
    (workers/vision.py), so the old image leaves search exactly when the new one can be
    found. While the replacement is pending, or when it failed for good, the old image stays
    served: a product keeps the picture it had rather than none.

    ``dropped`` (the end of a feed run): also retire superseded images that have no
    replacement at all (the feed just dropped that picture) when the product has another
    analysed current image to show.
    """
    images = Image.__table__
    current = aliased(Image)

    def current_image(*conditions: Any) -> Any:
        return (
            select(literal(1))
            .where(
                current.product_id == images.c.product_id,
                current.superseded_at.is_(None),
                *conditions,
            )
            .exists()
        )

    since = current.created_at >= images.c.superseded_at
    analysed = current.state == ImageState.ANALYZED.value
    ready = current_image(since, analysed)
    if dropped:
        ready = ready | (~current_image(since) & current_image(analysed))
    of_products = (
        id_in(conn, images.c.product_id, product_ids)
        if isinstance(product_ids, list | tuple | set)
        else images.c.product_id.in_(product_ids)
    )
    result = conn.execute(
        update(images)
        .where(
            of_products,
            images.c.superseded_at.is_not(None),
            images.c.retired_at.is_(None),
            ready,
        )
        .values(retired_at=now or utcnow())
    )
    return int(result.rowcount or 0)


def retire_for_images(conn: Connection, image_ids: list[int], now: datetime | None = None) -> int:
    """:func:`retire_replaced` for the products of ``image_ids`` (a batch just analysed, at
    ``now``: the old images' ``retired_at`` is the new ones' ``analyzed_at``)."""
    if not image_ids:
        return 0
    images = Image.__table__
    return retire_replaced(
        conn, select(images.c.product_id).where(id_in(conn, images.c.id, image_ids)).distinct(), now
    )


@dataclass
class SyncOutcome:
    delisted: int = 0  # products delisted by this run (missing from a full feed, or asked)
    listed_before: int = 0  # listed products of the catalog that the run did not create
    refused: str | None = None


def finish_sync(
    conn: Connection,
    catalog: str,
    run_id: int,
    *,
    full: bool,
    started_at: datetime,
    refuse: Any = None,
    bulk: bool = False,
) -> SyncOutcome:
    """Apply the whole feed to the catalog (call inside one transaction, after every chunk):

    * every product the feed named gets ``seen_run_id = run_id``;
    * a named product's images the feed no longer names are superseded (``superseded_at`` is
      ``started_at``, the run's start), and retired at once when the feed just dropped them
      and the product has another analysed image (see :func:`retire_replaced`);
    * products a row asked to delist, and with ``full`` every listed product of the catalog
      the feed did not name, are delisted (``listed`` false, ``delisted_at`` and
      ``updated_at`` now) — unless ``refuse(outcome)`` returns a reason, in which case nothing
      is delisted and the reason is returned in the outcome.

    ``bulk``: the run added many rows, so the catalog's statistics are refreshed first.
    """
    products, images = Product.__table__, Image.__table__
    now = utcnow()
    conn.exec_driver_sql(
        f"CREATE INDEX ix_{RUN_IMAGES.name} ON {RUN_IMAGES.name} (external_id, url_hash)"
    )
    if conn.dialect.name == "postgresql":
        tables = [t.name for t in _run_meta.sorted_tables]  # temporary: no statistics
        if bulk:
            # A bulk load leaves the planner believing the catalog is as small as it was;
            # it would then join it by nested loops, quadratically. ANALYZE samples a
            # bounded number of rows whatever the table's size.
            tables += [Product.__tablename__, Image.__tablename__]
        for name in tables:
            conn.exec_driver_sql(f"ANALYZE {name}")
    in_catalog = products.c.catalog == catalog
    conn.execute(  # created and changed products were marked as they were written
        update(products)
        .where(
            in_catalog,
            products.c.external_id.in_(select(RUN_PRODUCTS.c.external_id)),
            products.c.seen_run_id.is_distinct_from(run_id),
        )
        .values(seen_run_id=run_id)
    )
    # Images of products the feed named (a product this run created has no image the feed
    # does not name: only older ones) that the feed did not name: one anti-join.
    owner = aliased(Product)
    named = select(RUN_IMAGES.c.external_id).distinct().subquery()
    pair = aliased(RUN_IMAGES)
    unnamed = (
        select(images.c.id)
        .select_from(images)
        .join(owner, owner.id == images.c.product_id)
        .join(named, named.c.external_id == owner.external_id)
        .outerjoin(
            pair,
            and_(pair.c.external_id == owner.external_id, pair.c.url_hash == images.c.url_hash),
        )
        .where(
            owner.catalog == catalog,
            owner.created_at < started_at,
            images.c.superseded_at.is_(None),
            pair.c.external_id.is_(None),
        )
    )
    superseded = conn.execute(
        update(images)
        .where(images.c.id.in_(unnamed))
        .values(superseded_at=started_at)  # the images recorded since are its replacements
        .returning(images.c.product_id)
    )
    changed = sorted(set(superseded.scalars()))
    for start in range(0, len(changed), 5000):
        retire_replaced(conn, changed[start : start + 5000], now, dropped=True)

    asked = select(products.c.id).where(
        in_catalog, products.c.external_id.in_(select(RUN_DELIST.c.external_id))
    )
    doomed: Any = asked
    if full:
        missing = select(products.c.id).where(
            in_catalog, products.c.seen_run_id.is_distinct_from(run_id)
        )
        doomed = union(asked, missing)
    doomed_ids = select(doomed.subquery().c.id)
    listed = products.c.listed.is_(True)
    outcome = SyncOutcome(
        delisted=int(
            conn.scalar(
                select(func.count()).where(in_catalog, listed, products.c.id.in_(doomed_ids))
            )
            or 0
        ),
        listed_before=int(
            conn.scalar(
                select(func.count()).where(in_catalog, listed, products.c.created_at < started_at)
            )
            or 0
        ),
    )
    outcome.refused = refuse(outcome) if refuse is not None else None
    if outcome.refused:
        outcome.delisted = 0
        return outcome
    conn.execute(
        update(products)
        .where(in_catalog, listed, products.c.id.in_(doomed_ids))
        .values(listed=False, delisted_at=now, updated_at=now)
    )
    return outcome


def purge_delisted(conn: Connection, before: datetime, limit: int) -> tuple[int, set[str]]:
    """Delete up to ``limit`` products delisted before ``before``, with their images, crops and
    embeddings (the foreign keys cascade). Returns how many, and the blob keys their images
    and crops used: the caller deletes those :func:`unused_blobs` says nobody else uses.

    Known gap: a download that stores the very same bytes between that check and the delete
    (the blob store skips a write whose key exists) is left pointing at a deleted blob; its
    analysis then fails it (``corrupt_image``) and `flickd retry` fetches it again."""
    products, images, crops = Product.__table__, Image.__table__, Crop.__table__
    query = (
        select(products.c.id)
        .where(products.c.listed.is_(False), products.c.delisted_at < before)
        .order_by(products.c.delisted_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    ids = list(conn.scalars(query))
    if not ids:
        return 0, set()
    keys: set[str] = set()
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        keys |= set(
            conn.scalars(
                select(images.c.blob_key).where(
                    id_in(conn, images.c.product_id, chunk), images.c.blob_key.is_not(None)
                )
            )
        )
        keys |= set(
            conn.scalars(
                select(crops.c.blob_key)
                .join(images, images.c.id == crops.c.image_id)
                .where(id_in(conn, images.c.product_id, chunk), crops.c.blob_key.is_not(None))
            )
        )
        conn.execute(delete(products).where(id_in(conn, products.c.id, chunk)))
    return len(ids), keys


def unused_blobs(conn: Connection, keys: set[str]) -> list[str]:
    """The blob keys of ``keys`` that no image, crop or video job refers to (an image's
    ``content_hash`` is its ``blob_key``: one indexed lookup covers both)."""
    images, crops, jobs = Image.__table__, Crop.__table__, VideoSearchJob.__table__
    ordered = sorted(keys)
    used: set[str] = set()
    for start in range(0, len(ordered), 5000):  # three lookups per chunk, not three per key
        chunk = ordered[start : start + 5000]
        for column in (images.c.blob_key, crops.c.blob_key, jobs.c.blob_key):
            used |= set(conn.scalars(select(column).where(column.in_(chunk)).distinct()))
    return [key for key in ordered if key not in used]
