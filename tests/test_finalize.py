"""The final task: exactly one per run, fine-tune → re-embed → index switch, in that order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sqlalchemy import func, select, update

from db.runs import finish_run_if_complete
from db.schema import Crop, Embedding, Image, IndexBuild, IngestRun, ModelVersion
from db.session import session_scope
from producer.ingest import ingest
from synthetic.catalog import generate_catalog, write_feed
from synthetic.procs import celery_workers
from synthetic.server import CatalogServer
from tests.conftest import catalog_fixture, celery_worker, wait_for_run
from tests.models_fixtures import tiny_models
from workers.finalize import finalize_run

# The catalog the fine-tuning tests showed to be learnable by the tiny CLIP.
catalog = catalog_fixture(100, seed=11)


def _vision(settings, tiny_models, **extra):
    return settings.model_copy(
        update={
            "last_stage": "analyze",
            "detector_model": "none",
            "embedding_model": str(tiny_models["clip"]),
            "device": "cpu",
            "analyze_batch_size": 16,
            "train_lr": 1e-3,
            "train_epochs": 8,
            "train_batch_size": 32,
            "finetune_min_new_crops": 1,
            **extra,
        }
    )


@pytest.mark.services
def test_only_one_of_many_concurrent_finishers_closes_the_run(pg_settings):
    with session_scope(pg_settings) as session:
        run = IngestRun(feed="x", status="enqueued")
        session.add(run)
        session.flush()
        run_id = run.id
    winners: list[bool] = []
    barrier = threading.Barrier(8)

    def finish() -> None:
        barrier.wait()
        with session_scope(pg_settings) as session:
            winners.append(finish_run_if_complete(session, run_id, "analyze"))

    threads = [threading.Thread(target=finish) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(winners) == [False] * 7 + [True]


@pytest.mark.services
def test_one_finalize_per_run_through_real_workers(pg_settings, tiny_models, tmp_path):
    """Two download workers and a gpu worker finish images concurrently; the run gets exactly
    one final task, which builds the index."""
    small = generate_catalog(tmp_path / "cat", 12, seed=4, size="small")
    settings = _vision(
        pg_settings, tiny_models, finalize="index", download_batch_size=2, analyze_batch_size=2
    )
    feed = tmp_path / "feed.csv"
    with CatalogServer(small.root / "images") as srv:
        write_feed(small, feed, srv.base_url)
        with celery_workers(
            settings,
            {"queues": "download", "concurrency": 2},
            {"queues": "download", "concurrency": 2},
            {"queues": "gpu", "concurrency": 1},
        ) as (_, _, gpu):
            run_id = ingest(feed, settings).run_id
            assert wait_for_run(settings, run_id, timeout=120) == "done"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with session_scope(settings) as session:
                    status = session.get(IngestRun, run_id).finalize_status
                if status not in ("queued", "running"):
                    break
                time.sleep(0.2)
            assert gpu.poll() is None
    assert status == "indexed"
    log_text = "".join(p.read_text() for p in (settings.data_dir / "logs").glob("*.log"))
    assert log_text.count("finalize run_id=") == 1  # one final task ran, once
    with session_scope(settings) as session:
        builds = session.scalars(select(IndexBuild)).all()
        crops = session.scalar(select(func.count()).select_from(Crop))
    assert len(builds) == 1 and builds[0].active and builds[0].n_vectors == crops
    assert (settings.index_dir / "current.json").exists()


@pytest.mark.services
def test_finetune_reembeds_before_switching(pg_settings, tiny_models, catalog, server, tmp_path):
    settings = _vision(pg_settings, tiny_models, finalize="off")
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    with celery_worker(settings, "download,gpu", concurrency=1):
        run_id = ingest(feed, settings).run_id
        assert wait_for_run(settings, run_id, timeout=300) == "done"
    with session_scope(settings) as session:
        base = session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))).one()
        n_crops = session.scalar(select(func.count()).select_from(Crop))

    # The final task by hand, with no gpu worker running: training happens here, the
    # re-embedding is queued and waits.
    outcome = finalize_run(run_id, settings.model_copy(update={"finalize": "auto"}))
    assert outcome.action == "finetuned"
    assert outcome.detail["promoted"], outcome.detail
    assert outcome.detail["score_after"] > outcome.detail["score_before"]
    new_id = outcome.detail["version_id"]
    with session_scope(settings) as session:
        active = session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))).one()
        build = session.scalars(
            select(IndexBuild).where(IndexBuild.model_version_id == new_id)
        ).one()
        embedded = session.scalar(
            select(func.count()).select_from(Embedding).where(Embedding.model_version_id == new_id)
        )
    assert active.id == base.id  # not switched while crops lack the new embeddings
    assert build.status == "pending" and embedded == 0

    with celery_worker(settings, "gpu", concurrency=1):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with session_scope(settings) as session:
                active = session.scalars(
                    select(ModelVersion).where(ModelVersion.active.is_(True))
                ).one()
            if active.id == new_id:
                break
            time.sleep(0.3)
    assert active.id == new_id
    with session_scope(settings) as session:
        embedded = session.scalar(
            select(func.count()).select_from(Embedding).where(Embedding.model_version_id == new_id)
        )
        build = session.scalars(select(IndexBuild).where(IndexBuild.active.is_(True))).one()
        old = session.scalars(
            select(Embedding.vector).where(Embedding.model_version_id == base.id).limit(1)
        ).first()
        new = session.scalars(
            select(Embedding.vector).where(Embedding.model_version_id == new_id).limit(1)
        ).first()
    assert embedded == n_crops
    assert build.model_version_id == new_id and build.n_vectors == n_crops
    assert not np.allclose(np.frombuffer(old, "<f4"), np.frombuffer(new, "<f4"))

    # New images analysed from now on are embedded with the promoted model.
    with session_scope(settings) as session:
        session.execute(update(Image).where(Image.id == 1).values(state="downloaded"))
        session.execute(Crop.__table__.delete().where(Crop.image_id == 1))
    from workers.vision import analyze_batch

    analyze_batch([1], settings)
    with session_scope(settings) as session:
        versions = set(
            session.scalars(select(Embedding.model_version_id).join(Crop).where(Crop.image_id == 1))
        )
    assert versions == {new_id}
