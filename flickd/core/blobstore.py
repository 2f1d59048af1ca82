"""Content-addressed blob store: a file's name is the SHA-256 of its bytes.

Paths never come from feed values, identical images are stored once, and a write is atomic
(temp file + rename), so a worker killed mid-write leaves no half-written blob behind.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path

_sequence = itertools.count()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._folders: set[Path] = set()

    @staticmethod
    def key_for(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key[2:4] / key

    def put(self, data: bytes) -> str:
        key = self.key_for(data)
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
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).exists()
