"""Catalog sync on real Postgres and Redis: full and delta feeds, delisting and relisting,
changes in place, the guards against broken exports, prices in other formats, and the purge
after the grace period. Downloads go through a real worker process and the loopback server,
which counts every request, so "not downloaded again" is checked at the source."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import func, select, update

from db.schema import Image, IngestRun, Product, RejectedRow, utcnow
from db.session import session_scope
from flickd.core.blobstore import BlobStore
from flickd.core.settings import Settings
from producer.ingest import ingest
from synthetic.catalog import Catalog
from synthetic.server import CatalogServer
from tests.conftest import (
    catalog_fixture,
    celery_worker,
    run_flickd,
    settings_env,
    wait_for_run,
)
from workers.reconcile import reconcile_once

pytestmark = pytest.mark.services

catalog = catalog_fixture(8, seed=21)


def rows_for(
    catalog: Catalog, server: CatalogServer, ids: list[str], **changes: dict[str, Any]
) -> list[dict[str, Any]]:
    """Feed rows (one per image) of the catalog's products ``ids``; ``changes[id]`` overrides
    fields of that product's rows."""
    by_id = {p.product_id: p for p in catalog.products}
    rows = []
    for product_id in ids:
        product = by_id[product_id]
        for image in product.images:
            row = {
                "product_id": product_id,
                "image_url": server.image_url(image.filename),
                "title": product.title,
                "brand": product.brand,
                "category": product.category,
                "price": f"{product.price:.2f}",
            }
            row.update(changes.get(product_id, {}))
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    frame = pd.DataFrame(rows, columns=columns or list(rows[0]))
    frame.to_csv(path, index=False)
    return path


def products(settings: Settings) -> dict[str, Product]:
    with session_scope(settings) as session:
        return {p.external_id: p for p in session.scalars(select(Product))}


def images(settings: Settings) -> list[Image]:
    with session_scope(settings) as session:
        return list(session.scalars(select(Image).order_by(Image.id)))


def image_hits(catalog: Catalog, server: CatalogServer) -> dict[str, int]:
    return {i.filename: server.hits(f"/images/{i.filename}") for i in catalog.images}


def run_row(settings: Settings, run_id: int) -> IngestRun:
    with session_scope(settings) as session:
        run = session.get(IngestRun, run_id)
        assert run is not None
        return run


def ids(catalog: Catalog) -> list[str]:
    return [p.product_id for p in catalog.products]


@pytest.fixture()
def settings(pg_settings: Settings) -> Settings:
    return pg_settings.model_copy(update={"max_delist_share": 0.5})


