"""Download throughput: N synthetic images from the loopback server with added latency, through
real `flickd worker -Q download` processes on Postgres + Redis, with 1 and 2 worker processes.

    .venv/bin/python -m bench.download --images 2000 --latency 0.1 --threads 64

Prints images/s per worker count beside the bound that latency and concurrency allow
(workers × threads / latency) and the machine. Where img2dataset can be imported (by this
interpreter, or the one ``--img2dataset-python`` names), the same URLs are also fetched in the
same run through img2dataset's raw path (its ``download_image``: urllib, bytes only, no
decoding, no storing), in as many processes and threads, as the baseline to beat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    REDIS,
    broker_prefix,
    flush_redis,
    machine,
    scratch_postgres,
    stop_children_on_sigterm,
    tree_cpu_seconds,
    truncate,
)
from flickd.core.settings import Settings
from synthetic.catalog import Catalog, generate_catalog
from synthetic.procs import catalog_server, celery_worker

PREFIX = broker_prefix()  # this run's own Redis keys


def _catalog(cache: Path, products: int) -> Catalog:
    try:
        return Catalog.load(cache)
    except (FileNotFoundError, OSError, ValueError):
        return generate_catalog(cache, products, seed=1, size="full")


def _feed(path: Path, base_url: str, names: list[str], n: int, tag: str) -> None:
    # Distinct URLs (the query differs) over the generated files: every one is a real download.
    lines = ["product_id,image_url"]
    lines += [f"p{i // 2},{base_url}/images/{names[i % len(names)]}?r={tag}{i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def run(
    workers: int,
    threads: int,
    n: int,
    settings: Settings,
    base_url: str,
    names: list[str],
    work: Path,
) -> tuple[float, float]:
    """(images/s, CPU ms per image in the worker processes) of one run."""
    from db.runs import wait_for_run
    from producer.ingest import ingest

    truncate(settings.database_url or "")
    flush_redis(REDIS)
    feed = work / f"feed-{workers}.csv"
    _feed(feed, base_url, names, n, tag=f"w{workers}-")
    procs = [
        celery_worker(
            settings,
            "download",
            concurrency=1,
            name=f"bench{i}@%h",
            log_path=work / f"worker-{workers}-{i}.log",
        )
        for i in range(workers)
    ]
    pids = [proc.__enter__().pid for proc in procs]
    try:
        cpu_before = sum(tree_cpu_seconds(pid) for pid in pids)
        started = time.perf_counter()
        summary = ingest(feed, settings)
        wait_for_run(settings, summary.run_id, timeout=600, poll=0.05)
        elapsed = time.perf_counter() - started
        cpu = sum(tree_cpu_seconds(pid) for pid in pids) - cpu_before
    finally:
        for proc in procs:
            proc.__exit__(None, None, None)
    return n / elapsed, 1000 * cpu / n


# One img2dataset process: fetch its share of the URLs with its own downloader function.
_IMG2DATASET_RAW = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from img2dataset.downloader import download_image
urls, threads = json.load(open(sys.argv[1])), int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # start together
t, cpu = time.perf_counter(), time.process_time()
with ThreadPoolExecutor(threads) as pool:
    got = list(pool.map(lambda r: download_image(r, 10, None, None), enumerate(urls)))
ok = sum(1 for _, stream, _ in got if stream is not None)
print(json.dumps({"seconds": time.perf_counter() - t, "ok": ok,
                  "cpu": time.process_time() - cpu}), flush=True)
"""


def img2dataset_raw(python: str, urls: list[str], processes: int, threads: int, work: Path):
    """images/s of img2dataset's raw path over ``urls``; None when it cannot be imported."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # else it asks a registry on import
    check = subprocess.run([python, "-c", "import img2dataset.downloader"], env=env,
                           capture_output=True)  # fmt: skip
    if check.returncode != 0:
        return None
    procs = []
    for i in range(processes):
        share = work / f"i2d-urls-{i}.json"
        share.write_text(json.dumps(urls[i::processes]))
        procs.append(subprocess.Popen(
            [python, "-c", _IMG2DATASET_RAW, str(share), str(threads)], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ))  # fmt: skip
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [
        json.loads(proc.communicate(timeout=600)[0].strip().splitlines()[-1]) for proc in procs
    ]
    elapsed = time.perf_counter() - started
    ok = sum(r["ok"] for r in results)
    return ok / elapsed, ok, 1000 * sum(r["cpu"] for r in results) / max(1, ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=48, help="download threads per process")
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="images per download message (default: 4 x threads, so a batch's slowest image "
        "idles its threads once per four rounds, not every round)",
    )
    parser.add_argument("--products", type=int, default=150, help="distinct generated products")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--img2dataset-python",
        default=sys.executable,
        help="an interpreter that can import img2dataset, for the baseline",
    )
    args = parser.parse_args()
    stop_children_on_sigterm()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="flickd-bench-dl-"))
    catalog = _catalog(Path(tempfile.gettempdir()) / "flickd-bench-catalog", args.products)
    names = [img.filename for img in catalog.images]
    sizes = [catalog.image_path(img).stat().st_size for img in catalog.images]
    print(
        f"images: {args.images} downloads over {len(names)} generated files, mean "
        f"{sum(sizes) / len(sizes) / 1024:.0f} KiB; server latency {args.latency * 1000:.0f} ms"
    )
    with scratch_postgres() as db_url:
        settings = Settings(
            database_url=db_url,
            broker_url=REDIS,
            broker_prefix=PREFIX,
            data_dir=work / "data",
            allowed_networks=["127.0.0.0/8"],
            last_stage="download",
            download_threads=args.threads,
            download_batch_size=args.batch or 4 * args.threads,
        )
        server = catalog_server(catalog.images_dir, settings, work / "server.log", args.latency)
        with server as base_url:
            for count in [int(w) for w in args.workers.split(",")]:
                rate, cpu_ms = run(
                    count, args.threads, args.images, settings, base_url, names, work
                )
                bound = count * args.threads / args.latency
                print(
                    f"download workers={count} threads/worker={args.threads}: "
                    f"{rate:,.0f} images/s, {cpu_ms:.2f} CPU ms/image in the workers  "
                    f"(latency bound {bound:,.0f} images/s)"
                )
                urls = [
                    f"{base_url}/images/{names[i % len(names)]}?r=i2d{count}-{i}"
                    for i in range(args.images)
                ]
                raw = img2dataset_raw(args.img2dataset_python, urls, count, args.threads, work)
                if raw is None:
                    print("  img2dataset raw path: not measured (img2dataset not importable)")
                else:
                    print(
                        f"  img2dataset raw path, {count} processes x {args.threads} threads: "
                        f"{raw[0]:,.0f} images/s, {raw[2]:.2f} CPU ms/image ({raw[1]} fetched; "
                        f"bytes only, nothing validated or stored)  "
                        f"flickd / img2dataset = {rate / raw[0]:.2f}"
                    )


if __name__ == "__main__":
    main()
