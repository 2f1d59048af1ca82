"""The serving index follows the catalog: a replica converges on what the database says, by
itself, within ``FLICKD_FRESHNESS_POLL_SECONDS`` plus the time of one poll.

Level-triggered, like the reconciler: nothing tells a replica that a crop was analysed or a
product delisted; every replica polls Postgres and makes its ``LiveIndex`` (the served base
index, its delta and tombstones: ``models/index/live.py``) agree with the rows. So every
replica reaches the same state within the same bound, whatever it missed, and a replica
started later reaches it too.

Each poll reads what changed since the last one, minus ``FLICKD_FRESHNESS_OVERLAP_SECONDS``:
rows are stamped by their writer when written, not when committed, so a transaction may commit
after a later-stamped one. Re-reading the overlap costs little (crop ids only; a crop already
held is skipped):

* embeddings of the served index's model version stamped since then: crops the index lacks
  get their vector and facts appended to the delta;
* products whose ``updated_at`` moved: their crops' facts are written again; a delisted
  product's crops stop being served (tombstones), a relisted one's are served again (its
  vectors appended when the base was built without them), price, brand, category and stock
  follow;
* images whose ``retired_at`` moved: their crops stop being served.

When ``IndexHolder`` has a new base index, a new ``LiveIndex`` is built beside the served one
and swapped in once complete: the facts of every crop are read (one streamed scan) and every
served crop with an embedding of the version that the base lacks is appended. The same full
pass runs every ``FLICKD_FRESHNESS_RESYNC_SECONDS`` as a safety net (a writer that stamped a
row long before its commit). Queries never wait for a poll: the API runs the polls on a thread
of their own; a process without one (``flickd search``) polls when a query finds the state
older than the poll interval.

Full rebuilds are the reconciler's decision (``workers/reconcile.py``), not a replica's: one
scheduler sees the whole database, where a replica would race its peers to ask.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from db.schema import utcnow
from db.serving import (
    all_crop_facts,
    crop_facts,
    embedded_since,
    embedding_vectors,
    images_retired_since,
    products_changed_since,
)
from db.session import session_scope
from flickd.core.settings import Settings
from models.index import IndexHolder
from models.index.live import STOCK_IN, STOCK_OUT, STOCK_UNKNOWN, CropFacts, LiveIndex

log = logging.getLogger(__name__)


def facts_from_rows(rows: Sequence[Any]) -> CropFacts:
    """``CropFacts`` from rows of ``db.serving`` (``FACT_COLUMNS`` order)."""
    n = len(rows)
    cols = list(zip(*rows, strict=True)) if n else [()] * 11
    price = np.fromiter((math.nan if p is None else float(p) for p in cols[8]), np.float64, n)
    stock = np.fromiter(
        (STOCK_UNKNOWN if s is None else STOCK_IN if s else STOCK_OUT for s in cols[9]),
        np.int8,
        n,
    )
    return CropFacts(
        crop_ids=np.fromiter(cols[0], np.int64, n),
        product_ids=np.fromiter(cols[1], np.int64, n),
        catalog=cols[2],
        brand=cols[3],
        category=cols[4],
        fine_label=cols[5],
        coarse_label=cols[6],
        colour_family=cols[7],
        price=price,
        in_stock=stock,
        served=np.fromiter((bool(s) for s in cols[10]), bool, n),
    )


class Freshness:
    """The ``LiveIndex`` of one serving process, kept in step with the database."""

    def __init__(self, settings: Settings, holder: IndexHolder) -> None:
        self.settings = settings
        self.holder = holder
        self.interval = settings.freshness_poll_seconds
        self.overlap = timedelta(seconds=settings.freshness_overlap_seconds)
        self._live: LiveIndex | None = None
        self._since: datetime | None = None  # start of the last complete poll
        self._next_poll = 0.0  # monotonic
        self._next_resync = 0.0
        self._lock = threading.Lock()  # one refresh at a time
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.polls = 0
        self.last_poll_at: datetime | None = None

    # --- reading -----------------------------------------------------------------------------
    def current(self) -> LiveIndex | None:
        """The live index to search, or None while no index exists. Without the background
        thread, a state older than the poll interval is refreshed first (the first call
        waits for it; later ones only when no other thread is refreshing)."""
        if self._thread is None and (self._live is None or time.monotonic() >= self._next_poll):
            self.refresh(wait=self._live is None)
        elif self._live is None:
            self.refresh(wait=True)  # the thread has not loaded yet: wait for the first load
        return self._live

    def status(self) -> dict[str, Any]:
        live = self._live
        described = live.describe() if live is not None else {}
        return {
            **described,
            "poll_seconds": self.interval,
            "last_poll_at": self.last_poll_at.isoformat() if self.last_poll_at else None,
        }

    # --- the background thread ---------------------------------------------------------------
    def start(self) -> None:
        """Poll on a daemon thread every ``interval`` seconds until ``stop``."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="index-freshness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh(wait=True)
            self._stop.wait(max(0.05, self._next_poll - time.monotonic()))

    # --- one refresh -------------------------------------------------------------------------
    def refresh(self, wait: bool = True) -> None:
        """Bring the live index up to the database now; logs (never raises) a failure and
        keeps serving the previous state."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            self._next_poll = time.monotonic() + self.interval
            index = self.holder.get()
            if index is None:
                return
            live = self._live
            if live is None or live.base is not index:
                started = utcnow()
                fresh = LiveIndex(index)
                self._resync(fresh)
                self._live, self._since = fresh, started
                self._next_resync = time.monotonic() + self.settings.freshness_resync_seconds
                log.info("live index over %s: %s", index.index_type, fresh.describe())
                live = fresh
            if time.monotonic() >= self._next_resync:
                started = utcnow()
                self._resync(live)
                self._since = started
                self._next_resync = time.monotonic() + self.settings.freshness_resync_seconds
            self._poll(live)
        except Exception:
            log.exception("freshness poll failed; serving the previous state")
        finally:
            self._lock.release()

    def _version(self, live: LiveIndex) -> int | None:
        return live.base.model_version_id

    def _resync(self, live: LiveIndex) -> None:
        """Every crop's facts; every served crop the index lacks, appended with its vector."""
        version = self._version(live)
        missing: list[np.ndarray] = []
        with session_scope(self.settings) as session:
            for rows in all_crop_facts(session.connection()):
                facts = facts_from_rows(rows)
                absent = live.update(facts)
                if len(absent):
                    served = facts.crop_ids[facts.served & np.isin(facts.crop_ids, absent)]
                    missing.append(served)
        if version is not None and missing:
            self._append(live, version, np.concatenate(missing).tolist())

    def _poll(self, live: LiveIndex) -> None:
        started = utcnow()
        since = (self._since or started) - self.overlap
        version = self._version(live)
        with session_scope(self.settings) as session:
            conn = session.connection()
            new: list[int] = []
            if version is not None:
                ids = embedded_since(conn, version, since)
                new = ids[~live.has(ids)].tolist()
            products = products_changed_since(conn, since)
            images = images_retired_since(conn, since)
            changed = crop_facts(conn, product_ids=products, image_ids=images)
        if changed:
            facts = facts_from_rows(changed)
            absent = live.update(facts)
            # crops of a relisted product that the base was built without
            new += facts.crop_ids[facts.served & np.isin(facts.crop_ids, absent)].tolist()
        if new and version is not None:
            self._append(live, version, sorted(set(new)))
        self._since = started
        self.polls += 1
        self.last_poll_at = started

    def _append(self, live: LiveIndex, version: int, crop_ids: list[int]) -> None:
        with session_scope(self.settings) as session:
            conn = session.connection()
            ids, vectors = embedding_vectors(conn, version, crop_ids)
            rows = crop_facts(conn, crop_ids=ids.tolist())
        if not len(ids):
            return
        facts = facts_from_rows(rows)
        order = {crop_id: i for i, crop_id in enumerate(ids.tolist())}
        picks = np.fromiter((order[c] for c in facts.crop_ids.tolist()), np.int64, len(facts))
        added = live.add(facts, vectors[picks])
        if added:
            log.info("live index: %d new vectors (%s)", added, live.describe())
