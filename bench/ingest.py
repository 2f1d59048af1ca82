"""Producer throughput: parse, validate, record and enqueue a generated feed on Postgres + Redis,
beside a naive row-at-a-time baseline (ORM insert and one ``apply_async`` per image).

    .venv/bin/python -m bench.ingest --rows 1000000 --naive-rows 20000

Each phase runs in a child process of its own so that its peak memory is its own. No worker
consumes the queue: this measures the producer alone, end to end.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import (
    REDIS,
    broker_prefix,
    flush_redis,
    machine,
    peak_rss_mb,
    scratch_postgres,
    stop_children_on_sigterm,
    truncate,
)
from flickd.core.settings import Settings

PREFIX = broker_prefix()  # this run's own Redis keys


def _settings(db_url: str, work: Path) -> Settings:
    return Settings(
        database_url=db_url,
        broker_url=REDIS,
        broker_prefix=PREFIX,
        data_dir=work / "data",
        last_stage="download",
    )


def child_flickd(feed: Path, db_url: str, work: Path) -> dict[str, float]:
    from producer.ingest import ingest

    started = time.perf_counter()
    summary = ingest(feed, _settings(db_url, work))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "rows": summary.rows_read,
        "enqueued": summary.enqueued,
        "messages": summary.messages,
        "invalid": summary.invalid,
        "duplicates": summary.duplicates_in_feed,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_naive(feed: Path, db_url: str, work: Path, limit: int) -> dict[str, float]:
    """What a first version would do: one ORM round trip and one message per row."""
    from sqlalchemy import select

    from db.schema import Image, IngestRun, Product
    from db.session import session_scope
    from flickd.core.broker import DOWNLOAD_TASK, get_app
    from producer.feeds import url_hash

    settings = _settings(db_url, work)
    import workers.tasks  # noqa: F401

    task = get_app(settings).tasks[DOWNLOAD_TASK]
    started = time.perf_counter()
    rows = enqueued = 0
    with session_scope(settings) as session:
        run = IngestRun(feed=str(feed))
        session.add(run)
    with open(feed, newline="") as handle:
        for record in csv.DictReader(handle):
            rows += 1
            if rows > limit:
                rows -= 1
                break
            pid, url = record.get("product_id"), record.get("image_url")
            if not pid or not url or urlsplit(url).scheme not in ("http", "https"):
                continue
            with session_scope(settings) as session:
                product = session.scalars(select(Product).where(Product.external_id == pid)).first()
                if product is None:
                    product = Product(external_id=pid, title=record.get("title"))
                    session.add(product)
                    session.flush()
                exists = session.scalars(
                    select(Image.id).where(Image.product_id == product.id, Image.url == url)
                ).first()
                if exists:
                    continue
                image = Image(product_id=product.id, url=url, url_hash=url_hash(url), run_id=run.id)
                session.add(image)
                session.flush()
                image_id = image.id
            task.apply_async(args=[[image_id]])
            enqueued += 1
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": rows, "enqueued": enqueued, "peak_rss_mb": peak_rss_mb()}


def _run_child(*args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--child", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--naive-rows", type=int, default=20_000)
    parser.add_argument("--bad-fraction", type=float, default=0.01)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, feed, db_url, work, *rest = args.child
        if kind == "flickd":
            result = child_flickd(Path(feed), db_url, Path(work))
        else:
            result = child_naive(Path(feed), db_url, Path(work), int(rest[0]))
        print(json.dumps(result))
        return

    from synthetic.catalog import write_big_feed

    stop_children_on_sigterm()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="flickd-bench-ingest-"))
    feed = work / "feed.csv"
    started = time.perf_counter()
    stats = write_big_feed(
        feed, args.rows, "https://cdn.example.com", seed=0, bad_fraction=args.bad_fraction
    )
    print(
        f"feed: {stats.rows:,} rows, {stats.products:,} products, "
        f"{feed.stat().st_size / 2**20:.0f} MiB, bad rows {sum(stats.bad.values()):,} "
        f"(generated in {time.perf_counter() - started:.1f}s)"
    )
    with scratch_postgres() as db_url:
        flush_redis(REDIS)
        fast = _run_child("flickd", str(feed), db_url, str(work))
        print(
            f"flickd producer: {fast['rows']:,.0f} rows in {fast['seconds']:.1f}s = "
            f"{fast['rows'] / fast['seconds']:,.0f} rows/s; enqueued {fast['enqueued']:,.0f} "
            f"images in {fast['messages']:,.0f} messages; peak RSS {fast['peak_rss_mb']:.0f} MB"
        )
        truncate(db_url)
        flush_redis(REDIS)
        naive = _run_child("naive", str(feed), db_url, str(work), str(args.naive_rows))
        print(
            f"naive baseline (first {naive['rows']:,.0f} rows): {naive['seconds']:.1f}s = "
            f"{naive['rows'] / naive['seconds']:,.0f} rows/s; peak RSS "
            f"{naive['peak_rss_mb']:.0f} MB"
        )
        speedup = (fast["rows"] / fast["seconds"]) / (naive["rows"] / naive["seconds"])
        print(f"speed-up over the baseline: {speedup:.0f}x")
    flush_redis(REDIS)


if __name__ == "__main__":
    main()
