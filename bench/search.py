"""Search API under concurrent text queries: the `flickd api` process(es) with the `base` CLIP
(ViT-B/32 architecture, offline build) on this CPU, over an index of N catalog vectors (default
1,000,000), Postgres holding the crops and products they map back to.

    .venv/bin/python -m bench.search --n 1000000 --clients 1,4,8,16 --seconds 20

Three configurations in one run, over the same index and database:

* ``baseline``: one process, no micro-batching (window 0, batch 1), no text cache, query texts
  embedded in float32: every query is its own float forward pass, as before batching;
* ``batched``: one process, concurrent queries micro-batched (FLICKD_SEARCH_BATCH_WINDOW_MS,
  FLICKD_SEARCH_MAX_BATCH at their defaults), query texts embedded as FLICKD_QUERY_TEXT_PRECISION
  says (``auto``: bfloat16 on a CPU with bf16 instructions);
* ``batched x2``: `flickd api --workers 2`, sharing the memory-mapped index.

The same ``AGREEMENT_QUERIES`` texts are asked of the baseline and of the batched process, one
at a time; the share of the baseline's top-10 products that the batched process also returns
is printed (1.00: the faster query vectors find the same products).

The text cache is off in all three and every query is a different text (colour x garment x
wording, more than the run sends), so the figures are forward passes, not cache hits; one last
line repeats a short list of queries with the cache on. Prints p50/p99 latency and queries/s
per client count, end to end over HTTP on loopback, the API's memory (RSS and PSS, which
counts shared pages once per sharer, summed over its processes) and the machine.

The vectors are the index benchmark's clustered unit vectors (bench/index.py); the database rows
behind them are generated in Postgres (generate_series), with brands b0..b19, prices 0..999 and
a red or navy colour per crop, so that the filtered figures (one client, ``--filter-seconds``
each, 0 skips them, in the batched process) keep exact shares: 50% (``colour=red``: every
other crop), 5% (``brand=b0``: every 20th product) and 0.1% (``max_price=0``: every 1000th
product) of the catalog. An error is an answer other than 200, or fewer than k results.
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

COLOURS = ["red", "navy", "black", "white", "beige", "green", "pink", "grey", "brown", "blue"]
COLOURS += ["yellow", "orange", "purple", "olive", "cream", "burgundy", "teal", "khaki"]
GARMENTS = ["dress", "jacket", "skirt", "top", "coat", "blouse", "cardigan", "sweater", "shirt"]
GARMENTS += ["pair of shoes", "pair of sneakers", "handbag", "scarf", "hat", "pair of jeans"]
WORDINGS = ["a photo of a {} {}", "a {} {}", "{} {} for women", "a {} {} in a shop window"]
# Distinct texts: 18 x 15 x 4 = 1,080, each client walks its own stretch of the list.
DISTINCT = [w.format(c, g) for w in WORDINGS for c in COLOURS for g in GARMENTS]
REPEATED = DISTINCT[:12]
AGREEMENT_QUERIES = DISTINCT[::11]  # 99 texts across colours, garments and wordings
CONFIGS: list[tuple[str, int, dict[str, str]]] = [
    (
        "baseline",
        1,
        {
            "FLICKD_SEARCH_BATCH_WINDOW_MS": "0",
            "FLICKD_SEARCH_MAX_BATCH": "1",
            "FLICKD_QUERY_TEXT_PRECISION": "float",
        },
    ),
    ("batched", 1, {}),
    ("batched x2", 2, {}),
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
    base_url: str,
    clients: int,
    seconds: float,
    queries: list[str],
    extra: dict[str, object] | None = None,
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    stride = max(1, len(queries) // clients)

    def client(number: int) -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=base_url, timeout=30) as http:
            i = number * stride
            while time.monotonic() < stop:
                started = time.perf_counter()
                params = {"q": queries[i % len(queries)], "k": 10, **(extra or {})}
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


def _report(label: str, clients: int, seconds: float, latencies: list[float], errors: int) -> None:
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000
    print(
        f"{label:<12} clients={clients:<3} {len(latencies) / seconds:6.1f} queries/s  "
        f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  errors {errors} (not 200, or fewer than k)",
        flush=True,
    )


def _memory_mb(root: int) -> tuple[float, float, int]:
    """(RSS, PSS, processes) of ``root`` and its descendants, from /proc."""
    pids, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as handle:
                frontier += [int(c) for c in handle.read().split()]
        except OSError:
            pass
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    key, _, value = line.partition(":")
                    if key == "Rss":
                        rss += int(value.split()[0])
                    elif key == "Pss":
                        pss += int(value.split()[0])
        except OSError:
            pass
    return rss / 1024, pss / 1024, len(pids)


def _top_products(base_url: str, queries: list[str]) -> list[list[str]]:
    """Each query's top-10 product ids, asked one at a time."""
    found = []
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for q in queries:
            items = http.get("/search", params={"q": q, "k": 10}).json()["items"]
            found.append([hit["product_id"] for hit in items[0]["results"]])
    return found


