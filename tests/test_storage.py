"""Storage behind one URL: atomic objects, the LRU cache, published indexes, and the faults
(an unreachable store at start-up and mid-batch, a missing bucket, a not-writable root, a
full cache, a killed writer, two publishers at once, a replica started mid-replacement)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.schema import Image
from db.session import session_scope
from flickd.core.blobstore import BlobStore
from flickd.core.storage import Cache, Storage, StorageUnavailable, forget_storages
from models.index import CURRENT, IndexHolder, VectorIndex, load_current, write_versioned
from synthetic.procs import ROOT, free_port
from tests.conftest import catalog_fixture, run_flickd
from tests.storage_fixtures import new_bucket, s3, storage_url

__all__ = ["s3"]

catalog = catalog_fixture(3, seed=4)


def flat_index(n: int, dim: int = 8) -> VectorIndex:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, dim)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return VectorIndex.build([(np.arange(1, n + 1, dtype="int64"), x)], dim, n_total=n)


@pytest.fixture(params=["s3", "file"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    return Storage(storage_url(request.param, tmp_path, request), Cache(tmp_path / "cache", 10**9))


# --- objects and blobs -------------------------------------------------------------------------
def test_blobs_round_trip_and_a_missing_key_is_not_found(root: Storage) -> None:
    blobs = BlobStore(root.at("blobs"))
    key = blobs.put(b"jpeg bytes")
    assert key == BlobStore.key_for(b"jpeg bytes") and blobs.exists(key)
    assert blobs.get(key) == b"jpeg bytes"
    assert blobs.put(b"jpeg bytes") == key  # content-addressed: stored once, same key
    missing = BlobStore.key_for(b"never stored")
    assert not blobs.exists(missing)
    with pytest.raises(FileNotFoundError):
        blobs.get(missing)


def test_the_cache_fills_its_cap_evicts_lru_and_survives_a_wipe(s3, tmp_path, request) -> None:
    url = storage_url("s3", tmp_path, request)
    cache = Cache(tmp_path / "cache", max_bytes=3000)
    blobs = BlobStore(Storage(url, cache).at("blobs"))
    payloads = [bytes([i]) * 1000 for i in range(6)]
    keys = [blobs.put(p) for p in payloads]
    for key, payload in zip(keys, payloads, strict=True):
        assert blobs.get(key) == payload
    assert cache.evict() <= 3000  # six 1000-byte blobs read, at most three kept
    kept = [p.name for p in cache.root.rglob("*") if p.is_dir() and (p / ".ready").exists()]
    assert kept and len(kept) <= 2 + 1
    assert any(keys[-1] in name for name in kept)  # the newest stays, the oldest went
    assert not any(keys[0] in name for name in kept)
    shutil.rmtree(cache.root)  # wiped mid-run: everything comes back from the storage
    assert [blobs.get(key) for key in keys] == payloads


# --- faults at start-up --------------------------------------------------------------------------
def _one_line(out: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert out.returncode != 0, out.stdout
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _worker_env(pg_settings, storage: str, **env: str) -> dict[str, str]:
    from synthetic.procs import settings_env

    settings = pg_settings.model_copy(update={"storage_url": storage})
    return {**settings_env(settings), **env}


@pytest.mark.services
def test_an_unreachable_store_stops_a_worker_at_start_in_one_line(pg_settings, s3) -> None:
    env = _worker_env(
        pg_settings,
        "s3://nowhere/flickd",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        AWS_MAX_ATTEMPTS="1",
    )
    out = run_flickd("worker", "-Q", "download", env=env, timeout=120, expect_ok=False)
    _one_line(out, "FLICKD_STORAGE_URL=s3://nowhere/flickd", "cannot reach the storage")


@pytest.mark.services
def test_a_missing_bucket_and_a_root_not_writable_say_so(pg_settings, s3, tmp_path) -> None:
    env = _worker_env(pg_settings, "s3://no-such-bucket-here/flickd")
    out = run_flickd("worker", "-Q", "download", env=env, timeout=120, expect_ok=False)
    _one_line(out, "s3://no-such-bucket-here/flickd", "the bucket does not exist")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = _worker_env(pg_settings, f"file://{blocker}/flickd")
    out = run_flickd("worker", "-Q", "download", env=env, timeout=120, expect_ok=False)
    _one_line(out, f"FLICKD_STORAGE_URL=file://{blocker}/flickd", "not writable")


# --- faults mid-batch ---------------------------------------------------------------------------
@pytest.mark.services
def test_a_store_gone_mid_batch_loses_nothing(
    pg_settings, s3, catalog, server, tmp_path, monkeypatch
):
    from producer.ingest import ingest
    from workers.download import download_batch

    bucket = new_bucket(s3)
    settings = pg_settings.model_copy(update={"storage_url": f"s3://{bucket}/flickd"})
    feed = tmp_path / "feed.csv"
    rows = [f"p{i},{server.base_url}/images/{img.filename}" for i, img in enumerate(catalog.images)]
    feed.write_text("product_id,image_url\n" + "\n".join(rows) + "\n")
    ingest(feed, settings)  # its messages wait in a queue nobody consumes: we run the batch
    with session_scope(settings) as session:
        ids = list(session.scalars(select(Image.id)))

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    forget_storages()
    with pytest.raises(StorageUnavailable, match=f"s3://{bucket}/flickd"):
        download_batch(ids, settings)
    with session_scope(settings) as session:  # still due: the reconciler will send it again
        states = set(session.scalars(select(Image.state)))
    assert states == {"queued"}

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the store is back
    forget_storages()
    outcomes = download_batch(ids, settings)
    assert outcomes and all(o.ok for o in outcomes)
    with session_scope(settings) as session:
        rows = session.execute(select(Image.state, Image.content_hash)).all()
    blobs = BlobStore.for_settings(settings)
    assert {state for state, _ in rows} == {"downloaded"}
    assert all(blobs.get(key)[:2] == b"\xff\xd8" for _, key in rows)


# --- publishing the index -----------------------------------------------------------------------
def test_a_partial_version_from_a_killed_writer_is_never_served_and_is_swept(
    root: Storage, monkeypatch
) -> None:
    folder = root.at("index")
    write_versioned(flat_index(20), folder)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from flickd.core.storage import Storage
        folder = Storage({folder.url!r})
        folder.put_bytes("index-29990101T000000000000Z-99.faiss", b"half an index")
        os.kill(os.getpid(), signal.SIGKILL)  # dies before its sidecar and the pointer
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=os.environ, check=False)
    assert proc.returncode == -signal.SIGKILL
    holder = IndexHolder(folder, check_interval=0)
    index = holder.get()
    assert index is not None and index.ntotal == 20  # the partial is never served
    assert "index-29990101T000000000000Z-99.faiss" in folder.listing()
    monkeypatch.setattr("models.index.files.PARTIAL_MAX_AGE", -1.0)  # "old enough"
    write_versioned(flat_index(30), folder)  # the next publish sweeps it
    assert "index-29990101T000000000000Z-99.faiss" not in folder.listing()
    assert holder.get().ntotal == 30


PUBLISHER = """
import sys
import numpy as np
from flickd.core.storage import Cache, Storage
from models.index import VectorIndex, write_versioned
from pathlib import Path
folder = Storage(sys.argv[1], Cache(Path(sys.argv[2]), 10**9))
for n in range(int(sys.argv[3]), int(sys.argv[3]) + 6):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 8)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = VectorIndex.build([(np.arange(1, n + 1, dtype="int64"), x)], 8, n_total=n)
    write_versioned(index, folder, keep=2)