def test_second_full_feed_removes_changes_and_adds(settings, catalog, server, tmp_path):
    """A full feed, then a second full feed with products removed, changed and added: the
    database, `flickd show` and the summary agree with the second feed, and nothing but the
    added product's images is downloaded again."""
    every = ids(catalog)
    first = every[:6]
    removed, changed, added = every[0], every[1], every[6]
    second = [p for p in first if p != removed] + [added]
    env = settings_env(settings)
    with celery_worker(settings, queues="download", concurrency=2):
        out = run_flickd(
            "ingest",
            str(write_csv(tmp_path / "day1.csv", rows_for(catalog, server, first))),
            "--full",
            "--wait",
            "--json",
            env=env,
        )
        day1 = json.loads(out.stdout)
        assert day1["products"] == {
            "created": 6,
            "updated": 0,
            "unchanged": 0,
            "delisted": 0,
            "relisted": 0,
        }
        assert day1["status"] == "done" and day1["full"] is True
        before = products(settings)
        hits_before = image_hits(catalog, server)

        feed2 = rows_for(
            catalog,
            server,
            second,
            **{changed: {"title": "Renamed coat", "price": "€1.234,50", "brand": "Newbrand"}},
        )
        out = run_flickd(
            "ingest",
            str(write_csv(tmp_path / "day2.csv", feed2)),
            "--full",
            "--wait",
            "--json",
            env=env,
        )
        day2 = json.loads(out.stdout)
    assert day2["products"] == {
        "created": 1,
        "updated": 1,
        "unchanged": 4,
        "delisted": 1,
        "relisted": 0,
    }
    assert day2["sync_refused"] is None
    run = run_row(settings, day2["run_id"])
    assert (run.full_feed, run.products_created, run.products_updated) == (True, 1, 1)
    assert (run.products_unchanged, run.products_delisted, run.products_relisted) == (4, 1, 0)

    after = products(settings)
    assert {pid for pid, p in after.items() if p.listed} == set(second)
    gone = after[removed]
    assert not gone.listed and gone.delisted_at is not None
    assert gone.updated_at > before[removed].updated_at
    moved = after[changed]
    assert (moved.title, moved.brand, moved.price, moved.currency) == (
        "Renamed coat",
        "Newbrand",
        1234.5,
        "EUR",
    )
    assert moved.updated_at > before[changed].updated_at
    for pid in set(second) - {changed, added}:  # unchanged rows are not written at all
        assert after[pid].updated_at == before[pid].updated_at
        assert after[pid].seen_run_id == day2["run_id"]

    # Only the added product's images were fetched by the second run.
    hits = image_hits(catalog, server)
    added_files = {i.filename for i in catalog.products[6].images}
    for name, count in hits.items():
        assert count == hits_before[name] + (1 if name in added_files else 0), name
    assert {i.state for i in images(settings)} == {"downloaded"}

    status = run_flickd("status", str(day2["run_id"]), env=env).stdout
    assert "products (full): created 1, updated 1, unchanged 4, delisted 1, relisted 0" in status
    shown = run_flickd("show", removed, env=env).stdout
    assert "DELISTED since" in shown
    details = json.loads(run_flickd("show", removed, "--json", env=env).stdout)
    assert details["listed"] is False and details["delisted_at"]
    details = json.loads(run_flickd("show", changed, "--json", env=env).stdout)
    assert details["listed"] and details["title"] == "Renamed coat"
    assert "1234.50 EUR" in run_flickd("show", changed, env=env).stdout


def test_delisted_product_returns_without_a_download(settings, catalog, server, tmp_path):
    every = ids(catalog)[:5]
    back = every[2]
    with celery_worker(settings, queues="download", concurrency=2):
        first = ingest(write_csv(tmp_path / "a.csv", rows_for(catalog, server, every)), settings)
        assert wait_for_run(settings, first.run_id, timeout=60) == "done"
        hits = image_hits(catalog, server)
        without = [p for p in every if p != back]
        gone = ingest(
            write_csv(tmp_path / "b.csv", rows_for(catalog, server, without)), settings, full=True
        )
        assert gone.delisted == 1 and gone.enqueued == 0
        assert not products(settings)[back].listed
        returned = ingest(
            write_csv(tmp_path / "c.csv", rows_for(catalog, server, every)), settings, full=True
        )
    assert (returned.relisted, returned.unchanged, returned.delisted, returned.enqueued) == (
        1,
        4,
        0,
        0,
    )
    product = products(settings)[back]
    assert product.listed and product.delisted_at is None
    assert image_hits(catalog, server) == hits  # nothing fetched again
    assert {i.state for i in images(settings)} == {"downloaded"}


