"""Vision stage end to end with the tiny offline models: real detector and CLIP forward passes,
real workers on the ``download`` and ``gpu`` queues, Postgres and Redis; SQLite in-process too."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sqlalchemy import func, select, update

from db.schema import Crop, Embedding, Image, ModelVersion
from db.session import session_scope
from flickd.core.broker import queue_lengths
from models.colour import COLOUR_FAMILIES, MULTICOLOUR, family_of, srgb_to_lab
from models.labels import label_by_name
from producer.ingest import ingest
from synthetic.catalog import write_feed
from tests.conftest import catalog_fixture, celery_worker, wait_for_run
from tests.models_fixtures import tiny_models
from workers.vision import analyze_batch, halving_on_oom

catalog = catalog_fixture(10, seed=5)


def _vision(settings, tiny_models, detector: bool = True):
    return settings.model_copy(
        update={
            "last_stage": "analyze",
            "detector_model": str(tiny_models["detector"]) if detector else "none",
            "embedding_model": str(tiny_models["clip"]),
            "device": "cpu",
            "analyze_batch_size": 4,
        }
    )


def _rows(settings):
    with session_scope(settings) as session:
        images = {i.id: i for i in session.scalars(select(Image))}
        crops = list(session.scalars(select(Crop).order_by(Crop.image_id, Crop.crop_index)))
        embeddings = list(session.scalars(select(Embedding)))
        versions = list(session.scalars(select(ModelVersion)))
    return images, crops, embeddings, versions


def _check_analysis(settings, catalog) -> None:
    images, crops, embeddings, versions = _rows(settings)
    assert {i.state for i in images.values()} == {"analyzed"}
    assert {c.image_id for c in crops} == set(images)  # every image has at least one crop
    assert len(embeddings) == len(crops)
    (version,) = versions
    assert version.active and version.kind == "embedder"
    for crop in crops:
        image = images[crop.image_id]
        assert 0 <= crop.x0 < crop.x1 <= image.width and 0 <= crop.y0 < crop.y1 <= image.height
        assert 0 <= crop.nx0 < crop.nx1 <= 1 and 0 <= crop.ny0 < crop.ny1 <= 1
        if crop.fine_label:
            assert label_by_name(crop.fine_label).kept  # never a garment part
            assert crop.coarse_label
        assert crop.prompt and crop.colour_name and crop.colour_rgb.startswith("#")
        # The family is the fine name's (or multicolour) and is the word the prompt uses.
        assert crop.colour_family in COLOUR_FAMILIES, crop.colour_family
        assert crop.colour_family in (MULTICOLOUR, family_of(crop.colour_name)), crop
        assert f" {crop.colour_family} " in f" {crop.prompt} ", crop.prompt
        assert " a shoes" not in crop.prompt and " a pants" not in crop.prompt
    dims = {e.dim for e in embeddings}
    assert len(dims) == 1
    vectors = np.stack([np.frombuffer(e.vector, "<f4") for e in embeddings])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_whole_image_fallback_names_the_garment_colour(
    embedded_settings, tiny_models, catalog, server, tmp_path
):
    """Detection off: each image is one whole-image crop labelled from the feed category, and
    its colour is the garment's (the synthetic catalog knows the truth)."""
    settings = _vision(embedded_settings, tiny_models, detector=False)
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    assert ingest(feed, settings).status == "done"
    _check_analysis(settings, catalog)
    images, crops, _, _ = _rows(settings)
    truth = {img.filename: img for img in catalog.images}
    close = same_family = 0
    for crop in crops:
        assert crop.whole_image and crop.crop_index == 0
        expected = truth[images[crop.image_id].url.rsplit("/", 1)[1]]
        assert crop.fine_label is not None, expected.category  # from the feed's category
        got = tuple(int(crop.colour_rgb[i : i + 2], 16) for i in (1, 3, 5))
        distance = np.linalg.norm(srgb_to_lab(np.array(got)) - srgb_to_lab(np.array(expected.rgb)))
        close += distance < 15
        same_family += crop.colour_family == expected.colour_family
    assert close >= 0.9 * len(crops), f"only {close}/{len(crops)} crops near the garment colour"
    assert same_family >= 0.9 * len(crops), f"only {same_family}/{len(crops)} in their family"


