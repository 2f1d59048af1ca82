"""Freshness: seconds from an image's ``analyzed`` commit to being returned by search, and from a
product's delisting to its disappearance, over an index of N vectors (default 1,000,000) while a
feed streams in.

    .venv/bin/python -m bench.freshness --n 1000000 --rate 200 --seconds 120

Setup as in bench/search.py: clustered unit vectors (bench/index.py), the database rows behind
them generated in Postgres, the index built and published. Then, for ``--seconds``:

* a streaming thread commits ``--rate`` images a second, in batches of ``--batch``, written the
  way the vision stage's commit writes them: new products, images (``analyzed``), crops and
  their embeddings (``db.embeddings.insert_embeddings``), one transaction per batch. Running
  the real detector and CLIP for the stream on a small CPU machine would measure the models,
  not freshness, so the rows are written straight into Postgres; each new crop's vector is a
  random unit vector, which is its own nearest neighbour;
* a delisting thread delists ``--delist-rate`` indexed products a second (``listed`` false,
  ``delisted_at`` and ``updated_at`` now), as catalog sync does;
* one serving replica (``SearchService`` with its polling thread, exactly what ``flickd api``
  runs) is probed every ``--probe`` seconds with each pending crop's vector: a new crop counts
  as fresh when it is the top hit, a delisted product when its crop is no longer among the
  top 10. Latency is probe time minus commit time (the probe adds up to ``--probe`` seconds).

Prints p50/p99/max per kind, the poll interval, the live index's state and the machine.
Target: p99 <= 60 s for both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert, update

from bench.common import machine, scratch_postgres, stop_children_on_sigterm
from bench.index import generate
from bench.search import _build_index, _rows, _version
from db.embeddings import insert_embeddings
from db.schema import Crop, Image, Product, utcnow
from db.session import get_engine
from flickd.core.settings import Settings
from flickd.services.search import SearchService

DIM = 512


class Stream:
    """New analysed images (one crop each) committed at a steady rate."""

    def __init__(self, settings: Settings, version: int, first_id: int, rng: np.random.Generator):
        self.settings, self.version, self.next_id, self.rng = settings, version, first_id, rng
        self.pending: dict[int, tuple[float, np.ndarray]] = {}  # crop id -> (commit time, vector)
        self.lock = threading.Lock()
        self.committed = 0

    def commit_batch(self, size: int) -> None:
        ids = list(range(self.next_id, self.next_id + size))
        self.next_id += size
        vectors = self.rng.standard_normal((size, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        now = utcnow()
        with get_engine(self.settings).begin() as conn:
            conn.execute(
                insert(Product),
                [
                    {
                        "id": i,
                        "catalog": "default",
                        "external_id": f"s{i}",
                        "title": f"New {i}",
                        "brand": "Stream",
                        "category": "dress",
                        "price": 10.0,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                insert(Image),
                [
                    {
                        "id": i,
                        "product_id": i,
                        "url": f"https://cdn.example.com/s{i}.jpg",
                        "url_hash": f"s{i:031d}",
                        "state": "analyzed",
                        "attempts": 1,
                        "analyzed_at": now,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                insert(Crop),
                [
                    {
                        "id": i,
                        "image_id": i,
                        "crop_index": 0,
                        "x0": 0,
                        "y0": 0,
                        "x1": 1,
                        "y1": 1,
                        "nx0": 0,
                        "ny0": 0,
                        "nx1": 1,
                        "ny1": 1,
                        "fine_label": "dress",
                        "coarse_label": "dress",
                        "whole_image": True,
                        "colour_name": "red",
                        "colour_family": "red",
                        "created_at": now,
                    }
                    for i in ids
                ],
            )
            insert_embeddings(conn, self.version, ids, vectors)
        done = time.monotonic()
        with self.lock:
            for i, vector in zip(ids, vectors, strict=True):
                self.pending[i] = (done, vector)
        self.committed += size


def _delist(settings: Settings, product: int) -> float:
    with get_engine(settings).begin() as conn:
        conn.execute(
            update(Product)
            .where(Product.id == product)
            .values(listed=False, delisted_at=utcnow(), updated_at=utcnow())
        )
    return time.monotonic()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=200, help="images committed a second")
    parser.add_argument("--batch", type=int, default=16, help="images per commit")
    parser.add_argument("--delist-rate", type=float, default=2.0, help="delistings a second")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--probe", type=float, default=0.25)
    parser.add_argument("--poll", type=float, default=2.0, help="FLICKD_FRESHNESS_POLL_SECONDS")
    args = parser.parse_args()
    stop_children_on_sigterm()
    print(machine())
    from bench.vision import _models

    models = _models("base")
    work = Path(tempfile.mkdtemp(prefix="flickd-bench-freshness-"))
    data = work / "vectors.npy"
    generate(data, args.n, DIM, "clustered")
    base_vectors = np.load(data, mmap_mode="r")
    with scratch_postgres() as db_url:
        settings = Settings(
            database_url=db_url,
            data_dir=work / "data",
            detector_model="none",
            embedding_model=str(models["clip"]),
            device="cpu",
            freshness_poll_seconds=args.poll,
        )
        version = _version(settings)
        _rows(settings, args.n, version)
        build_s = _build_index(data, settings, version)
        print(f"index: {args.n:,} vectors built in {build_s:.0f}s")
        service = SearchService(settings)
        started = time.monotonic()
        live = service.freshness.current()
        assert live is not None
        print(f"live index loaded in {time.monotonic() - started:.1f}s: {live.describe()}")
        service.freshness.start()

        rng = np.random.default_rng(1)
        first = args.n + 1_000_000  # clear of the generated ids
        stream = Stream(settings, version, first, rng)
        delisted: dict[int, tuple[float, int]] = {}  # product -> (commit time, crop id)
        stop = threading.Event()

        def feed() -> None:
            interval = args.batch / args.rate
            next_at = time.monotonic()
            while not stop.is_set():
                stream.commit_batch(args.batch)
                next_at += interval
                stop.wait(max(0.0, next_at - time.monotonic()))

        def delister() -> None:
            picks = rng.choice(args.n // 4, int(args.delist_rate * args.seconds) + 1, replace=False)
            for product in (int(p) + 1 for p in picks):
                if stop.is_set():
                    return
                crop = (product - 1) * 4 if product > 1 else 1  # a crop of that product
                delisted[product] = (_delist(settings, product), crop)
                stop.wait(1 / args.delist_rate)

        fresh: list[float] = []
        gone: list[float] = []
        threads = [threading.Thread(target=feed), threading.Thread(target=delister)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline or stream.pending or delisted:
            if time.monotonic() >= deadline:
                stop.set()
            if time.monotonic() > deadline + 300:
                print(f"gave up: {len(stream.pending)} new, {len(delisted)} delisted pending")
                break
            live = service.freshness.current()
            assert live is not None
            with stream.lock:
                pending = list(stream.pending.items())
            if pending:
                queries = np.stack([v for _, (_, v) in pending])
                _, ids = live.search(queries, 1)
                now = time.monotonic()
                for (crop, (at, _)), found in zip(pending, ids[:, 0].tolist(), strict=True):
                    if found == crop:
                        fresh.append(now - at)
                        with stream.lock:
                            del stream.pending[crop]
            if delisted:
                items = list(delisted.items())
                queries = np.stack([np.asarray(base_vectors[c - 1]) for _, (_, c) in items])
                _, ids = live.search(queries, 10)
                now = time.monotonic()
                for (product, (at, crop)), found in zip(items, ids.tolist(), strict=True):
                    if crop not in found:
                        gone.append(now - at)
                        del delisted[product]
            time.sleep(args.probe)
        stop.set()
        for thread in threads:
            thread.join()
        service.freshness.stop()
        print(
            f"stream: {stream.committed} images in {args.seconds:.0f}s "
            f"({stream.committed / args.seconds:.0f}/s), poll every {args.poll:g}s; "
            f"live index {service.freshness.current().describe()}"  # type: ignore[union-attr]
        )
        for name, values in (("analyzed -> searchable", fresh), ("delisted -> gone", gone)):
            if values:
                print(
                    f"{name}: n={len(values)} p50 {statistics.median(values):.2f}s "
                    f"p99 {_pct(values, 0.99):.2f}s max {max(values):.2f}s (target p99 <= 60s)"
                )


if __name__ == "__main__":
    main()
