"""Download stage: fetch a batch of images concurrently, validate, store, record the outcome.

One Celery message carries a batch of image ids; inside the task a thread pool fetches them
(downloading is I/O-bound, so threads, not processes, give the concurrency). Every image ends
in exactly one state: ``downloaded`` or ``failed`` with a reason. The same URL under several
products is fetched once (db/siblings.py). The batch's outcomes are
committed together, each guarded by ``state = 'queued'``, so a re-delivered batch (after a
worker was killed) finishes what is left and rewrites nothing.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Connection, bindparam, select

from db.images import claim, record_failures, transition
from db.schema import Image, ImageState, utcnow
from db.session import retrying, session_scope
from db.siblings import adopt_downloads, analysis_leaders
from db.sql import id_in
from flickd.core.blobstore import BlobStore
from flickd.core.broker import ANALYZE_TASK
from flickd.core.logs import log_context
from flickd.core.reasons import FailureReason, ImageFailure
from flickd.core.settings import Settings
from flickd.core.storage import StorageUnavailable
from flickd.fetching.fetch import HttpClient, fetch, make_session
from flickd.fetching.geometry import GeometryLimits
from flickd.fetching.imaging import validate_image
from workers.stage import StageResult, holding

log = logging.getLogger(__name__)


@dataclass
class DownloadOutcome:
    image_id: int
    run_id: int | None
    attempts: int
    blob_key: str | None = None
    width: int | None = None
    height: int | None = None
    reason: FailureReason | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


class _ProcessResources:
    """A pooled HTTP session and thread pool per process (never shared across a fork)."""

    _lock = threading.Lock()
    _pid: int | None = None
    _session: HttpClient | None = None
    _pool: ThreadPoolExecutor | None = None
    _key: tuple[object, ...] | None = None

    @classmethod
    def get(cls, settings: Settings) -> tuple[HttpClient, ThreadPoolExecutor]:
        key = (os.getpid(), settings.download_threads, tuple(settings.allowed_networks))
        with cls._lock:
            if cls._key != key:
                cls._session = make_session(settings)
                cls._pool = ThreadPoolExecutor(
                    max_workers=settings.download_threads, thread_name_prefix="download"
                )
                cls._key = key
            assert cls._session is not None and cls._pool is not None
            return cls._session, cls._pool


def download_one(
    image_id: int,
    run_id: int | None,
    url: str,
    settings: Settings,
    session: HttpClient,
    blobs: BlobStore,
) -> DownloadOutcome:
    """Fetch, validate and store one image; never raises."""
    with log_context(image_id=image_id, run_id=run_id):
        attempts = 1
        try:
            # ``url`` is the feed's text (images.url); fetch requests its fetchable_url form.
            fetched = fetch(url, session, settings)
            attempts = fetched.attempts
            decoded = validate_image(
                fetched.content,
                settings.max_image_pixels,
                GeometryLimits.from_settings(settings),
            )
            key = blobs.put(fetched.content)
            return DownloadOutcome(
                image_id,
                run_id,
                attempts,
                blob_key=key,
                width=decoded.width,
                height=decoded.height,
            )
        except ImageFailure as failure:
            attempts = getattr(failure, "attempts", attempts)
            log.info("image failed reason=%s detail=%s", failure.reason.value, failure.detail)
            return DownloadOutcome(
                image_id, run_id, attempts, reason=failure.reason, detail=failure.detail
            )
        except StorageUnavailable:
            raise  # the whole batch is retried, then re-driven: not this image's fault
        except Exception as error:  # a bug must not take the rest of the batch down
            log.exception("unexpected error downloading image")
            return DownloadOutcome(
                image_id,
                run_id,
                attempts,
                reason=FailureReason.INTERNAL_ERROR,
                detail=f"{type(error).__name__}: {error}",
            )


def claim_queued(image_ids: list[int], settings: Settings) -> list[tuple[int, int | None, str]]:
    """Claim the images of this batch that still need downloading (a re-delivery skips done
    ones; images out of attempts fail here) and return ``(id, run_id, url)`` for each."""

    def step() -> list[tuple[int, int | None, str]]:
        with session_scope(settings) as session:
            conn = session.connection()
            ids = claim(conn, image_ids, ImageState.QUEUED.value, settings.max_stage_attempts)
            # A sibling (same URL, another product) already has the bytes: no fetch.
            adopted = set(adopt_downloads(conn, ids))
            ids = [i for i in ids if i not in adopted]
            if not ids:
                return []
            rows = conn.execute(
                select(Image.id, Image.run_id, Image.url).where(id_in(conn, Image.id, ids))
            ).all()
        return [(row.id, row.run_id, row.url) for row in rows]

    return retrying(step)


def record_outcomes(outcomes: list[DownloadOutcome], settings: Settings) -> None:
    """Write the batch's outcomes in one transaction, each only if the image is still queued."""
    now = utcnow()
    ok = [o for o in outcomes if o.ok]
    bad = [o for o in outcomes if not o.ok]
    table = Image.__table__

    def step() -> None:
        with session_scope(settings) as session:
            write(session.connection())

    def write(conn: Connection) -> None:
        transition(
            conn,
            ImageState.QUEUED.value,
            [
                {
                    "b_id": o.image_id,
                    "b_key": o.blob_key,
                    "b_w": o.width,
                    "b_h": o.height,
                    "b_attempts": o.attempts,
                }
                for o in ok
            ],
            state=ImageState.DOWNLOADED.value,
            blob_key=bindparam("b_key"),
            content_hash=bindparam("b_key"),
            width=bindparam("b_w"),
            height=bindparam("b_h"),
            attempts=table.c.attempts + bindparam("b_attempts"),
            failure_reason=None,
            failure_detail=None,
            stage_attempts=0,  # a new stage begins
            last_error=None,
            downloaded_at=now,
        )
        record_failures(
            conn,
            ImageState.QUEUED.value,
            [(o.image_id, o.reason.value, o.detail, o.attempts) for o in bad if o.reason],
        )

    retrying(step)


