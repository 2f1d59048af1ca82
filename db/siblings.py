"""Sibling images: the same URL under several products is fetched once and analysed once.

An image row stays per (product, URL), so each product keeps its own state, crops and search
hits. Images with the same ``url_hash`` are *siblings*: once one of them has the bytes, the
others take its blob instead of fetching (:func:`adopt_downloads`, when their batch is
claimed; the producer sends a chunk's siblings in one batch, which fetches each URL once);
once one is analysed, the others with the same bytes copy its
crops and embeddings instead of running the models (:func:`adopt_analysis`, in the analysing
commit and at the claim of a later batch).

Every copy is a guarded transition (``state = 'queued'`` or ``'downloaded'``) plus
``ON CONFLICT DO NOTHING`` rows, so a sibling that a worker is working on at the same moment
ends in one terminal state with nothing written twice; a sibling no copy reached is still a
pending image, which the reconciler re-drives like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Connection, DateTime, literal, select, update
from sqlalchemy.orm import aliased

from db.catalog import retire_for_images
from db.schema import Crop, Embedding, Image, ImageState, utcnow
from db.sql import id_in
from db.versions import dialect_insert

_HAS_BYTES = (ImageState.DOWNLOADED.value, ImageState.ANALYZED.value)


def adopt_downloads(conn: Connection, image_ids: Sequence[int]) -> list[int]:
    """The still-queued images of ``image_ids`` whose URL a sibling already downloaded take
    its blob and move to ``downloaded`` without a fetch; returns their ids."""
    if not image_ids:
        return []
    images = Image.__table__
    donor = aliased(Image)
    best = (
        select(donor.id)
        .where(
            donor.url_hash == images.c.url_hash,
            donor.id != images.c.id,
            donor.blob_key.is_not(None),
            donor.state.in_(_HAS_BYTES),
        )
        .order_by(donor.id)
        .limit(1)
        .scalar_subquery()
    )
    donor_row = aliased(Image)

    def donors(column: str) -> object:
        return select(getattr(donor_row, column)).where(donor_row.id == best).scalar_subquery()

    now = utcnow()
    adopted = conn.execute(
        update(images)
        .where(
            id_in(conn, images.c.id, image_ids),
            images.c.state == ImageState.QUEUED.value,
            best.is_not(None),
        )
        .values(
            state=ImageState.DOWNLOADED.value,
            blob_key=donors("blob_key"),
            content_hash=donors("content_hash"),
            width=donors("width"),
            height=donors("height"),
            stage_attempts=0,
            last_error=None,
            downloaded_at=now,
            updated_at=now,
        )
        .returning(images.c.id)
    )
    return sorted(adopted.scalars())


def adopt_analysis(
    conn: Connection, image_ids: Sequence[int], now: datetime | None = None
) -> list[int]:
    """The still-``downloaded`` images of ``image_ids`` whose bytes an analysed image already
    has copy its crops (same crop blobs) and embeddings (every model version) and become
    ``analyzed``; returns their ids."""
    if not image_ids:
        return []
    images = Image.__table__
    donor = aliased(Image)
    rows = conn.execute(
        select(
            images.c.id,
            select(donor.id)
            .where(
                donor.blob_key == images.c.blob_key,
                donor.id != images.c.id,
                donor.state == ImageState.ANALYZED.value,
            )
            .order_by(donor.id)
            .limit(1)
            .scalar_subquery()
            .label("donor_id"),
        ).where(
            id_in(conn, images.c.id, image_ids),
            images.c.state == ImageState.DOWNLOADED.value,
            images.c.blob_key.is_not(None),
        )
    ).all()
    pairs = [(row.id, row.donor_id) for row in rows if row.donor_id is not None]
    for sibling, source in pairs:
        _copy_crops(conn, source, sibling)
    if not pairs:
        return []
    now = now or utcnow()
    changed = set(
        conn.scalars(
            update(images)
            .where(
                id_in(conn, images.c.id, [sibling for sibling, _ in pairs]),
                images.c.state == ImageState.DOWNLOADED.value,
            )
            .values(state=ImageState.ANALYZED.value, analyzed_at=now, updated_at=now)
            .returning(images.c.id)
        )
    )
    return [sibling for sibling, _ in pairs if sibling in changed]


def share_analysis(
    conn: Connection, image_ids: Sequence[int], now: datetime | None = None
) -> list[int]:
    """Downloaded siblings (same bytes) of the just-analysed ``image_ids`` copy their analysis
    (same commit); returns the siblings' ids."""
    if not image_ids:
        return []
    images = Image.__table__
    keys = select(images.c.blob_key).where(
        id_in(conn, images.c.id, image_ids), images.c.state == ImageState.ANALYZED.value
    )
    waiting = list(
        conn.scalars(
            select(images.c.id).where(
                images.c.blob_key.in_(keys), images.c.state == ImageState.DOWNLOADED.value
            )
        )
    )
    return adopt_analysis(conn, waiting, now)


