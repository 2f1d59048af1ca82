"""Catalog sync of images, with real download and analysis workers (tiny offline models) on
Postgres and Redis: a changed image URL supersedes the old image, which is retired in the
commit that analyses the new one; one URL under several products is fetched and analysed
once; delisted products are purged after the grace period, their blobs only when unshared."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from db.schema import Crop, Embedding, Image, Product, utcnow
from db.session import session_scope
from flickd.core.blobstore import BlobStore
from flickd.core.broker import queue_lengths
from flickd.core.settings import Settings
from producer.ingest import ingest
from tests.conftest import catalog_fixture, celery_worker, wait_for_run, wait_until
from tests.models_fixtures import tiny_models
from tests.test_catalog_sync import ids, products, rows_for, write_csv
from workers.reconcile import reconcile_once

pytestmark = pytest.mark.services

catalog = catalog_fixture(6, seed=23)


@pytest.fixture()
def settings(pg_settings: Settings, tiny_models) -> Settings:
    return pg_settings.model_copy(
        update={
            "last_stage": "analyze",
            "finalize": "off",
            "detector_model": "none",
            "embedding_model": str(tiny_models["clip"]),
            "device": "cpu",
            "analyze_batch_size": 4,
        }
    )


def images_of(settings: Settings, product_id: str) -> list[Image]:
    with session_scope(settings) as session:
        return list(
            session.scalars(
                select(Image)
                .join(Product)
                .where(Product.external_id == product_id)
                .order_by(Image.id)
            )
        )


def crops_of(settings: Settings, image_id: int) -> list[Crop]:
    with session_scope(settings) as session:
        return list(
            session.scalars(select(Crop).where(Crop.image_id == image_id).order_by(Crop.crop_index))
        )


def embeddings_of(settings: Settings, image_id: int) -> list[bytes]:
    with session_scope(settings) as session:
        return list(
            session.scalars(
                select(Embedding.vector)
                .join(Crop, Crop.id == Embedding.crop_id)
                .where(Crop.image_id == image_id)
                .order_by(Crop.crop_index)
            )
        )


def analysed_in_batches(log: Path) -> int:
    """Images the vision stage ran the models on, from the worker's batch log lines."""
    text = log.read_text(errors="replace")
    return sum(int(n) for n in re.findall(r"analyze batch done images=(\d+)", text))


def test_changed_url_supersedes_then_retires_in_the_analysing_commit(
    settings, catalog, server, tmp_path
):
    every = ids(catalog)[:3]
    swapped, broken = every[0], every[1]
    spare = catalog.products[5].images[0].filename  # an image no product of the feed uses
    with celery_worker(settings, queues="download,gpu", concurrency=2):
        first = ingest(write_csv(tmp_path / "a.csv", rows_for(catalog, server, every)), settings)
        assert wait_for_run(settings, first.run_id, timeout=120) == "done"
    old_swapped, old_broken = images_of(settings, swapped)[0], images_of(settings, broken)[0]

    rows = rows_for(catalog, server, every)
    for row in rows:
        if row["image_url"].endswith(old_swapped.url.rsplit("/", 1)[1]):
            row["image_url"] = server.image_url(spare)
        if row["image_url"] == old_broken.url:
            row["image_url"] = server.url("/fault/404")
    second = ingest(write_csv(tmp_path / "b.csv", rows), settings)  # no worker yet
    assert second.enqueued == 2 and second.updated == 0 and second.unchanged == 3
    old = {i.id: i for i in images_of(settings, swapped) + images_of(settings, broken)}
    for image in (old_swapped, old_broken):
        assert old[image.id].superseded_at is not None  # still served meanwhile
        assert old[image.id].retired_at is None

    with celery_worker(settings, queues="download,gpu", concurrency=2):
        assert wait_for_run(settings, second.run_id, timeout=120) == "done"
    by_url = {i.url: i for i in images_of(settings, swapped)}
    new = by_url[server.image_url(spare)]
    retired = by_url[old_swapped.url]
    assert new.state == "analyzed" and new.superseded_at is None and new.retired_at is None
    assert retired.retired_at == new.analyzed_at  # one commit: the new in, the old out
    assert crops_of(settings, retired.id)  # kept until the product's purge
    # The new image of the other product failed for good: its old image stays served.
    failed = next(i for i in images_of(settings, broken) if i.url.endswith("/fault/404"))
    assert failed.state == "failed" and failed.failure_reason == "http_error"
    kept = next(i for i in images_of(settings, broken) if i.id == old_broken.id)
    assert kept.superseded_at is not None and kept.retired_at is None
    # The feed names the old URL again: it is current again, nothing downloaded.
    hits = server.hits(old_swapped.url)
    third = ingest(write_csv(tmp_path / "c.csv", rows_for(catalog, server, every)), settings)
    assert third.enqueued == 0
    now = {i.id: i for i in images_of(settings, swapped)}
    assert now[old_swapped.id].superseded_at is None and now[old_swapped.id].retired_at is None
    assert server.hits(old_swapped.url) == hits
    # The picture the feed dropped has no replacement: it leaves search at once.
    assert now[new.id].superseded_at is not None and now[new.id].retired_at is not None


