"""The served index of a long-running process, swapped without a pause when ``current.json``
changes: a local file's stat, or a remote storage's pointer object, checked every
``check_interval`` seconds (``FLICKD_INDEX_POLL_SECONDS``)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from flickd.core.storage import Storage
from models.index.files import CURRENT, Target, current_path, load_pointed
from models.index.vector_index import VectorIndex

log = logging.getLogger(__name__)


class IndexHolder:
    """The served index of a long-running process.

    ``get()`` is cheap: at most every ``check_interval`` seconds it stats ``current.json``, and
    only when that changed does one caller load the new index, while every other thread keeps
    getting the old one until the new one is fully loaded; then the reference is swapped.
    A query holding the old index finishes on it. A failed load is logged and the old index
    kept (retried at the next check). Two indexes are in memory during a swap."""

    def __init__(self, directory: Target, check_interval: float = 2.0) -> None:
        self.storage: Storage | None = None
        if isinstance(directory, Storage):
            if directory.local_dir is None:
                self.storage = directory
            directory = directory.local_dir or Path(directory.url)
        self.directory = Path(directory)
        self.check_interval = check_interval
        self._index: VectorIndex | None = None
        # (inode, mtime_ns, size) of a local pointer, or a remote pointer's bytes
        self._seen: tuple[int, int, int] | bytes | None = None
        self._loaded: Path | str | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()

    def get(self) -> VectorIndex | None:
        """The current index, or None while no index has been written."""
        # With nothing served yet, always go through _refresh: it waits for a thread that is
        # loading the first index (the check time is moved before the load finishes, so a
        # caller that only looked at the clock would answer None meanwhile).
        if self._index is None or time.monotonic() >= self._next_check:
            self._refresh()
        return self._index

    def _refresh(self) -> None:
        # With nothing to serve yet, wait for a loading thread rather than answer None.
        if not self._lock.acquire(blocking=self._index is None):
            return
        try:
            if time.monotonic() < self._next_check:
                return  # another thread just checked
            self._next_check = time.monotonic() + self.check_interval
            self._reload_if_changed()
        except Exception:
            log.exception(
                "cannot load the index named by %s; serving the previous one",
                self.storage.describe(CURRENT) if self.storage else self.directory / CURRENT,
            )
        finally:
            self._lock.release()

    def _reload_if_changed(self) -> None:
        if self.storage is not None:
            self._reload_remote(self.storage)
            return
        try:
            st = os.stat(self.directory / CURRENT)
        except FileNotFoundError:
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        path = current_path(self.directory)
        if path != self._loaded:
            index = VectorIndex.load(path)
            log.info("serving index %s (%d vectors)", path.name, index.ntotal)
            self._index, self._loaded = index, path
        self._seen = seen

    def _reload_remote(self, storage: Storage) -> None:
        try:
            raw = storage.get_bytes(CURRENT)
        except FileNotFoundError:
            return
        if raw == self._seen:
            return
        pointer = json.loads(raw)
        name = str(pointer["index"])
        if name != self._loaded:
            index = load_pointed(storage, pointer)
            log.info("serving index %s (%d vectors)", storage.describe(name), index.ntotal)
            self._index, self._loaded = index, name
        self._seen = raw