def _agreement(want: list[list[str]], got: list[list[str]]) -> float:
    shared = sum(len(set(w) & set(g)) for w, g in zip(want, got, strict=True))
    return shared / max(1, sum(len(w) for w in want))


def _wait_ready(base_url: str, workers: int, timeout: float = 600) -> dict:
    """The API's /health once it answers searches; with several processes, until a burst of
    concurrent queries has reached each of them (each loads its models and maps the index)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(base_url + "/search", params={"q": "warm up", "k": 1}, timeout=60)
            if response.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        raise TimeoutError("the API did not answer a search")
    if workers > 1:
        for _ in range(3):
            _load(base_url, 4 * workers, 3.0, REPEATED)
    return httpx.get(base_url + "/health", timeout=10).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--configs", default=",".join(c[0] for c in CONFIGS), help="which configurations to run"
    )
    parser.add_argument("--filter-seconds", type=float, default=20)
    args = parser.parse_args()
    stop_children_on_sigterm()
    print(machine())
    from bench.vision import _models

    models = _models("base")
    work = Path(tempfile.mkdtemp(prefix="flickd-bench-search-"))
    data = work / "vectors.npy"
    generate(data, args.n, 512, "clustered")
    counts = [int(c) for c in args.clients.split(",")]
    wanted = args.configs.split(",")
    with scratch_postgres() as db_url:
        settings = Settings(
            database_url=db_url,
            data_dir=work / "data",
            detector_model="none",
            embedding_model=str(models["clip"]),
            device="cpu",
            text_cache_size=0,
        )
        version_id = _version(settings)
        _rows(settings, args.n, version_id)
        build_s = _build_index(data, settings, version_id)
        print(f"index: {args.n:,} vectors (clustered, dim 512) built in {build_s:.0f}s")
        answers: dict[str, list[list[str]]] = {}
        for label, workers, env in [c for c in CONFIGS if c[0] in wanted]:
            port = free_port()
            cmd = [sys.executable, "-m", "flickd.cli", "api", "--port", str(port)]
            cmd += ["--workers", str(workers)]
            with spawn(cmd, settings, work / f"api-{workers}.log", None, extra_env=env) as api:
                base_url = f"http://127.0.0.1:{port}"
                health = _wait_ready(base_url, workers)
                if label == wanted[0]:
                    print(f"api: {health}")
                if workers == 1:
                    answers[label] = _top_products(base_url, AGREEMENT_QUERIES)
                    if label != "baseline" and "baseline" in answers:
                        share = _agreement(answers["baseline"], answers[label])
                        print(
                            f"{label:<12} agreement: {share:.3f} of the baseline's top-10 "
                            f"products over {len(AGREEMENT_QUERIES)} queries",
                            flush=True,
                        )
                for clients in counts:
                    latencies, errors = _load(base_url, clients, args.seconds, DISTINCT)
                    _report(label, clients, args.seconds, latencies, errors)
                if label == "batched":
                    for name, params in FILTERS.items() if args.filter_seconds > 0 else ():
                        found = _load(base_url, 1, args.filter_seconds, DISTINCT, params)
                        _report(f"filter {name}", 1, args.filter_seconds, *found)
                rss, pss, procs = _memory_mb(api.pid)
                print(
                    f"{label:<12} memory: RSS {rss:,.0f} MB, PSS {pss:,.0f} MB ({procs} processes)",
                    flush=True,
                )
        port = free_port()
        cmd = [sys.executable, "-m", "flickd.cli", "api", "--port", str(port)]
        cached = {"FLICKD_TEXT_CACHE_SIZE": "4096"}
        with spawn(cmd, settings, work / "api-cached.log", None, extra_env=cached):
            base_url = f"http://127.0.0.1:{port}"
            _wait_ready(base_url, 1)
            clients = max(counts)
            latencies, errors = _load(base_url, clients, args.seconds, REPEATED)
            _report("cached", clients, args.seconds, latencies, errors)
            print(f"(cached: {len(REPEATED)} texts repeated, text cache on, batched, 1 process)")


if __name__ == "__main__":
    main()