def test_one_url_under_several_products_is_fetched_and_analysed_once(
    settings, catalog, server, tmp_path
):
    shared = catalog.products[0].images[0].filename
    url = server.image_url(shared)
    every = ids(catalog)[:4]
    rows = [{"product_id": pid, "image_url": url, "title": f"with {pid}"} for pid in every[:3]]
    rows += [dict(row, title="own") for row in rows_for(catalog, server, every[1:3])]
    log = tmp_path / "worker.log"
    before = server.hits(url)
    with celery_worker(settings, queues="download,gpu", concurrency=2, log_path=log):
        first = ingest(write_csv(tmp_path / "a.csv", rows), settings)
        assert wait_for_run(settings, first.run_id, timeout=120) == "done"
        siblings = [images_of(settings, pid)[0] for pid in every[:3]]
        assert {i.url for i in siblings} == {url}
        assert server.hits(url) == before + 1
        assert {i.state for i in siblings} == {"analyzed"}
        distinct = {i.blob_key for pid in every[:3] for i in images_of(settings, pid)}
        assert analysed_in_batches(log) == len(distinct)  # one analysis per distinct image
        reference = [
            (c.crop_index, c.colour_name, c.prompt, c.blob_key)
            for c in crops_of(settings, siblings[0].id)
        ]
        for image in siblings:
            got = [
                (c.crop_index, c.colour_name, c.prompt, c.blob_key)
                for c in crops_of(settings, image.id)
            ]
            assert got == reference
            assert embeddings_of(settings, image.id) == embeddings_of(settings, siblings[0].id)
        # A later product with the same URL: no fetch, no analysis, all the same results.
        analysed = analysed_in_batches(log)
        late = [{"product_id": every[3], "image_url": url, "title": "late"}]
        second = ingest(write_csv(tmp_path / "b.csv", late), settings)
        assert wait_for_run(settings, second.run_id, timeout=120) == "done"
    (image,) = images_of(settings, every[3])
    assert image.state == "analyzed" and image.blob_key == siblings[0].blob_key
    assert server.hits(url) == before + 1
    assert analysed_in_batches(log) == analysed
    assert embeddings_of(settings, image.id) == embeddings_of(settings, siblings[0].id)


def test_purge_after_grace_keeps_blobs_still_shared(settings, catalog, server, tmp_path):
    shared = server.image_url(catalog.products[0].images[0].filename)
    own = server.image_url(catalog.products[1].images[0].filename)
    doomed, keeper = ids(catalog)[:2]
    rows = [
        {"product_id": doomed, "image_url": shared},
        {"product_id": doomed, "image_url": own},
        {"product_id": keeper, "image_url": shared},
    ]
    with celery_worker(settings, queues="download,gpu", concurrency=2):
        run = ingest(write_csv(tmp_path / "a.csv", rows), settings)
        assert wait_for_run(settings, run.run_id, timeout=120) == "done"
    by_url = {i.url: i for i in images_of(settings, doomed)}
    own_blob, shared_blob = by_url[own].blob_key, by_url[shared].blob_key
    own_crop_blobs = {c.blob_key for c in crops_of(settings, by_url[own].id)}
    shared_crop_blobs = {c.blob_key for c in crops_of(settings, by_url[shared].id)}
    blobs = BlobStore.for_settings(settings)
    assert all(blobs.exists(k) for k in {own_blob, shared_blob} | own_crop_blobs)

    gone = ingest(
        write_csv(tmp_path / "b.csv", [{"product_id": doomed, "image_url": own, "deleted": "1"}]),
        settings,
    )
    assert gone.delisted == 1
    kept = reconcile_once(settings.model_copy(update={"delist_grace_seconds": 3600}))
    assert kept.products_purged == 0 and doomed in products(settings)
    report = reconcile_once(settings.model_copy(update={"delist_grace_seconds": 0}))
    assert report.products_purged == 1
    assert doomed not in products(settings) and products(settings)[keeper].listed
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Image)) == 1  # the keeper's
    assert not blobs.exists(own_blob)
    assert not any(blobs.exists(k) for k in own_crop_blobs - shared_crop_blobs)
    assert blobs.exists(shared_blob)  # the keeper still uses these
    assert all(blobs.exists(k) for k in shared_crop_blobs)
    assert report.blobs_deleted == len({own_blob} | (own_crop_blobs - shared_crop_blobs))
    (survivor,) = images_of(settings, keeper)
    assert survivor.state == "analyzed" and crops_of(settings, survivor.id)


