"""Producer end to end: feed → database → download → blob store, in both modes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from db.schema import Image, IngestRun, Product, RejectedRow
from db.session import session_scope
from flickd.core.blobstore import BlobStore
from flickd.core.settings import Settings
from producer.ingest import ingest
from synthetic.catalog import write_feed
from tests.conftest import catalog_fixture, celery_worker, run_flickd, settings_env, wait_for_run

catalog = catalog_fixture(12, seed=3)


def _counts(settings: Settings) -> dict[str, int]:
    with session_scope(settings) as session:
        return {
            "products": session.scalar(select(func.count()).select_from(Product)),
            "images": session.scalar(select(func.count()).select_from(Image)),
            "downloaded": session.scalar(
                select(func.count()).select_from(Image).where(Image.state == "downloaded")
            ),
        }


def test_embedded_ingest_downloads_every_image(embedded_settings, catalog, server, tmp_path):
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    summary = ingest(feed, embedded_settings)

    assert summary.status == "done"
    assert summary.accepted == len(catalog.images)
    assert summary.enqueued == len(catalog.images)
    counts = _counts(embedded_settings)
    assert counts == {
        "products": len(catalog.products),
        "images": len(catalog.images),
        "downloaded": len(catalog.images),
    }
    blobs = BlobStore(embedded_settings.blob_dir)
    with session_scope(embedded_settings) as session:
        rows = session.execute(select(Image.url, Image.blob_key, Image.width, Image.height)).all()
    by_name = {img.filename: img for img in catalog.images}
    for url, key, width, height in rows:
        expected = by_name[url.rsplit("/", 1)[1]]
        source = (catalog.root / "images" / expected.filename).read_bytes()
        assert blobs.get(key) == source  # the original bytes, content-addressed
        assert (width, height) == (expected.width, expected.height)


def test_same_feed_twice_creates_nothing_new(embedded_settings, catalog, server, tmp_path):
    feed = tmp_path / "feed.jsonl"
    write_feed(catalog, feed, server.base_url, fmt="jsonl")
    first = ingest(feed, embedded_settings)
    before = _counts(embedded_settings)
    second = ingest(feed, embedded_settings)

    assert first.enqueued == len(catalog.images)
    assert second.enqueued == 0
    assert second.already_known == len(catalog.images)
    assert _counts(embedded_settings) == before


def test_list_layout_and_metadata_recorded(embedded_settings, catalog, server, tmp_path):
    feed = tmp_path / "feed.parquet"
    write_feed(catalog, feed, server.base_url, fmt="parquet", layout="list")
    summary = ingest(feed, embedded_settings)
    assert summary.accepted == len(catalog.images)
    product = catalog.products[0]
    with session_scope(embedded_settings) as session:
        row = session.scalars(
            select(Product).where(Product.external_id == product.product_id)
        ).one()
        assert (row.title, row.brand, row.category) == (
            product.title,
            product.brand,
            product.category,
        )
        assert row.price == pytest.approx(product.price)
        assert len(row.images) == len(product.images)


def test_rejected_rows_recorded_with_reason(embedded_settings, server, tmp_path):
    feed = tmp_path / "bad.csv"
    good = f"{server.base_url}/fault/404"
    feed.write_text(
        "product_id,image_url\n"
        f"p1,{good}\n"
        ",http://example.com/a.jpg\n"
        "p2,\n"
        "p3,ftp://example.com/a.jpg\n"
        "p4,not a url\n"
        f"p1,{good}\n"
    )
    summary = ingest(feed, embedded_settings)
    assert summary.accepted == 1
    assert summary.duplicates_in_feed == 1
    assert dict(summary.invalid_by_reason) == {
        "missing_id": 1,
        "missing_url": 1,
        "unsupported_scheme": 1,
        "malformed_url": 1,
    }
    with session_scope(embedded_settings) as session:
        rejected = session.execute(
            select(RejectedRow.row_number, RejectedRow.reason).order_by(RejectedRow.row_number)
        ).all()
        image = session.scalars(select(Image)).one()
    assert [tuple(r) for r in rejected] == [
        (2, "missing_id"),
        (3, "missing_url"),
        (4, "unsupported_scheme"),
        (5, "malformed_url"),
    ]
    assert (image.state, image.failure_reason, image.failure_detail) == (
        "failed",
        "http_error",
        image.failure_detail,
    )
    assert "404" in image.failure_detail


def test_unreadable_feed_fails_the_run_with_reason(embedded_settings, tmp_path):
    feed = tmp_path / "broken.parquet"
    feed.write_bytes(b"PAR1 this is not parquet")
    summary = ingest(feed, embedded_settings)
    assert summary.status == "failed"
    assert summary.error
    with session_scope(embedded_settings) as session:
        run = session.get(IngestRun, summary.run_id)
        assert run.status == "failed" and run.error == summary.error


def test_cli_ingest_json_on_embedded_default(catalog, server, tmp_path):
    """The README's one command: no settings but the loopback allowance, SQLite by default."""
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    env = settings_env(Settings(data_dir=tmp_path / "data", allowed_networks=["127.0.0.0/8"]))
    env["FLICKD_LAST_STAGE"] = "download"
    out = run_flickd("ingest", str(feed), "--json", env=env, timeout=120)
    result = json.loads(out.stdout)
    assert result["status"] == "done"
    assert result["enqueued"] == len(catalog.images)
    assert result["images_by_state"] == {"downloaded": len(catalog.images)}

    status = run_flickd("status", "--json", env=env, timeout=60)
    assert json.loads(status.stdout)["images_by_state"] == {"downloaded": len(catalog.images)}


@pytest.mark.services
def test_distributed_ingest_through_real_worker(pg_settings, catalog, server, tmp_path):
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    with celery_worker(pg_settings, queues="download", concurrency=2):
        summary = ingest(feed, pg_settings)
        assert summary.status in ("enqueued", "done")
        assert summary.messages == -(-len(catalog.images) // pg_settings.download_batch_size)
        assert wait_for_run(pg_settings, summary.run_id, timeout=60) == "done"
    assert _counts(pg_settings)["downloaded"] == len(catalog.images)
    again = ingest(feed, pg_settings)
    assert again.enqueued == 0 and again.already_known == len(catalog.images)


@pytest.mark.services
def test_cli_ingest_wait_follows_a_distributed_run(pg_settings, catalog, server, tmp_path):
    """Distributed mode: `flickd ingest --wait` returns only when every image is done."""
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    with celery_worker(pg_settings, queues="download", concurrency=1):
        out = run_flickd(
            "ingest", str(feed), "--wait", "--json", env=settings_env(pg_settings), timeout=120
        )
    result = json.loads(out.stdout)
    assert result["status"] == "done"
    assert result["images_by_state"] == {"downloaded": len(catalog.images)}
