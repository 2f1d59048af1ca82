"""A full rebuild only when drift calls for it: the reconciler measures how far the catalog moved
from the served build and, past FLICKD_REBUILD_DRIFT_SHARE, asks for a build by task name; a
real gpu worker takes it and publishes an index without the delisted products."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from db.schema import IndexBuild, Product, utcnow
from db.session import session_scope
from flickd.core.settings import Settings
from models.index import load_current
from tests.conftest import celery_worker, wait_until
from tests.models_fixtures import tiny_embedder, tiny_models
from tests.test_search_filters import generated_catalog
from workers.indexing import build_from_database
from workers.reconcile import reconcile_once


@pytest.fixture()
def settings(pg_settings: Settings, tiny_models) -> Settings:
    return pg_settings.model_copy(
        update={
            "finalize": "index",
            "last_stage": "analyze",
            "embedding_model": str(tiny_models["clip"]),
            "detector_model": "none",
            "device": "cpu",
            "rebuild_drift_share": 0.2,
        }
    )


@pytest.mark.services
def test_drift_past_the_share_rebuilds_the_index_once(settings, tiny_embedder):
    version = generated_catalog(settings, tiny_embedder, seed=3)
    build_from_database(settings, version)
    served = load_current(settings.index_dir).ntotal
    assert reconcile_once(settings).rebuilds_requested == 0  # nothing moved

    with session_scope(settings) as session:  # a little drift: below the share
        few = session.scalars(select(Product.id).where(Product.listed).limit(5)).all()
        session.execute(
            update(Product).where(Product.id.in_(few)).values(listed=False, updated_at=utcnow())
        )
    assert reconcile_once(settings).rebuilds_requested == 0

    with session_scope(settings) as session:  # then a third of the catalog leaves
        many = session.scalars(select(Product.id).where(Product.listed).limit(80)).all()
        session.execute(
            update(Product).where(Product.id.in_(many)).values(listed=False, updated_at=utcnow())
        )
    assert reconcile_once(settings).rebuilds_requested == 1
    assert reconcile_once(settings).rebuilds_requested == 0  # asked once: a build is pending
    with session_scope(settings) as session:
        pending = session.scalars(select(IndexBuild).where(IndexBuild.status == "pending")).one()
        assert pending.params["reason"] == "drift" and pending.params["left"] > 0

    with celery_worker(settings, "gpu", concurrency=1):
        wait_until(
            lambda: load_current(settings.index_dir).ntotal < served,
            120,
            "the gpu worker to publish the rebuilt index",
        )
    rebuilt = load_current(settings.index_dir).ntotal
    with session_scope(settings) as session:
        build = session.scalars(select(IndexBuild).where(IndexBuild.active)).one()
        assert build.status == "ready" and build.n_vectors == rebuilt
    assert reconcile_once(settings).rebuilds_requested == 0  # the new build has no drift