def test_a_stranded_sibling_is_redriven_and_analysed_on_its_own(
    settings, catalog, server, tmp_path
):
    """A sibling waits for the analysis of the image of lowest id with the same bytes; when
    that one fails instead, the sibling is stranded, and the reconciler re-drives it like any
    stalled image: it is analysed on its own."""
    settings = settings.model_copy(update={"lease_seconds": 5})
    url = server.image_url(catalog.products[2].images[0].filename)
    first, second = ids(catalog)[:2]
    rows = [{"product_id": first, "image_url": url}, {"product_id": second, "image_url": url}]
    before = server.hits(url)
    with celery_worker(settings, queues="download", concurrency=1):
        run = ingest(write_csv(tmp_path / "a.csv", rows), settings)

        def handed_on() -> bool:
            return queue_lengths(settings)[0]["gpu"] == 1

        wait_until(handed_on, 60, "the download to hand one image (not two) to analysis")
    (leader,), (follower,) = images_of(settings, first), images_of(settings, second)
    assert leader.id < follower.id and leader.blob_key == follower.blob_key
    assert {leader.state, follower.state} == {"downloaded"}
    assert server.hits(url) == before + 1
    # The leader's analysis fails (as a broken model would make it), before any gpu worker.
    with session_scope(settings) as session:
        session.execute(
            update(Image)
            .where(Image.id == leader.id)
            .values(state="failed", failure_reason="analysis_error", failure_detail="test")
        )
        session.execute(
            update(Image)
            .where(Image.id == follower.id)
            .values(updated_at=utcnow() - timedelta(hours=1))
        )
    report = reconcile_once(settings)
    assert report.requeued["analyze"] == 1
    with celery_worker(settings, queues="gpu", concurrency=1):
        assert wait_for_run(settings, run.run_id, timeout=120) == "done"
    (follower,) = images_of(settings, second)
    assert follower.state == "analyzed" and crops_of(settings, follower.id)
    assert embeddings_of(settings, follower.id)


def test_search_follows_a_second_full_feed_without_a_rebuild(settings, catalog, server, tmp_path):
    """Full feed, index, then a second full feed that removes one product, retitles one and
    adds one: a serving SearchService (polling, as the API does) answers with exactly the
    second feed's products and the new title, and no rebuild happens in between."""
    from flickd.services.search import SearchService
    from tests.test_search_api import build_index

    settings = settings.model_copy(update={"max_delist_share": 1.0, "freshness_poll_seconds": 0.2})
    every = ids(catalog)
    first, second = every[:4], every[1:5]  # every[0] leaves, every[4] arrives
    renamed = every[2]
    k = len(every)

    def served() -> dict[str, str | None]:
        hits = service.search_text("a photo of a fashion item", k).items[0].results
        return {hit.product_id: hit.title for hit in hits}

    with celery_worker(settings, queues="download,gpu", concurrency=2):
        run = ingest(
            write_csv(tmp_path / "a.csv", rows_for(catalog, server, first)), settings, full=True
        )
        assert wait_for_run(settings, run.run_id, timeout=120) == "done"
        build_index(settings)
        service = SearchService(settings)
        service.freshness.start()
        try:
            assert set(served()) == set(first)
            built = service.freshness.current()
            assert built is not None
            feed = rows_for(catalog, server, second, **{renamed: {"title": "Renamed in feed B"}})
            run = ingest(write_csv(tmp_path / "b.csv", feed), settings, full=True)
            assert (run.created, run.updated, run.unchanged, run.delisted) == (1, 1, 2, 1)
            assert wait_for_run(settings, run.run_id, timeout=120) == "done"
            wait_until(
                lambda: set(served()) == set(second) and served()[renamed] == "Renamed in feed B",
                30,
                "search to serve the second feed",
            )
        finally:
            service.freshness.stop()
    now = service.freshness.current()
    assert now is not None and now.base is built.base  # served from the first build, no rebuild
    assert products(settings)[every[0]].listed is False