"""


def test_two_publishers_at_once_one_wins_and_the_pointer_is_never_torn(
    root: Storage, tmp_path: Path
) -> None:
    folder = root.at("index")
    write_versioned(flat_index(10), folder)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, folder.url, str(tmp_path / f"c{i}"), str(start)],
            cwd=ROOT,
            env=os.environ,
        )
        for i, start in enumerate((100, 200))
    ]
    pointers = []
    while any(p.poll() is None for p in procs):
        pointers.append(json.loads(folder.get_bytes(CURRENT)))  # never half an object
        time.sleep(0.01)
    assert [p.returncode for p in procs] == [0, 0]
    final = json.loads(folder.get_bytes(CURRENT))
    assert final["n"] in (105, 205)  # the last version of one publisher or the other
    assert load_current(folder).ntotal == final["n"]
    assert all(p["index"].endswith(f"-{p['n']}.faiss") for p in [*pointers, final])


def test_a_replica_started_while_the_index_is_replaced_serves_old_then_new(
    root: Storage,
) -> None:
    folder = root.at("index")
    old = write_versioned(flat_index(40), folder)
    # Replacement under way: a new version's data is there, its sidecar and pointer not yet.
    folder.put_bytes("index-29990101T000000000000Z-50.faiss", b"not yet complete")
    holder = IndexHolder(folder, check_interval=0)
    assert holder.get().ntotal == 40
    # A pointer naming a version that is gone (pruned under a slow reader): keep serving.
    folder.put_bytes(CURRENT, json.dumps({"index": "index-gone-7.faiss", "n": 7}).encode())
    assert holder.get().ntotal == 40
    write_versioned(flat_index(50), folder)
    assert holder.get().ntotal == 50 and str(old).endswith("-40.faiss")