def test_delta_feed_never_delists_but_honours_availability(settings, catalog, server, tmp_path):
    every = ids(catalog)[:4]
    full = ingest(write_csv(tmp_path / "full.csv", rows_for(catalog, server, every)), settings)
    assert full.created == 4
    delta_rows = rows_for(
        catalog,
        server,
        every[:3],
        **{
            every[0]: {"availability": "out of stock"},
            every[1]: {"availability": "discontinued"},
            every[2]: {"availability": "In Stock"},
        },
    )
    delta = ingest(write_csv(tmp_path / "delta.csv", delta_rows), settings)
    assert (delta.updated, delta.delisted, delta.unchanged) == (2, 1, 0)
    after = products(settings)
    assert after[every[0]].listed and after[every[0]].in_stock is False
    assert not after[every[1]].listed and after[every[1]].delisted_at is not None
    assert after[every[2]].in_stock is True
    assert after[every[3]].listed  # missing from a delta: untouched
    shown = run_flickd("show", every[0], env=settings_env(settings)).stdout
    assert "listed; out of stock" in shown
    # A `deleted` column delists too, and an unknown value is a note, not a delisting.
    rows = rows_for(
        catalog,
        server,
        [every[2], every[3]],
        **{every[2]: {"deleted": "yes"}, every[3]: {"deleted": "perhaps"}},
    )
    second = ingest(write_csv(tmp_path / "deleted.csv", rows), settings)
    assert second.delisted == 1 and dict(second.notes_by_reason) == {"unknown_availability": 1}
    after = products(settings)
    assert not after[every[2]].listed and after[every[3]].listed


# --- bad inputs: a broken export must not wipe a store ------------------------------------------


def _seed(settings: Settings, catalog: Catalog, server: CatalogServer, tmp_path: Path) -> list[str]:
    every = ids(catalog)[:5]
    assert ingest(write_csv(tmp_path / "seed.csv", rows_for(catalog, server, every)), settings)
    return every


def _listed(settings: Settings) -> set[str]:
    return {pid for pid, p in products(settings).items() if p.listed}


