"""Versioned index files in a directory and the atomic ``current.json`` pointer to the served
one."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from models.index.atomic import atomic_write
from models.index.codec import refine_path
from models.index.vector_index import VectorIndex

CURRENT = "current.json"


def write_versioned(index: VectorIndex, directory: str | Path, *, keep: int = 3) -> Path:
    """Save as ``index-<UTC timestamp>-<n>.faiss`` in ``directory``, then repoint
    ``current.json`` at it: readers switch only to a completely written index. The ``keep``
    newest versions stay on disk (a reader may still be loading the previous one)."""
    directory = Path(directory)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = index.save(directory / f"index-{stamp}-{index.ntotal}.faiss")
    pointer = {
        "index": path.name,
        "n": index.ntotal,
        "model_version_id": index.model_version_id,
        "switched_at": datetime.now(UTC).isoformat(),
    }
    atomic_write(directory / CURRENT, lambda tmp: tmp.write_text(json.dumps(pointer)))
    _prune(directory, keep=max(1, keep))
    return path


def _prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete versions (the names sort by time). A version
    counts once its sidecar, written last, exists; files being written are never touched."""
    served = current_path(directory)
    sidecars = sorted(directory.glob("index-*.json"))
    for sidecar in sidecars[:-keep]:
        path = sidecar.with_suffix(".faiss")
        if path == served:  # a rollback may point at an old version
            continue
        for file in (refine_path(path), path, sidecar):  # the sidecar last, as it came first
            file.unlink(missing_ok=True)


def current_path(directory: str | Path) -> Path:
    """The index file ``current.json`` names; FileNotFoundError when there is none."""
    directory = Path(directory)
    name = json.loads((directory / CURRENT).read_text())["index"]
    return directory / Path(name).name  # a bare name: the pointer cannot leave the directory


def load_current(directory: str | Path) -> VectorIndex:
    return VectorIndex.load(current_path(directory))