def _download_all(
    todo: list[tuple[int, int | None, str]],
    pool: ThreadPoolExecutor,
    settings: Settings,
    session: HttpClient,
    blobs: BlobStore,
) -> list[DownloadOutcome]:
    """Every URL through :func:`download_one` once (the batch's siblings, same URL under
    several products, share the outcome), on at most ``download_threads`` threads that each
    take the next row when done: one pool task per thread, not per image (a future per image
    handed the GIL back and forth 256 times a batch between the task thread and 64 busy
    downloaders)."""
    first: dict[str, int] = {}
    for i, (_id, _run, url) in enumerate(todo):
        first.setdefault(url, i)
    leaders = sorted(first.values())
    outcomes: list[DownloadOutcome | None] = [None] * len(todo)
    rows = iter((i, todo[i]) for i in leaders)
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                item = next(rows, None)
            if item is None:
                return
            i, row = item
            outcomes[i] = download_one(*row, settings, session, blobs)

    # Each thread runs in a copy of this task's context, so its log lines carry the task id.
    slots = min(len(leaders), max(1, settings.download_threads))
    futures = [pool.submit(contextvars.copy_context().run, drain) for _ in range(slots)]
    for future in futures:
        future.result()  # download_one never raises: every leader is filled once they return
    for i, (image_id, run_id, url) in enumerate(todo):
        if outcomes[i] is None:
            lead = cast(DownloadOutcome, outcomes[first[url]])
            outcomes[i] = dataclasses.replace(lead, image_id=image_id, run_id=run_id, attempts=0)
    return cast(list[DownloadOutcome], outcomes)


def download_batch(image_ids: list[int], settings: Settings) -> list[DownloadOutcome]:
    """Download every still-queued image of the batch and record each outcome."""
    todo = claim_queued(image_ids, settings)
    if not todo:
        return []
    session, pool = _ProcessResources.get(settings)
    blobs = BlobStore.for_settings(settings)
    started = time.perf_counter()
    with holding([row[0] for row in todo], ImageState.QUEUED.value, settings):
        outcomes = _download_all(todo, pool, settings, session, blobs)
        record_outcomes(outcomes, settings)
    log.info(
        "download batch done images=%d ok=%d failed=%d seconds=%.2f",
        len(outcomes),
        sum(o.ok for o in outcomes),
        sum(not o.ok for o in outcomes),
        time.perf_counter() - started,
    )
    return outcomes


def download_stage(image_ids: list[int], settings: Settings) -> StageResult:
    """The download task's work: download the batch, then name what follows."""
    download_batch(image_ids, settings)
    # Read the batch back rather than trusting this delivery's outcomes: if an earlier delivery
    # stored the images and died before handing them on, this one must hand them on.
    with session_scope(settings) as session:
        conn = session.connection()
        rows = conn.execute(
            select(Image.id, Image.run_id, Image.state).where(id_in(conn, Image.id, image_ids))
        ).all()
        downloaded = [row.id for row in rows if row.state == ImageState.DOWNLOADED.value]
        # One analysis per distinct image: siblings copy it (db/siblings.py).
        leaders = analysis_leaders(conn, downloaded) if settings.last_stage == "analyze" else []
    result = StageResult(run_ids={row.run_id for row in rows})
    if settings.last_stage == "analyze":
        result.next_task = ANALYZE_TASK
        result.next_ids = leaders
        result.batch_size = settings.analyze_batch_size
    return result