def test_empty_full_feed_is_refused(settings, catalog, server, tmp_path):
    every = _seed(settings, catalog, server, tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("product_id,image_url,title,brand,category,price\n")
    summary = ingest(empty, settings, full=True)
    assert summary.sync_refused and "names no product" in summary.sync_refused
    assert "all 5 listed products" in summary.sync_refused
    assert summary.delisted == 0 and _listed(settings) == set(every)
    run = run_row(settings, summary.run_id)
    assert run.sync_refused == summary.sync_refused and run.products_delisted == 0
    # The operator may insist: --force delists the lot.
    forced = ingest(empty, settings, full=True, force=True)
    assert forced.sync_refused is None and forced.delisted == 5 and _listed(settings) == set()


def test_truncated_full_feeds_are_refused(settings, catalog, server, tmp_path):
    import gzip

    every = _seed(settings, catalog, server, tmp_path)
    whole = write_csv(tmp_path / "whole.csv", rows_for(catalog, server, every[:4]))
    # A gzip stream cut short: the reader fails mid-file.
    packed = gzip.compress(whole.read_bytes() * 40)
    cut_gz = tmp_path / "cut.csv.gz"
    cut_gz.write_bytes(packed[: len(packed) // 2])
    summary = ingest(cut_gz, settings, full=True)
    assert summary.status == "failed" and summary.error
    assert "nothing was delisted" in (summary.sync_refused or "")
    assert run_row(settings, summary.run_id).sync_refused == summary.sync_refused
    assert _listed(settings) == set(every)
    # A CSV that stops mid-row: its last row is malformed and there is no final line break.
    text = whole.read_text()
    cut_csv = tmp_path / "cut.csv"
    cut_csv.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + f"{every[3]},htt")
    summary = ingest(cut_csv, settings, full=True, force=False)
    assert summary.sync_refused and "looks cut short" in summary.sync_refused
    assert summary.delisted == 0 and _listed(settings) == set(every)
    # What the rows said is still recorded (as a delta would be): nothing lost.
    named = {line.split(",")[0] for line in cut_csv.read_text().splitlines()[1:-1]}
    assert (summary.unchanged, summary.created) == (len(named), 0)


def test_full_feed_delisting_too_large_a_share_is_refused(settings, catalog, server, tmp_path):
    every = _seed(settings, catalog, server, tmp_path)
    feed = write_csv(tmp_path / "two.csv", rows_for(catalog, server, every[:2]))
    summary = ingest(feed, settings, full=True)  # would delist 3 of 5: 60% > 50%
    assert summary.sync_refused and "3 of the 5" in summary.sync_refused
    assert "FLICKD_MAX_DELIST_SHARE=0.5" in summary.sync_refused
    assert _listed(settings) == set(every)
    env = settings_env(settings)
    out = run_flickd("ingest", str(feed), "--full", "--json", env=env, expect_ok=False)
    assert out.returncode == 2 and "3 of the 5" in json.loads(out.stdout)["sync_refused"]
    assert _listed(settings) == set(every)
    out = run_flickd("ingest", str(feed), "--full", "--force", "--json", env=env)
    assert json.loads(out.stdout)["products"]["delisted"] == 3
    assert _listed(settings) == set(every[:2])


def test_prices_in_other_formats(settings, catalog, server, tmp_path):
    every = ids(catalog)[:5]
    prices = {every[0]: "€1.234,50", every[1]: "12,99 EUR", every[2]: "$1,299.00"}
    prices |= {every[3]: "free", every[4]: "ask in store"}
    rows = rows_for(catalog, server, every, **{p: {"price": v} for p, v in prices.items()})
    summary = ingest(write_csv(tmp_path / "prices.csv", rows), settings)
    got = {pid: (p.price, p.currency) for pid, p in products(settings).items()}
    assert got == {
        every[0]: (1234.5, "EUR"),
        every[1]: (12.99, "EUR"),
        every[2]: (1299.0, "USD"),
        every[3]: (0.0, None),
        every[4]: (None, None),
    }
    # The unreadable price is a recorded, per-row outcome; the product and its images stay.
    assert dict(summary.notes_by_reason) == {"unreadable_price": len(catalog.products[4].images)}
    assert summary.invalid == 0 and summary.created == 5
    with session_scope(settings) as session:
        notes = session.execute(
            select(RejectedRow.reason, RejectedRow.detail).where(
                RejectedRow.run_id == summary.run_id
            )
        ).all()
    assert {reason for reason, _ in notes} == {"unreadable_price"}
    assert all("'ask in store' is not a price" in detail for _, detail in notes)
    assert run_row(settings, summary.run_id).notes_by_reason == {
        "unreadable_price": len(catalog.products[4].images)
    }


def test_full_csv_cut_inside_a_row_is_refused(settings, catalog, server, tmp_path):
    """Cut inside a title: the row itself parses (the reader pads it), so the short last
    line is what gives it away."""
    every = _seed(settings, catalog, server, tmp_path)
    text = write_csv(tmp_path / "whole.csv", rows_for(catalog, server, every[:2])).read_text()
    line = text.splitlines()[-1]
    cut = tmp_path / "cut.csv"
    cut.write_text(text[: len(text) - len(line) - 1] + line[: line.index(",", 40) + 3])
    summary = ingest(cut, settings, full=True)
    assert summary.sync_refused and "fewer fields than the header" in summary.sync_refused
    assert _listed(settings) == set(every)


def test_two_full_feeds_of_one_catalog_at_once_never_mix(settings, catalog, server, tmp_path):
    """Two `flickd ingest --full` processes of one catalog at once: one waits for the other,
    and the catalog ends up exactly as the later feed says."""
    import subprocess
    import sys

    import psycopg

    from producer.sync import LOCK_NAMESPACE, _catalog_key
    from tests.conftest import ROOT, wait_until

    settings = settings.model_copy(update={"max_delist_share": 1.0})
    full_shop = ["--full", "--catalog", "shop", "--json"]
    every = ids(catalog)
    feeds = {
        "a": (every[:4], write_csv(tmp_path / "a.csv", rows_for(catalog, server, every[:4]))),
        "b": (every[3:7], write_csv(tmp_path / "b.csv", rows_for(catalog, server, every[3:7]))),
    }
    env = settings_env(settings)

    def running() -> int:
        with session_scope(settings) as session:
            return int(
                session.scalar(
                    select(func.count()).where(IngestRun.status == "running", IngestRun.full_feed)
                )
                or 0
            )

    # Hold the catalog's lock ourselves until both processes have found it taken (each logs
    # that it waits): a process merely started may not have reached the lock yet.
    holder = psycopg.connect(settings.database_url.replace("+psycopg", ""), autocommit=True)
    holder.execute(f"SELECT pg_advisory_lock({LOCK_NAMESPACE}, {_catalog_key('shop')})")
    procs = {}
    logs = {name: tmp_path / f"{name}.stderr" for name in feeds}

    def waiting(name: str) -> bool:
        return "waiting for another full feed of catalog 'shop'" in logs[name].read_text()

    try:
        for name, (_, path) in feeds.items():
            with logs[name].open("w") as stderr:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "flickd.cli", "ingest", str(path), *full_shop],
                    env={**env, "FLICKD_LOG_LEVEL": "INFO"},
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
        wait_until(lambda: running() == 2, 60, "both full feeds to start")
        wait_until(lambda: all(map(waiting, feeds)), 60, "both full feeds to wait for the lock")
        holder.execute(f"SELECT pg_advisory_unlock({LOCK_NAMESPACE}, {_catalog_key('shop')})")
        results = {}
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, logs[name].read_text()[-2000:]
            results[name] = json.loads(out)
    finally:
        holder.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(r["lock_wait_seconds"] > 0 for r in results.values())
    with session_scope(settings) as session:
        finished = dict(session.execute(select(IngestRun.id, IngestRun.enqueued_at)).tuples().all())
    first, last = sorted(results, key=lambda name: finished[results[name]["run_id"]])
    kept, earlier = set(feeds[last][0]), set(feeds[first][0])
    shop = {pid: p for pid, p in products(settings).items() if p.catalog == "shop"}
    assert {pid for pid, p in shop.items() if p.listed} == kept
    assert {pid for pid, p in shop.items() if not p.listed} == earlier - kept
    assert results[first]["products"]["delisted"] == 0
    assert results[last]["products"]["delisted"] == len(earlier - kept)
    assert results[last]["products"]["created"] == len(kept - earlier)
    assert all(p.seen_run_id == results[last]["run_id"] for pid, p in shop.items() if p.listed)


def test_embedded_sqlite_full_feeds_and_purge(embedded_settings, catalog, server, tmp_path):
    """The same sync on the embedded default (SQLite, tasks in-process)."""
    settings = embedded_settings.model_copy(update={"max_delist_share": 0.5})
    every = ids(catalog)[:4]
    first = ingest(write_csv(tmp_path / "a.csv", rows_for(catalog, server, every)), settings)
    assert first.status == "done" and first.created == 4
    hits = image_hits(catalog, server)
    rows = rows_for(
        catalog, server, every[1:], **{every[1]: {"price": "12,99 EUR", "availability": "sold out"}}
    )
    second = ingest(write_csv(tmp_path / "b.csv", rows), settings, full=True)
    assert (second.created, second.updated, second.unchanged, second.delisted) == (0, 1, 2, 1)
    assert image_hits(catalog, server) == hits
    after = products(settings)
    assert not after[every[0]].listed
    assert (after[every[1]].price, after[every[1]].currency, after[every[1]].in_stock) == (
        12.99,
        "EUR",
        False,
    )
    back = ingest(write_csv(tmp_path / "c.csv", rows_for(catalog, server, every)), settings)
    assert back.relisted == 1 and back.enqueued == 0 and products(settings)[every[0]].listed
    ingest(write_csv(tmp_path / "d.csv", rows_for(catalog, server, every[1:])), settings, full=True)
    blobs = BlobStore.for_settings(settings)
    with session_scope(settings) as session:
        keys = list(
            session.scalars(
                select(Image.blob_key).join(Product).where(Product.external_id == every[0])
            )
        )
        session.execute(
            update(Product)
            .where(Product.external_id == every[0])
            .values(delisted_at=utcnow() - timedelta(days=8))
        )
    assert keys and all(blobs.exists(k) for k in keys)
    report = reconcile_once(settings)  # the default grace: 7 days
    assert report.products_purged == 1 and every[0] not in products(settings)
    assert not any(blobs.exists(k) for k in keys)
