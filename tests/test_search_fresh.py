"""Freshness on real Postgres: two serving replicas (SearchService, each with its polling thread)
over one built index. A crop analysed by the real pipeline after the build becomes searchable
in both without a rebuild; a delisted product and a retired image leave both; a rebuild leaves
the delisted product out, and relisting it brings it back."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from PIL import Image as PILImage
from sqlalchemy import select, update

from db.migrate import upgrade
from db.schema import Image, Product, utcnow
from db.session import session_scope
from flickd.core.settings import Settings
from flickd.services.search import SearchService
from tests.conftest import FAST_DOWNLOADS, _truncate_all, catalog_fixture, wait_until
from tests.models_fixtures import tiny_models
from tests.test_search_api import active_version_id, ingest_products
from workers.indexing import build_from_database

POLL = 0.2
BOUND = POLL + 15  # the poll interval plus a generous query and CI margin

catalog = catalog_fixture(8, seed=23)


@pytest.fixture(scope="module")
def settings(pg_url, tmp_path_factory, tiny_models, catalog, server) -> Settings:
    _truncate_all(pg_url)
    settings = Settings(
        database_url=pg_url,
        data_dir=tmp_path_factory.mktemp("fresh") / "data",
        allowed_networks=["127.0.0.0/8"],
        **{**FAST_DOWNLOADS, "last_stage": "analyze"},
        detector_model="none",
        embedding_model=str(tiny_models["clip"]),
        device="cpu",
        finalize="off",  # no rebuild at the run's end: freshness alone must do it
        freshness_poll_seconds=POLL,
        index_poll_seconds=POLL,
    )
    upgrade(settings)
    ingest_products(settings, catalog, server, 5)
    build_from_database(settings, active_version_id(settings), settings.index_dir)
    return settings


@pytest.fixture(scope="module")
def replicas(settings) -> Iterator[list[SearchService]]:
    services = [SearchService(settings), SearchService(settings)]
    for service in services:
        service.freshness.start()
    yield services
    for service in services:
        service.freshness.stop()


def top_products(service: SearchService, image: PILImage.Image) -> list[str]:
    response = service.search_image(image, 3, detect=False)
    return [hit.product_id for hit in response.items[0].results]


def _set_listed(settings: Settings, product_id: str, listed: bool) -> None:
    with session_scope(settings) as session:
        session.execute(
            update(Product)
            .where(Product.external_id == product_id)
            .values(listed=listed, delisted_at=None if listed else utcnow(), updated_at=utcnow())
        )


def test_new_crops_delistings_and_retired_images_reach_every_replica(
    settings, replicas, catalog, server
):
    new = catalog.products[6]
    image = PILImage.open(catalog.image_path(new.images[0])).convert("RGB")
    assert all(new.product_id not in top_products(s, image) for s in replicas)

    # analysed after the build: searchable without a rebuild, in both replicas
    subset = dataclasses.replace(catalog, products=catalog.products[5:8])
    ingest_products(settings, subset, server, 3)
    wait_until(
        lambda: all(top_products(s, image)[:1] == [new.product_id] for s in replicas),
        BOUND,
        "the newly analysed product to be found by both replicas",
    )
    assert all(s.freshness.current().n_delta > 0 for s in replicas)

    # delisted: gone from both, no rebuild
    _set_listed(settings, new.product_id, False)
    wait_until(
        lambda: all(new.product_id not in top_products(s, image) for s in replicas),
        BOUND,
        "the delisted product to leave both replicas",
    )

    # a rebuild leaves it out; relisting brings it back (its vector comes to the delta)
    old_bases = [s.freshness.current().base for s in replicas]  # before: a replica is quick
    build_from_database(settings, active_version_id(settings), settings.index_dir)
    wait_until(
        lambda: all(
            s.freshness.current().base is not old
            for s, old in zip(replicas, old_bases, strict=True)
        ),
        BOUND,
        "both replicas to serve the rebuilt index",
    )
    assert all(new.product_id not in top_products(s, image) for s in replicas)
    _set_listed(settings, new.product_id, True)
    wait_until(
        lambda: all(top_products(s, image)[:1] == [new.product_id] for s in replicas),
        BOUND,
        "the relisted product to come back in both replicas",
    )

    # a retired image leaves search too (its product stays listed)
    other = catalog.products[0]
    other_image = PILImage.open(catalog.image_path(other.images[0])).convert("RGB")
    assert all(top_products(s, other_image)[:1] == [other.product_id] for s in replicas)
    with session_scope(settings) as session:
        ids = session.scalars(
            select(Image.id).join(Product).where(Product.external_id == other.product_id)
        ).all()
        session.execute(update(Image).where(Image.id.in_(ids)).values(retired_at=utcnow()))
    wait_until(
        lambda: all(other.product_id not in top_products(s, other_image) for s in replicas),
        BOUND,
        "the retired image's product to leave both replicas",
    )


def test_a_process_without_the_thread_catches_up_on_its_next_query(settings, catalog):
    service = SearchService(settings)  # like `flickd search`: no polling thread
    product = catalog.products[1]
    image = PILImage.open(catalog.image_path(product.images[0])).convert("RGB")
    assert top_products(service, image)[:1] == [product.product_id]
    _set_listed(settings, product.product_id, False)
    wait_until(
        lambda: product.product_id not in top_products(service, image),
        BOUND,
        "the delisting to reach a process that polls on queries",
    )
    _set_listed(settings, product.product_id, True)
