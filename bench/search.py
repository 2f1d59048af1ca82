"""Search API under concurrent text queries: the `flickd api` process with the `base` CLIP (ViT-B/32
architecture, offline build) on this CPU, over an index of N catalog vectors (default 1,000,000),
Postgres holding the crops and products they map back to.

    .venv/bin/python -m bench.search --n 1000000 --clients 1,4,8 --seconds 20

The vectors are the index benchmark's clustered unit vectors (bench/index.py); the database rows
behind them are generated in Postgres (generate_series). Prints p50/p99 latency and queries/s
per client count, end to end over HTTP on loopback, and the machine; then p50/p99 with one
client for filters that keep 50% (``colour=red``: every other crop), 5% (``brand=b0``: every
20th product) and 0.1% (``max_price=0``: every 1000th product) of the catalog
(``--filter-seconds`` each; 0 skips them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import text

from bench.common import machine, scratch_postgres, stop_children_on_sigterm
from bench.index import generate, read_chunks
from db.session import get_engine
from flickd.core.settings import Settings
from synthetic.procs import free_port, spawn

QUERIES = [
    "a photo of a red dress",
    "black leather shoes",
    "a navy blue cardigan",
    "white sneakers",
    "a beige trench coat",
    "olive green trousers",
    "a small brown handbag",
    "a striped top",
    "a pair of blue jeans",
    "a yellow summer skirt",
    "a grey wool jacket",
    "pink blouse",
]


def _rows(settings: Settings, n: int, version_id: int) -> None:
    """Products, images and crops for crop ids 1..n, written by Postgres itself."""
    sql = [
        # brand b0..b19 and price 0..999 by product id, so the filters' shares are exact
        "INSERT INTO products (id, catalog, external_id, title, brand, category, price, "
        "in_stock, created_at) SELECT g, 'default', 'p' || g, 'Product ' || g, "
        "'b' || (g % 20), 'dress', g % 1000, true, now() "
        f"FROM generate_series(1, {n // 4 + 1}) g",
        "INSERT INTO images (id, product_id, url, url_hash, state, attempts, created_at, "
        "updated_at) SELECT g, g / 4 + 1, 'https://cdn.example.com/' || g || '.jpg', md5(g::text), "
        f"'analyzed', 1, now(), now() FROM generate_series(1, {n}) g",
        "INSERT INTO crops (id, image_id, crop_index, x0, y0, x1, y1, nx0, ny0, nx1, ny1, "
        "fine_label, coarse_label, whole_image, colour_name, colour_family, colour_rgb, prompt, "
        "created_at) SELECT g, g, 0, 0, 0, 100, 100, 0, 0, 1, 1, 'dress', 'dress', true, "
        "'navy', CASE WHEN g % 2 = 0 THEN 'red' ELSE 'navy' END, "
        f"'#112244', 'a photo of a navy dress', now() FROM generate_series(1, {n}) g",
    ]
    with get_engine(settings).begin() as conn:
        for statement in sql:
            conn.execute(text(statement))
        conn.execute(text("ANALYZE"))


def _version(settings: Settings) -> int:
    from db.session import session_scope
    from db.versions import activate_embedder, embedder_version_id
    from models.embedder import Embedder

    embedder = Embedder(settings.embedding_model, device="cpu")
    with session_scope(settings) as session:
        version_id = embedder_version_id(
            session.connection(), embedder.name_or_dir, embedder.model_version
        )
        activate_embedder(session, version_id)
    return version_id


def _build_index(data: Path, settings: Settings, version_id: int) -> float:
    from models.index import VectorIndex, write_versioned

    n = int(__import__("numpy").load(data, mmap_mode="r").shape[0])

    def chunks():  # type: ignore[no-untyped-def]
        import numpy as np

        for start, block in read_chunks(data):
            yield np.arange(start + 1, start + 1 + len(block), dtype=np.int64), block

    started = time.perf_counter()
    index = VectorIndex.build(chunks, 512, n_total=n, model_version_id=version_id)
    write_versioned(index, settings.index_dir)
    return time.perf_counter() - started


FILTERS = {
    "50% (colour=red)": {"colour": "red"},
    "5% (brand=b0)": {"brand": "b0"},
    "0.1% (max_price=0)": {"max_price": 0},
}


def _load(
    base_url: str, clients: int, seconds: float, extra: dict[str, object] | None = None
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(offset: int) -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=base_url, timeout=30) as http:
            i = offset
            while time.monotonic() < stop:
                started = time.perf_counter()
                params = {"q": QUERIES[i % len(QUERIES)], "k": 10, **(extra or {})}
                response = http.get("/search", params=params)
                short = response.status_code == 200 and any(
                    len(item["results"]) < 10 for item in response.json()["items"]
                )
                mine.append(time.perf_counter() - started)
                bad += response.status_code != 200 or short  # k=10 always exist here
                i += 1
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors


def _wait_ready(base_url: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(base_url + "/search", params={"q": "warm up", "k": 1}, timeout=60)
            if response.status_code == 200:
                return httpx.get(base_url + "/health", timeout=10).json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("the API did not answer a search")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--filter-seconds", type=float, default=20)
    args = parser.parse_args()
    stop_children_on_sigterm()
    print(machine())
    from bench.vision import _models

    models = _models("base")
    work = Path(tempfile.mkdtemp(prefix="flickd-bench-search-"))
    data = work / "vectors.npy"
    generate(data, args.n, 512, "clustered")
    with scratch_postgres() as db_url:
        settings = Settings(
            database_url=db_url,
            data_dir=work / "data",
            detector_model="none",
            embedding_model=str(models["clip"]),
            device="cpu",
        )
        version_id = _version(settings)
        _rows(settings, args.n, version_id)
        build_s = _build_index(data, settings, version_id)
        print(f"index: {args.n:,} vectors (clustered, dim 512) built in {build_s:.0f}s")
        port = free_port()
        cmd = [sys.executable, "-m", "flickd.cli", "api", "--port", str(port)]
        with spawn(cmd, settings, work / "api.log", ready=None):
            base_url = f"http://127.0.0.1:{port}"
            health = _wait_ready(base_url)
            print(f"api: {health}")
            for clients in [int(c) for c in args.clients.split(",")]:
                latencies, errors = _load(base_url, clients, args.seconds)
                latencies.sort()
                p50 = statistics.median(latencies) * 1000
                p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000
                print(
                    f"clients={clients}: {len(latencies) / args.seconds:.1f} queries/s, "
                    f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, errors {errors}"
                )
            for name, params in FILTERS.items() if args.filter_seconds > 0 else ():
                latencies, errors = _load(base_url, 1, args.filter_seconds, params)
                latencies.sort()
                p50 = statistics.median(latencies) * 1000
                p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000
                print(
                    f"filter {name}, clients=1: {len(latencies) / args.filter_seconds:.1f} "
                    f"queries/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, errors {errors} "
                    "(an error: not 200, or fewer than k results)"
                )


if __name__ == "__main__":
    main()
