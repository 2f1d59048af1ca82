"""Content-addressed blob store: a blob's key is the SHA-256 of its bytes.

Keys never come from feed values, identical images are stored once, and a write is atomic
(on a local disk temp file + rename; on an object store one PUT), so a worker killed mid-write
leaves no half-written blob behind under a key.

The store is the ``blobs/`` folder of the storage (``FLICKD_STORAGE_URL``): a local directory
keeps the fast path below; a remote one goes through :class:`flickd.core.storage.Storage`,
read through the process's local cache.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from flickd.core.storage import BLOBS, Storage, storage_for

if TYPE_CHECKING:
    from flickd.core.settings import Settings

_sequence = itertools.count()


class BlobStore:
    def __init__(self, root: Path | str | Storage) -> None:
        self.remote: Storage | None = None
        if isinstance(root, Storage):
            if root.local_dir is None:
                self.remote = root
            root = root.local_dir or Path(".")
        self.root = Path(root)
        self._folders: set[Path] = set()

    @classmethod
    def for_settings(cls, settings: Settings) -> BlobStore:
        """The blob store of the storage the settings name."""
        return cls(storage_for(settings).at(BLOBS))

    @staticmethod
    def key_for(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def relative(key: str) -> str:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return f"{key[:2]}/{key[2:4]}/{key}"

    def path(self, key: str) -> Path:
        return self.root / self.relative(key)

    def put(self, data: bytes) -> str:
        key = self.key_for(data)
        if self.remote is not None:
            # Same key, same bytes: a second PUT is harmless and cheaper than asking first.
            self.remote.put_bytes(self.relative(key), data)
            return key
        target = self.path(key)
        if target.exists():
            return key
        folder = target.parent
        if folder not in self._folders:  # one mkdir per folder per process, not per blob
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        # A name no other writer uses (process, thread, sequence): cheaper than mkstemp's
        # random names, and still opened with O_EXCL.
        tmp = folder / f".tmp-{os.getpid()}-{threading.get_ident()}-{next(_sequence)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:  # the folder was removed since (a wiped cache)
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, flags, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes:
        if self.remote is not None:
            return self.remote.read_cached(self.relative(key))
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        if self.remote is not None:
            return self.remote.exists(self.relative(key))
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        """Remove the blob (nothing happens when it is not there). Callers make sure no row
        uses it any more: identical bytes share one key."""
        if self.remote is not None:
            self.remote.delete(self.relative(key))
            return
        self.path(key).unlink(missing_ok=True)