_CROP_COPIED = [c.name for c in Crop.__table__.columns if c.name not in ("id", "image_id")]


def _copy_crops(conn: Connection, source: int, sibling: int) -> None:
    """``source``'s crops and their embeddings, as ``sibling``'s (keyed: never twice)."""
    crops, embeddings = Crop.__table__, Embedding.__table__
    insert = dialect_insert(conn)
    now = _literal_time(utcnow())
    copied = [now if name == "created_at" else crops.c[name] for name in _CROP_COPIED]
    conn.execute(
        insert(crops)
        .from_select(
            ["image_id", *_CROP_COPIED],
            select(literal(sibling, BigInteger), *copied).where(crops.c.image_id == source),
        )
        .on_conflict_do_nothing(index_elements=["image_id", "crop_index"])
    )
    theirs, mine = aliased(Crop), aliased(Crop)
    conn.execute(
        insert(embeddings)
        .from_select(
            ["crop_id", "model_version_id", "dim", "vector", "created_at"],
            select(
                mine.id,
                embeddings.c.model_version_id,
                embeddings.c.dim,
                embeddings.c.vector,
                now,
            )
            .select_from(embeddings)
            .join(theirs, theirs.id == embeddings.c.crop_id)
            .join(mine, (mine.image_id == sibling) & (mine.crop_index == theirs.crop_index))
            .where(theirs.image_id == source),
        )
        .on_conflict_do_nothing(index_elements=["crop_id", "model_version_id"])
    )


def _literal_time(now: datetime) -> Any:
    return literal(now, DateTime(timezone=True))


def analyse_once(conn: Connection, image_ids: Sequence[int]) -> list[int]:
    """Of a just-claimed analysis batch, the images the models must see: those whose bytes an
    analysed sibling has copy its analysis now (and retire what they replace); of the rest,
    one per blob. The others stay claimed and ``downloaded``, and copy the analysis in the
    commit that writes it (:func:`share_analysis`); if that image fails, they are re-driven
    after the lease like any stalled image and analysed on their own."""
    adopted = adopt_analysis(conn, image_ids)
    retire_for_images(conn, adopted)
    taken = set(adopted)
    rest = [i for i in image_ids if i not in taken]
    if not rest:
        return []
    images = Image.__table__
    keys = dict(
        conn.execute(select(images.c.id, images.c.blob_key).where(id_in(conn, images.c.id, rest)))
        .tuples()
        .all()
    )
    leaders: dict[object, int] = {}
    for image_id in sorted(rest):
        leaders.setdefault(keys.get(image_id) or ("no blob", image_id), image_id)
    return sorted(leaders.values())


def analysis_leaders(conn: Connection, image_ids: Sequence[int]) -> list[int]:
    """Of just-downloaded ``image_ids``, those to send to analysis: all but the images whose
    bytes a sibling of lower id is also waiting to have analysed. That sibling's analysing
    commit copies its analysis to them (:func:`share_analysis`); an image whose sibling is
    already analysed is sent, and copies the analysis when it is claimed."""
    if not image_ids:
        return []
    images = Image.__table__
    earlier = aliased(Image)
    waiting_sibling = (
        select(literal(1))
        .where(
            earlier.blob_key == images.c.blob_key,
            earlier.id < images.c.id,
            earlier.state == ImageState.DOWNLOADED.value,
        )
        .exists()
    )
    return sorted(
        conn.scalars(
            select(images.c.id).where(
                id_in(conn, images.c.id, image_ids),
                images.c.state == ImageState.DOWNLOADED.value,
                ~waiting_sibling,
            )
        )
    )
