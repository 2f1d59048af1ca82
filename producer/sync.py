"""Full feeds: the guards that keep a broken export from wiping a store, and one full feed of a
catalog at a time.

A full feed (``flickd ingest FEED --full``) is the whole catalog: once it is read to its end,
the products of its catalog it does not name are delisted (db/catalog.py ``finish_sync``). The
delisting is refused, with the reason recorded on the run and nothing delisted, when

* the feed could not be read to its end (a reader error mid-file: a cut gzip or zstd stream, a
  damaged Parquet page or XLSX sheet), or it *looks cut*: the file does not end with a line
  break and its last row was rejected or has fewer fields than the header (a CSV or JSON
  Lines export that stopped mid-row; one cut exactly at a line end cannot be told from a
  shorter feed, which the share guard below catches);
* it names no product at all (a header-only export);
* it would delist more than ``FLICKD_MAX_DELIST_SHARE`` of the catalog's listed products
  (default 0.2: a healthy daily feed delists a few percent; a broken export loses half of
  the catalog or all of it, so a fifth is well clear of both);

unless the operator passes ``--force``. The rows a refused feed did name are still recorded
(added and updated, as a delta would be): they are real.

Two full feeds of one catalog never mix: a run holds its catalog's lock from before its first
row until its delisting commits (a Postgres session advisory lock; with SQLite, a lock file
beside the data). A second full feed waits for the first, renewing its own heartbeat meanwhile,
then applies its whole feed.
"""

from __future__ import annotations

import csv
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection

from db.catalog import SyncOutcome
from flickd.core.settings import Settings
from producer.feeds.formats import format_and_compression

log = logging.getLogger(__name__)

LOCK_NAMESPACE = 7734203  # pg advisory locks: (this, the catalog's CRC-32)
LOCK_POLL_SECONDS = 0.2


def _catalog_key(catalog: str) -> int:
    """The catalog's lock key: its CRC-32 as a signed 32-bit integer."""
    return zlib.crc32(catalog.encode()) - 2**31


@contextmanager
def catalog_lock(
    conn: Connection, catalog: str, settings: Settings, *, enabled: bool = True
) -> Iterator[float]:
    """Hold ``catalog``'s full-feed lock for the block; yields the seconds spent waiting."""
    if not enabled:
        yield 0.0
        return
    started = time.monotonic()
    if conn.dialect.name == "postgresql":
        key = _catalog_key(catalog)

        def take() -> bool:
            held = conn.exec_driver_sql(
                f"SELECT pg_try_advisory_lock({LOCK_NAMESPACE}, {key})"
            ).scalar()
            conn.commit()  # a session lock: it outlives the statement's transaction
            return bool(held)

        _wait_for(take, catalog)
        try:
            yield time.monotonic() - started
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({LOCK_NAMESPACE}, {key})")
            conn.commit()
        return
    from filelock import FileLock, Timeout

    folder = Path(settings.data_dir) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f"catalog-{_catalog_key(catalog) + 2**31:08x}.lock"))

    def take_file() -> bool:
        try:
            lock.acquire(timeout=0)
            return True
        except Timeout:
            return False

    _wait_for(take_file, catalog)
    try:
        yield time.monotonic() - started
    finally:
        lock.release()


def _wait_for(take: Callable[[], bool], catalog: str) -> None:
    if take():
        return
    log.info("waiting for another full feed of catalog %r to finish", catalog)
    while not take():
        time.sleep(LOCK_POLL_SECONDS)
    log.info("the other full feed of catalog %r finished: this one goes on", catalog)


def looks_cut(path: Path, fmt: str | None, last_row: int, last_rejected: int | None) -> str | None:
    """Why an uncompressed CSV/TSV/JSON Lines feed looks cut short, or None. An export that
    stopped mid-row leaves a file without a final line break whose last row was rejected (a
    broken URL, a JSON line cut in two) or has fewer fields than the header (the reader pads
    such a row, so it would pass for a product with empty fields)."""
    try:
        kind, compression = format_and_compression(path, fmt)
        if compression is not None or kind not in ("csv", "tsv", "jsonl"):
            return None
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.readline()
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
    except (OSError, ValueError):
        return None
    if not tail or tail.endswith((b"\n", b"\r")):
        return None
    if last_rejected is not None and last_rejected >= last_row:
        why = f"its last row ({last_rejected}) was rejected"
    elif kind != "jsonl" and _fields(tail.splitlines()[-1], kind) < _fields(head, kind):
        why = "its last line has fewer fields than the header"
    else:
        return None
    return f"the feed looks cut short: {why} and the file does not end with a line break"


_TAIL_BYTES = 64 * 1024


def _fields(line: bytes, kind: str) -> int:
    text = line.decode("utf-8", errors="replace")
    return max(
        (len(row) for row in csv.reader([text], delimiter="\t" if kind == "tsv" else ",")),
        default=0,
    )


def delisting_guard(
    catalog: str,
    settings: Settings,
    *,
    force: bool,
    products_named: int,
    cut: str | None,
) -> Callable[[SyncOutcome], str | None]:
    """The refusal rule of a full feed (None: go ahead), given what the run would delist."""

    def refuse(outcome: SyncOutcome) -> str | None:
        if force or not outcome.delisted:
            return None
        nothing = "nothing was delisted; pass --force if this is intended"
        if cut:
            return f"{cut}; {nothing}"
        if not products_named:
            return (
                f"the full feed names no product: it would delist all {outcome.delisted} "
                f"listed products of catalog {catalog!r}; {nothing}"
            )
        share = outcome.delisted / outcome.listed_before if outcome.listed_before else 0.0
        if share > settings.max_delist_share:
            return (
                f"the full feed would delist {outcome.delisted} of the {outcome.listed_before} "
                f"listed products of catalog {catalog!r} ({share:.0%}, above "
                f"FLICKD_MAX_DELIST_SHARE={settings.max_delist_share:g}); {nothing}"
            )
        return None

    return refuse