def test_redelivered_batch_writes_nothing_twice(
    embedded_settings, tiny_models, catalog, server, tmp_path
):
    settings = _vision(embedded_settings, tiny_models)
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    assert ingest(feed, settings).status == "done"
    _check_analysis(settings, catalog)
    images, crops, embeddings, _ = _rows(settings)
    assert any(not c.whole_image for c in crops)  # the detector's own boxes were used
    before = [(c.image_id, c.crop_index, c.prompt, c.colour_name) for c in crops]
    # A worker died after the commit, or the message came twice: same batch again, even with
    # the images put back to "downloaded".
    with session_scope(settings) as session:
        session.execute(update(Image).values(state="downloaded"))
    report = analyze_batch(sorted(images), settings)
    assert report.analyzed == len(images)
    images2, crops2, embeddings2, _ = _rows(settings)
    assert [(c.image_id, c.crop_index, c.prompt, c.colour_name) for c in crops2] == before
    assert len(embeddings2) == len(embeddings)
    assert {i.state for i in images2.values()} == {"analyzed"}


def test_halving_on_oom_splits_the_batch():
    calls: list[int] = []

    def fn(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch_oom()
        return list(batch)

    assert halving_on_oom(fn, list(range(7)), 8) == list(range(7))
    assert calls[:3] == [7, 4, 2]


def torch_oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory (simulated by the test's function)")


@pytest.mark.services
def test_gpu_worker_end_to_end_with_one_bad_image(
    pg_settings, tiny_models, catalog, server, tmp_path
):
    settings = _vision(pg_settings, tiny_models)
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    with celery_worker(settings, queues="download", concurrency=1):
        summary = ingest(feed, settings)
        # Wait until every download task has finished *and been acknowledged*: a task commits
        # its images, then hands them on, then is acknowledged. Stopping the worker between the
        # commit and the hand-off (what "no image queued" alone allowed, under load) would
        # strand the last batch, and this test runs no reconciler to bring it back.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with session_scope(settings) as session:
                queued = session.scalar(
                    select(func.count()).select_from(Image).where(Image.state == "queued")
                )
            lengths, in_flight = queue_lengths(settings)
            if queued == 0 and lengths["download"] == 0 and in_flight == 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"downloads unfinished: {queued} queued, {in_flight} in flight")
    # Before the GPU worker starts, damage one stored image: it must fail alone.
    with session_scope(settings) as session:
        victim = session.scalars(select(Image).order_by(Image.id)).first()
        victim_id = victim.id
        session.execute(update(Image).where(Image.id == victim_id).values(blob_key="0" * 64))
    with celery_worker(settings, queues="gpu", concurrency=1):
        assert wait_for_run(settings, summary.run_id, timeout=120) == "done"
    images, crops, embeddings, _ = _rows(settings)
    assert images[victim_id].state == "failed"
    assert images[victim_id].failure_reason == "corrupt_image"
    others = [i for i in images.values() if i.id != victim_id]
    assert {i.state for i in others} == {"analyzed"}
    assert {c.image_id for c in crops} == {i.id for i in others}
    assert len(embeddings) == len(crops)


def test_cli_build_models_ingest_and_show(catalog, server, tmp_path):
    """The whole flow from the command line on the embedded default: build offline models,
    ingest, then `flickd show` a product's crops."""
    import json

    from flickd.core.settings import Settings
    from tests.conftest import run_flickd, settings_env

    env = settings_env(Settings(data_dir=tmp_path / "data", allowed_networks=["127.0.0.0/8"]))

    def flickd(*args: str) -> str:
        return run_flickd(*args, env=env).stdout

    printed = flickd("models", "build", str(tmp_path / "models"), "--size", "tiny")
    for line in printed.splitlines():
        key, value = line.split("=", 1)
        env[key] = value
    feed = tmp_path / "feed.csv"
    write_feed(catalog, feed, server.base_url)
    result = json.loads(flickd("ingest", str(feed), "--json"))
    assert result["status"] == "done"
    assert result["images_by_state"] == {"analyzed": len(catalog.images)}
    product = catalog.products[0]
    shown = json.loads(flickd("show", product.product_id, "--json"))
    assert shown["title"] == product.title
    assert len(shown["images"]) == len(product.images)
    assert all(image["crops"] for image in shown["images"])
    text = flickd("show", product.product_id)
    assert shown["images"][0]["crops"][0]["prompt"] in text
