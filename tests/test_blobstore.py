"""The content-addressed blob store: atomic writes, one copy per content."""

from __future__ import annotations

import shutil
from pathlib import Path

from flickd.core.blobstore import BlobStore


def test_same_bytes_are_stored_once(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    assert blobs.put(b"one") == blobs.put(b"one") == BlobStore.key_for(b"one")
    assert len([p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]) == 1


def test_blob_store_writes_again_after_its_folders_were_removed(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    first = blobs.put(b"one")
    shutil.rmtree(tmp_path / "blobs")  # e.g. a cache wiped under a running worker
    assert blobs.put(b"one") == first
    assert blobs.get(first) == b"one"
    assert not [p for p in (tmp_path / "blobs").rglob(".tmp-*")]  # no temp file left behind
