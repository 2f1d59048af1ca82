"""Versioned index files and the atomic ``current.json`` pointer to the served one, in a local
directory or under the ``index/`` folder of a remote storage (``FLICKD_STORAGE_URL``).

A version's files are written first, its sidecar ``.json`` last; then the pointer, one small
object, names it. A reader follows only the pointer, so it never meets a version still being
written. Two publishers at once each write their own version; the pointer is one atomic PUT
(or rename), so it names one of them, whole. What a killed writer left (a version without
its sidecar, a temporary file) is never served and is swept by age at the next publish.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from flickd.core.storage import PARTIAL_MAX_AGE, Storage, sweep_partials
from models.index.atomic import atomic_write
from models.index.codec import refine_path
from models.index.vector_index import VectorIndex, sidecar_path

CURRENT = "current.json"

Target = str | Path | Storage  # a local directory, or a storage folder


def _local_dir(target: Target) -> Path | None:
    if isinstance(target, Storage):
        return target.local_dir
    return Path(target)


def write_versioned(
    index: VectorIndex, directory: Target, *, keep: int = 3, scratch: Path | None = None
) -> Path | str:
    """Save as ``index-<UTC timestamp>-<n>.faiss`` in ``directory``, then repoint
    ``current.json`` at it: readers switch only to a completely written index. The ``keep``
    newest versions stay (a reader may still be loading the previous one). A remote storage
    gets files saved under ``scratch`` (a temporary folder) and uploaded; returns the URL."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"index-{stamp}-{index.ntotal}.faiss"
    local = _local_dir(directory)
    if local is not None:
        path = index.save(local / name)
        files = [p.name for p in _version_files(path) if p.exists()]
        pointer = _pointer(index, name, files)
        atomic_write(local / CURRENT, lambda tmp: tmp.write_text(json.dumps(pointer)))
        _prune(local, keep=max(1, keep))
        return path
    assert isinstance(directory, Storage)
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="index-") as tmp:
        path = index.save(Path(tmp) / name)
        # The sidecar last: a version counts once its sidecar exists.
        written = [p for p in (refine_path(path), path, sidecar_path(path)) if p.exists()]
        for file in written:
            directory.put_file(file.name, file)
    pointer = _pointer(index, name, [f.name for f in written])
    directory.put_bytes(CURRENT, json.dumps(pointer).encode())
    _prune_remote(directory, keep=max(1, keep))
    return directory.describe(name)


def _pointer(index: VectorIndex, name: str, files: list[str]) -> dict[str, object]:
    return {
        "index": name,
        "files": files,
        "n": index.ntotal,
        "model_version_id": index.model_version_id,
        "switched_at": datetime.now(UTC).isoformat(),
    }


def _version_files(path: Path) -> tuple[Path, Path, Path]:
    return refine_path(path), path, sidecar_path(path)


def _prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete versions (the names sort by time). A version
    counts once its sidecar, written last, exists; files being written are never touched, and
    what a killed writer left is removed once it is old."""
    served = current_path(directory)
    sidecars = sorted(directory.glob("index-*.json"))
    for sidecar in sidecars[:-keep]:
        path = sidecar.with_suffix(".faiss")
        if path == served:  # a rollback may point at an old version
            continue
        for file in _version_files(path):  # the sidecar last, as it came first
            file.unlink(missing_ok=True)
    now = time.time()
    for stray in [*directory.glob(".*.tmp"), *directory.glob("index-*.faiss")]:
        if stray.suffix == ".faiss" and sidecar_path(stray).exists():
            continue
        try:
            if now - stray.stat().st_mtime > PARTIAL_MAX_AGE:
                for file in (refine_path(stray), stray):
                    file.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def _prune_remote(storage: Storage, keep: int) -> None:
    listing = storage.listing()
    served = _read_pointer(storage).get("index")
    sidecars = sorted(k for k in listing if k.startswith("index-") and k.endswith(".json"))
    for sidecar in sidecars[:-keep]:
        name = sidecar.removesuffix(".json") + ".faiss"
        if name == served:
            continue
        for key in (name.removesuffix(".faiss") + ".refine.npz", name, sidecar):
            storage.delete(key)
    now = time.time()
    for key, info in listing.items():  # versions whose writer died before the sidecar
        if not key.endswith(".faiss") or f"{key.removesuffix('.faiss')}.json" in listing:
            continue
        if info["mtime"] is not None and now - info["mtime"] > PARTIAL_MAX_AGE:
            storage.delete(f"{key.removesuffix('.faiss')}.refine.npz")
            storage.delete(key)
    sweep_partials(storage, "")


def _read_pointer(storage: Storage) -> dict[str, object]:
    try:
        return dict(json.loads(storage.get_bytes(CURRENT)))
    except FileNotFoundError:
        return {}


def current_path(directory: str | Path) -> Path:
    """The index file ``current.json`` names; FileNotFoundError when there is none."""
    directory = Path(directory)
    name = json.loads((directory / CURRENT).read_text())["index"]
    return directory / Path(name).name  # a bare name: the pointer cannot leave the directory


def load_pointed(storage: Storage, pointer: dict[str, object]) -> VectorIndex:
    """The index a pointer names, through the local cache of a remote storage."""
    name = Path(str(pointer["index"])).name
    listed = pointer.get("files")
    files = [Path(str(f)).name for f in listed] if isinstance(listed, list) else []
    keys = files or [name, Path(name).with_suffix(".json").name]
    folder = storage.local_copy(keys, name)
    return VectorIndex.load(folder / name)


def load_current(directory: Target) -> VectorIndex:
    local = _local_dir(directory)
    if local is not None:
        return VectorIndex.load(current_path(local))
    assert isinstance(directory, Storage)
    pointer = _read_pointer(directory)
    if not pointer:
        raise FileNotFoundError(directory.describe(CURRENT))
    return load_pointed(directory, pointer)
