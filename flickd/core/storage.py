"""Storage behind one URL: blobs, crops, model versions and index files, through fsspec.

``FLICKD_STORAGE_URL`` names the root (``file:///srv/flickd``, ``s3://bucket/prefix``,
``gs://bucket/prefix``); by default it is the local data directory of the embedded mode.
Credentials and endpoints come from each backend's own environment and config (``AWS_*``,
``AWS_ENDPOINT_URL``, ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``FSSPEC_S3_*``), never
from flickd settings.

Writes are atomic in the object-store sense. On a local disk an object is written to a
temporary name and renamed; on an object store one PUT is all-or-nothing (a multipart upload
is invisible until completed). Anything made of several objects (an index version, a model
directory) is published by one small object written last (the index's ``current.json``, a
model directory's manifest), so a reader never sees half of it, and what a killed writer left
behind without its last object is never served and is swept by age.

A remote root is read through a per-process local cache (``FLICKD_CACHE_MAX_BYTES``, LRU):
model weights, the served index and blobs in flight. The cache directory may be wiped at any
time; whatever is gone is fetched again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from flickd.core.settings import Settings

log = logging.getLogger(__name__)

# The folders of a storage root.
BLOBS, INDEX, MODELS = "blobs", "index", "models"

MANIFEST = ".flickd-manifest"  # no .json suffix: model fingerprints hash top-level .json files
READY = ".ready"  # a cache entry's marker, written last; its mtime is the entry's last use
STORE_PREFIX = "store:"  # a model name that lives in the storage: store:models/clip-…
PARTIAL_MAX_AGE = 3600.0  # seconds after which an unpublished write counts as abandoned


class StorageUnavailable(Exception):
    """The storage could not be reached or refused a write (a missing bucket, no permission,
    no network). Retryable: the work stays due in the database."""


def _key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise ValueError(f"not a storage key: {key!r}")
    return "/".join(parts)


class Cache:
    """A local directory of entries (a file or a directory tree each) with a byte cap, evicted
    least recently used first. Shared safely by the processes of one machine: entries appear by
    rename, and a reader whose entry vanished fetches it again."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._added = 0  # bytes added since the last scan
        self._used = 0  # bytes seen at the last scan
        self._scanned = False
        self._lock = threading.Lock()

    def entry(self, name: str, fill: Callable[[Path], None]) -> Path:
        """The local directory of entry ``name``; ``fill(folder)`` writes it when missing."""
        final = self.root / name.replace("/", "%")
        marker = final / READY
        try:
            os.utime(marker)  # a hit: mark it used
            return final
        except FileNotFoundError:
            pass
        tmp = self.root / f".fill-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            fill(tmp)
            (tmp / READY).touch()
            size = _tree_size(tmp)
            try:
                tmp.rename(final)
            except OSError:  # another process put it there first; ours is a duplicate
                shutil.rmtree(tmp, ignore_errors=True)
                if not marker.exists():
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._lock:
            self._added += size
            over = not self._scanned or self._used + self._added > self.max_bytes
        if over:
            self.evict(keep=final)
        return final

    def evict(self, keep: Path | None = None) -> int:
        """Scan the cache, drop abandoned fills, and remove least recently used entries until
        it fits its cap (never ``keep``, the entry just asked for). Returns the bytes in use."""
        entries: list[tuple[float, int, Path]] = []
        now = time.time()
        try:
            children = list(self.root.iterdir())
        except FileNotFoundError:
            children = []
        for child in children:
            try:
                if child.name.startswith(".fill-"):
                    if now - child.stat().st_mtime > PARTIAL_MAX_AGE:
                        shutil.rmtree(child, ignore_errors=True)
                    continue
                entries.append(((child / READY).stat().st_mtime, _tree_size(child), child))
            except FileNotFoundError:  # being removed by someone else, or never finished
                continue
        used = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if used <= self.max_bytes:
                break
            if path == keep:
                continue
            shutil.rmtree(path, ignore_errors=True)
            used -= size
            log.debug("cache evicted %s bytes=%d", path.name, size)
        if keep is not None and used > self.max_bytes:
            log.warning(
                "cache over its cap: %s alone is larger (used=%d max=%d)",
                keep.name,
                used,
                self.max_bytes,
            )
        with self._lock:
            self._used, self._added, self._scanned = used, 0, True
        return used


def _tree_size(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(folder, name)).st_size
    return total


class Storage:
    """One storage root: keys relative to it, atomic writes, reads through the cache."""

    def __init__(self, url: str, cache: Cache | None = None, fs: Any = None) -> None:
        self.url = url.rstrip("/")
        if fs is None:
            # A fresh client per Storage: the backend reads its environment now, not from an
            # instance another configuration created.
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        else:
            root = fsspec.core.url_to_fs(self.url)[1]
        self.fs = fs
        self.root = str(root).rstrip("/")
        self.cache = cache
        self.local_dir: Path | None = Path(self.root) if isinstance(fs, LocalFileSystem) else None

    def at(self, prefix: str) -> Storage:
        """The same storage, rooted at ``prefix``."""
        return Storage(f"{self.url}/{_key(prefix)}", self.cache, self.fs)

    def path(self, key: str) -> str:
        return f"{self.root}/{_key(key)}"

    def describe(self, key: str = "") -> str:
        return f"{self.url}/{key}" if key else self.url

    # --- single objects ------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one object; a reader sees all of it or nothing."""
        if self.local_dir is not None:
            target = Path(self.path(key))
            _write_local(target, lambda tmp: tmp.write_bytes(data))
            return
        with self._errors(f"write {key}"):
            self.fs.pipe_file(self.path(key), data)

    def put_file(self, key: str, local: Path) -> None:
        if self.local_dir is not None:
            target = Path(self.path(key))
            if Path(local).resolve() != target.resolve():
                _write_local(target, lambda tmp: shutil.copyfile(local, tmp))
            return
        with self._errors(f"write {key}"):
            self.fs.put_file(str(local), self.path(key))

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes, straight from the storage; FileNotFoundError when missing."""
        if self.local_dir is not None:
            return Path(self.path(key)).read_bytes()
        with self._errors(f"read {key}"):
            data = self.fs.cat_file(self.path(key))
        return bytes(data)

    def exists(self, key: str) -> bool:
        if self.local_dir is not None:
            return Path(self.path(key)).exists()
        with self._errors(f"look up {key}"):
            found = self.fs.exists(self.path(key))
        return bool(found)

    def delete(self, key: str) -> None:
        if self.local_dir is not None:
            Path(self.path(key)).unlink(missing_ok=True)
            return
        with self._errors(f"delete {key}"), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(key))

    def listing(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Every object under ``prefix`` (recursively): key relative to this root -> info
        (``size``, and ``mtime``, seconds since the epoch, where the backend says)."""
        base = self.path(prefix) if prefix else self.root
        with self._errors(f"list {prefix or '/'}"):
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
        out = {}
        for name, info in found.items():
            rel = str(name)[len(self.root) :].lstrip("/")
            out[rel] = {"size": int(info.get("size") or 0), "mtime": _mtime(info)}
        return out

    # --- through the cache ---------------------------------------------------------------
    def read_cached(self, key: str) -> bytes:
        """The object's bytes, from the local cache when it holds them."""
        if self.local_dir is not None or self.cache is None:
            return self.get_bytes(key)
        for _attempt in range(3):  # the cache may be wiped between the fetch and the read
            entry = self.cache.entry(
                f"{self._cache_name(key)}", lambda folder: self._download(key, folder / "data")
            )
            try:
                return (entry / "data").read_bytes()
            except FileNotFoundError:
                continue
        return self.get_bytes(key)

    def local_copy(self, keys: list[str], name: str) -> Path:
        """A local folder holding ``keys`` (relative to this root) under their own names:
        the storage's own folder on a local disk, else a cache entry called ``name``."""
        if self.local_dir is not None:
            for key in keys:
                if not Path(self.path(key)).exists():
                    raise FileNotFoundError(self.describe(key))
            return self.local_dir
        if self.cache is None:
            raise RuntimeError("a remote storage needs a local cache")

        def fill(folder: Path) -> None:
            for key in keys:
                target = folder / _key(key)
                target.parent.mkdir(parents=True, exist_ok=True)
                self._download(key, target)

        return self.cache.entry(self._cache_name(name), fill)

    def _download(self, key: str, target: Path) -> None:
        with self._errors(f"read {key}"):
            self.fs.get_file(self.path(key), str(target))

    def _cache_name(self, key: str) -> str:
        # One cache may serve several roots (tests, a moved bucket): the root is in the name.
        return f"{uuid.uuid5(uuid.NAMESPACE_URL, self.url).hex[:8]}/{_key(key)}"

    # --- directories published by a manifest ---------------------------------------------
    def staging_dir(self, prefix: str, scratch: Path) -> Path:
        """Where to write a directory before :meth:`publish_dir`: its final place on a local
        disk, else a folder under ``scratch``."""
        if self.local_dir is not None:
            return Path(self.path(prefix))
        return Path(scratch) / f"{_key(prefix).replace('/', '%')}-{uuid.uuid4().hex[:6]}"

    def publish_dir(self, prefix: str, local: Path) -> None:
        """Upload every file of ``local`` under ``prefix``, then its manifest, last: until the
        manifest exists the directory is not there for :meth:`fetch_dir`."""
        local = Path(local)
        files = sorted(
            p.relative_to(local).as_posix()
            for p in local.rglob("*")
            if p.is_file() and p.name != MANIFEST
        )
        if self.local_dir is None or Path(self.path(prefix)).resolve() != local.resolve():
            for rel in files:
                self.put_file(f"{prefix}/{rel}", local / rel)
        sizes = {rel: (local / rel).stat().st_size for rel in files}
        self.put_bytes(f"{prefix}/{MANIFEST}", json.dumps({"files": sizes}).encode())
        log.info("published %s files=%d", self.describe(prefix), len(files))

    def fetch_dir(self, prefix: str) -> Path:
        """A local folder with the published directory ``prefix``; FileNotFoundError when its
        manifest is missing (never published, or a writer died before it finished)."""
        manifest = json.loads(self.get_bytes(f"{prefix}/{MANIFEST}"))
        keys = [f"{prefix}/{rel}" for rel in manifest["files"]]
        return self.local_copy(keys, prefix) / _key(prefix)

    # --- errors --------------------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Backend errors as StorageUnavailable, with the URL in the message. A missing key
        stays FileNotFoundError (the caller decides); a missing bucket does not."""
        try:
            yield
        except FileNotFoundError as error:
            if "bucket" not in str(error).lower():
                raise
            raise self._unavailable(what, error) from error
        except (StorageUnavailable, ValueError):
            raise
        except Exception as error:  # OSError, PermissionError, botocore's connection errors…
            raise self._unavailable(what, error) from error

    def _unavailable(self, what: str, error: Exception) -> StorageUnavailable:
        return StorageUnavailable(
            f"storage {self.url}: cannot {what}: {type(error).__name__}: {error}"
        )


def _mtime(info: dict[str, Any]) -> float | None:
    value = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _write_local(target: Path, write: Callable[[Path], object]) -> None:
    """Temporary name beside ``target``, then rename: never half a file under its name."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            write(tmp)
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_partials(storage: Storage, prefix: str, *, older_than: float = PARTIAL_MAX_AGE) -> int:
    """Delete what killed writers left under ``prefix``: temporary files of a local disk older
    than ``older_than`` seconds. Returns how many were removed."""
    removed = 0
    now = time.time()
    for key, info in storage.listing(prefix).items():
        name = PurePosixPath(key).name
        if not name.startswith(".tmp-"):
            continue
        if info["mtime"] is not None and now - info["mtime"] > older_than:
            storage.delete(key)
            removed += 1
    return removed


# --- one per process ---------------------------------------------------------------------------
_storages: dict[tuple[int, str, str, int], Storage] = {}
_storages_lock = threading.Lock()


def open_storage(url: str, cache_dir: Path, cache_max_bytes: int) -> Storage:
    """The process's Storage for ``url`` (made once per process: a forked child makes its own,
    since a client's connections and event loop do not survive a fork)."""
    ident = (os.getpid(), url, str(cache_dir), cache_max_bytes)
    with _storages_lock:
        storage = _storages.get(ident)
        if storage is None:
            storage = Storage(url, Cache(cache_dir, cache_max_bytes))
            _storages[ident] = storage
        return storage


def storage_for(settings: Settings) -> Storage:
    """The process's storage root named by the settings."""
    return open_storage(settings.storage_root, settings.cache_dir, settings.cache_max_bytes)


def forget_storages() -> None:
    """Drop the process's storages (tests change the backend's environment between cases)."""
    with _storages_lock:
        _storages.clear()
