"""Search API end to end: a catalog analysed by the real pipeline with the tiny offline models,
a real FAISS index, and the FastAPI app driven through TestClient."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from db.migrate import upgrade
from db.schema import Crop, Embedding, ModelVersion
from db.schema import Image as ImageRow
from db.session import session_scope
from flickd.core.settings import Settings
from flickd.services.api import create_app
from flickd.services.search import MatchType, SearchService, match_type
from models import registry
from models.embedder import Embedder
from models.query_text import TextQueryEncoder
from producer.ingest import ingest
from synthetic import faults
from synthetic.catalog import Catalog, write_feed
from synthetic.server import CatalogServer
from tests.conftest import FAST_DOWNLOADS, catalog_fixture
from tests.models_fixtures import tiny_models
from workers.indexing import build_from_database


# --- building an analysed, indexed catalog (also used by test_web_page) ------------------------
def vision_settings(data_dir: Path, tiny_models: dict[str, Path], detector: bool) -> Settings:
    settings = Settings(
        data_dir=data_dir,
        allowed_networks=["127.0.0.0/8"],
        **{**FAST_DOWNLOADS, "last_stage": "analyze"},
        detector_model=str(tiny_models["detector"]) if detector else "none",
        embedding_model=str(tiny_models["clip"]),
        device="cpu",
        analyze_batch_size=4,
    )
    upgrade(settings)
    return settings


def ingest_products(settings: Settings, catalog: Catalog, server: CatalogServer, n: int) -> None:
    """Run the real pipeline (download, detect, crop, colour, prompt, embed) on the first n
    products of ``catalog``."""
    subset = dataclasses.replace(catalog, products=catalog.products[:n])
    feed = write_feed(subset, settings.data_dir / f"feed-{n}.csv", server.base_url)
    assert ingest(feed, settings).status == "done"


def active_version_id(settings: Settings) -> int:
    with session_scope(settings) as session:
        return session.scalars(
            select(ModelVersion.id).where(ModelVersion.kind == "embedder", ModelVersion.active)
        ).one()


def build_index(settings: Settings) -> None:
    build_from_database(settings, active_version_id(settings), settings.index_dir)


def stored_vectors(settings: Settings) -> dict[int, tuple[str, np.ndarray]]:
    """crop id -> (product id, embedding) as stored by the vision stage."""
    from db.schema import Product

    with session_scope(settings) as session:
        rows = session.execute(
            select(Crop.id, Product.external_id, Embedding.vector)
            .join(Embedding, Embedding.crop_id == Crop.id)
            .join(ImageRow, ImageRow.id == Crop.image_id)
            .join(Product, Product.id == ImageRow.product_id)
        ).all()
    return {r.id: (r.external_id, np.frombuffer(r.vector, "<f4")) for r in rows}


# --- fixtures ----------------------------------------------------------------------------------
catalog = catalog_fixture(10, seed=11)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_models, catalog, server) -> Settings:
    """The whole catalog analysed with the tiny detector on, and indexed."""
    settings = vision_settings(tmp_path_factory.mktemp("indexed") / "data", tiny_models, True)
    ingest_products(settings, catalog, server, len(catalog.products))
    build_index(settings)
    return settings


@pytest.fixture(scope="module")
def client(indexed: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(indexed)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def embedder(tiny_models) -> Embedder:
    return Embedder(tiny_models["clip"], device="cpu")


def _upload(client: TestClient, data: bytes, content_type: str = "image/jpeg", **params):
    files = {"file": ("query.jpg", data, content_type)}
    return client.post("/search/image", files=files, params=params)


def _products_of(catalog: Catalog) -> dict[str, str]:
    """image filename -> product id"""
    return {img.filename: p.product_id for p in catalog.products for img in p.images}


# --- text search -------------------------------------------------------------------------------
def test_text_search_scores_are_cosines_grouped_by_product(client, indexed, embedder):
    k = 5
    response = client.get("/search", params={"q": "a red dress", "k": k})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "text" and len(body["items"]) == 1
    hits = body["items"][0]["results"]
    assert len(hits) == k
    stored = stored_vectors(indexed)
    assert body["index_vectors"] == len(stored)
    # The API embeds query texts as models/query_text.py does (int8 on this CPU).
    query = TextQueryEncoder(embedder, indexed.query_text_precision).embed(["a red dress"])[0]
    # Brute force over every stored vector: best crop per product, products by that score.
    best: dict[str, tuple[float, int]] = {}
    for crop_id, (product_id, vector) in stored.items():
        score = float(vector @ query)
        if product_id not in best or score > best[product_id][0]:
            best[product_id] = (score, crop_id)
    expected = sorted(best.items(), key=lambda item: -item[1][0])[:k]
    assert [h["product_id"] for h in hits] == [product_id for product_id, _ in expected]
    assert [h["crop_id"] for h in hits] == [crop_id for _, (_, crop_id) in expected]
    np.testing.assert_allclose(
        [h["score"] for h in hits], [score for _, (score, _) in expected], atol=1e-5
    )
    for hit in hits:
        assert -1.0 <= hit["score"] <= 1.0
        assert hit["match"] == match_type(hit["score"], 0.9, 0.75).value
        assert hit["thumbnail_url"] == f"/crops/{hit['crop_id']}.jpg"
        assert hit["title"] and hit["prompt"] and hit["colour"]
        assert hit["image_url"].startswith("http://127.0.0.1:")


def test_match_types_follow_configured_thresholds(indexed):
    scores = [h.score for h in SearchService(indexed).search_text("a jacket", 8).items[0].results]
    assert len(set(scores)) == len(scores) == 8  # distinct, so the thresholds below are exact
    # Thresholds placed on returned scores: inclusive, so hits 0-1 exact, 2-4 similar.
    settings = indexed.model_copy(update={"match_exact": scores[1], "match_similar": scores[4]})
    hits = SearchService(settings).search_text("a jacket", 8).items[0].results
    assert [h.match for h in hits] == [MatchType.EXACT] * 2 + [MatchType.SIMILAR] * 3 + [
        MatchType.WEAK
    ] * 3


def test_match_type_boundaries():
    assert match_type(0.9, 0.9, 0.75) is MatchType.EXACT
    assert match_type(0.8999, 0.9, 0.75) is MatchType.SIMILAR
    assert match_type(0.75, 0.9, 0.75) is MatchType.SIMILAR
    assert match_type(0.7499, 0.9, 0.75) is MatchType.WEAK
    assert match_type(-1.0, 0.9, 0.75) is MatchType.WEAK
    with pytest.raises(ValueError, match="match_similar"):
        Settings(match_exact=0.7, match_similar=0.8)


def test_blank_or_missing_text_is_refused(client):
    assert client.get("/search", params={"q": "   "}).status_code == 422
    assert client.get("/search").status_code == 422
    assert client.get("/search", params={"q": "x", "k": 0}).status_code == 422


# --- image search ------------------------------------------------------------------------------
def test_uploaded_catalog_image_finds_its_own_product_exactly(client, catalog):
    image = catalog.images[3]
    data = catalog.image_path(image).read_bytes()
    response = _upload(client, data, k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "image" and body["items"]
    detected = [item for item in body["items"] if not item["whole_image"]]
    assert detected, "the tiny detector found nothing in a catalog image"
    for item in body["items"]:
        top = item["results"][0]
        # The same pixels, detected and cropped the same way, embed to the stored vector.
        assert top["product_id"] == image.product_id
        assert top["match"] == "exact" and top["score"] > 0.99
        assert [h["product_id"] for h in item["results"]].count(image.product_id) == 1


def test_image_url_search_goes_through_the_fetcher(client, catalog, server):
    image = catalog.images[0]
    response = client.post(
        "/search/url", json={"url": server.image_url(image.filename), "k": 2, "detect": False}
    )
    assert response.status_code == 200, response.text
    (item,) = response.json()["items"]  # no detection: one whole-image item
    assert item["whole_image"] and len(item["results"]) == 2
    assert server.hits(f"/images/{image.filename}") >= 1


@pytest.mark.parametrize(
    ("url", "status", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", 400, "blocked_address"),
        ("http://10.1.2.3/dress.jpg", 400, "blocked_address"),
        ("ftp://example.com/dress.jpg", 400, "invalid_url"),
    ],
)
def test_url_search_refuses_private_and_odd_urls(client, url, status, reason):
    response = client.post("/search/url", json={"url": url})
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason
    assert response.json()["detail"]


def test_url_search_reports_what_the_url_served(client, server):
    html = client.post("/search/url", json={"url": server.url("/fault/html-as-jpeg")})
    assert (html.status_code, html.json()["reason"]) == (415, "not_an_image")
    missing = client.post("/search/url", json={"url": server.url("/fault/404")})
    assert (missing.status_code, missing.json()["reason"]) == (502, "http_error")


def test_bad_uploads_get_clear_client_errors(indexed):
    settings = indexed.model_copy(update={"max_upload_bytes": 40_000})
    with TestClient(create_app(settings)) as small:
        big = _noise_jpeg(210, 210)
        assert 40_000 < len(big) < 40_000 + 64 * 1024  # past the limit, within the body slack
        cases = [
            (_upload(small, big), 413, "too_large"),
            (_upload(small, b"\xff" * 200_000), 413, "too_large"),  # refused by body size
            (_upload(small, faults.pdf_document(), "application/pdf"), 415, None),
            (_upload(small, faults.pdf_document()), 415, "unsupported_format"),
            (_upload(small, faults.html_page(), "text/html"), 415, "unsupported_media_type"),
            (_upload(small, faults.html_page()), 415, "not_an_image"),
            (_upload(small, faults.truncated_jpeg()), 422, "corrupt_image"),
            (_upload(small, b""), 422, "empty_image"),
        ]
        for response, status, reason in cases:
            assert response.status_code == status, response.text
            body = response.json()
            assert body["detail"], body
            if reason:
                assert body["reason"] == reason, body
        no_file = small.post("/search/image", data={"k": "3"})
        assert no_file.status_code == 422


def _noise_jpeg(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# --- catalog routes and health -----------------------------------------------------------------
def test_product_and_crop_routes(client, catalog):
    product = catalog.products[2]
    response = client.get(f"/products/{product.product_id}")
    assert response.status_code == 200
    details = response.json()
    assert details["title"] == product.title
    crop = details["images"][0]["crops"][0]
    thumb = client.get(f"/crops/{crop['crop_id']}.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    x0, y0, x1, y1 = crop["box"]  # crop_image rounds the box outwards
    expected_size = (math.ceil(x1) - math.floor(x0), math.ceil(y1) - math.floor(y0))
    assert Image.open(io.BytesIO(thumb.content)).size == expected_size
    assert client.get("/products/no-such-product").status_code == 404
    assert client.get("/crops/987654.jpg").status_code == 404
    assert client.get("/crops/abc.jpg").status_code == 422


def test_health_reports_database_index_and_model(client, indexed):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["database"]["ok"]
    assert body["index"]["vectors"] == len(stored_vectors(indexed))
    assert body["index"]["model_version_id"] == active_version_id(indexed)


def test_no_index_yet_is_503_with_a_clear_message(tmp_path, tiny_models):
    settings = vision_settings(tmp_path / "data", tiny_models, detector=False)
    with TestClient(create_app(settings)) as fresh:
        health = fresh.get("/health")
        assert health.status_code == 503 and health.json()["index"]["loaded"] is False
        search = fresh.get("/search", params={"q": "dress"})
        assert search.status_code == 503
        assert "no search index" in search.json()["detail"]


def test_web_page_and_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200
    assert "/search/image" in client.get("/openapi.json").json()["paths"]


# --- index hot swap ----------------------------------------------------------------------------
def test_rebuilt_index_is_picked_up_while_serving(tmp_path, tiny_models, catalog, server):
    settings = vision_settings(tmp_path / "data", tiny_models, detector=False)
    ingest_products(settings, catalog, server, 4)
    build_index(settings)
    before = len(stored_vectors(settings))
    new_products = {p.product_id for p in catalog.products[4:]}
    with TestClient(create_app(settings)) as live:
        assert live.get("/health").json()["index"]["vectors"] == before
        statuses: list[int] = []
        sizes: set[int] = set()
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                response = live.get("/search", params={"q": "a shirt", "k": 3})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    sizes.add(response.json()["index_vectors"])

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        try:
            ingest_products(settings, catalog, server, len(catalog.products))
            build_index(settings)
            after = len(stored_vectors(settings))
            assert after > before
            deadline = time.monotonic() + 30
            while after not in sizes and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            thread.join(timeout=30)
        assert statuses and set(statuses) == {200}
        assert sizes == {before, after}
        # A later request, same app, no restart: the new products are searchable.
        response = live.get("/search", params={"q": "a shirt", "k": 10})
        found = {h["product_id"] for h in response.json()["items"][0]["results"]}
        assert found & new_products


# --- command line ------------------------------------------------------------------------------
def test_cli_search_by_text_and_image(indexed, catalog, monkeypatch):
    from click.testing import CliRunner

    from flickd.cli import main
    from flickd.core.settings import reset_settings
    from synthetic.procs import settings_env

    quiet = indexed.model_copy(update={"log_level": "WARNING"})  # stdout: the results only
    env = {k: v for k, v in settings_env(quiet).items() if k.startswith("FLICKD_")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    runner = CliRunner()
    text = runner.invoke(main, ["search", "--text", "a red dress", "--top-k", "3", "--json"])
    assert text.exit_code == 0, text.output
    expected = SearchService(indexed).search_text("a red dress", 3)
    got = json.loads(text.stdout)
    assert [h["product_id"] for h in got["items"][0]["results"]] == [
        h.product_id for h in expected.items[0].results
    ]
    image = catalog.images[1]
    plain = runner.invoke(main, ["search", "--image", str(catalog.image_path(image)), "-k", "2"])
    assert plain.exit_code == 0, plain.output
    assert image.product_id in plain.output and "exact" in plain.output
    both = runner.invoke(main, ["search", "--text", "x", "--image", "y"])
    assert both.exit_code != 0 and "exactly one" in both.output


@pytest.mark.parametrize("precision", ["float", "bfloat16"])
def test_concurrent_text_queries_share_a_forward_pass_and_repeat_from_the_cache(indexed, precision):
    texts = ["a red dress", "a navy jacket", "black shoes", "a white top", "a beige skirt"]
    alone = indexed.model_copy(update={"query_text_precision": precision})
    one_by_one = {t: SearchService(alone).search_text(t, 5) for t in texts}
    settings = alone.model_copy(
        update={"search_batch_window_ms": 30_000, "search_max_batch": len(texts)}
    )
    service = SearchService(settings)
    # The search stage waits for the rest of a model batch far shorter than the model stage
    # (SEARCH_GATHER_SECONDS); given the same long wait, all five reach it as one batch.
    service._searches.window = settings.search_batch_window_ms / 1000
    # The pool starts its threads one by one, and a query alone in flight is answered at once
    # (no window for a lone client): held here, one more query in flight keeps every batcher
    # waiting until its batch is full, however the threads are scheduled.
    with service._in_flight, ThreadPoolExecutor(len(texts)) as pool:
        batched = dict(
            zip(texts, pool.map(lambda t: service.search_text(t, 5), texts), strict=True)
        )
    assert (service._texts.batches, service._texts.items) == (1, len(texts))
    # The hits' rows were read and searched as one batch too.
    assert (service._searches.batches, service._searches.items) == (1, len(texts))
    for text in texts:  # padding to the longest text in the batch changes no answer
        want, got = one_by_one[text].items[0].results, batched[text].items[0].results
        assert [h.crop_id for h in got] == [h.crop_id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    again = service.search_text("a navy jacket", 5)  # answered without a model call
    assert service._texts.batches == 1 and service._text_cache.hits == 1
    assert again.items[0].results == batched["a navy jacket"].items[0].results


def test_concurrent_image_queries_share_one_analysis(indexed, catalog):
    images = [Image.open(catalog.image_path(catalog.images[i])).convert("RGB") for i in range(3)]
    one_by_one = [SearchService(indexed).search_image(image, 3) for image in images]
    settings = indexed.model_copy(update={"search_batch_window_ms": 30_000, "search_max_batch": 3})
    service = SearchService(settings)
    with service._in_flight, ThreadPoolExecutor(3) as pool:  # as above: the batch fills
        batched = list(pool.map(lambda image: service.search_image(image, 3), images))
    assert (service._images.batches, service._images.items) == (1, 3)
    for want, got in zip(one_by_one, batched, strict=True):
        assert [i.label for i in got.items] == [i.label for i in want.items]
        assert [[h.crop_id for h in i.results] for i in got.items] == [
            [h.crop_id for h in i.results] for i in want.items
        ]


def test_warm_up_makes_the_query_text_encoder_before_the_first_query(indexed):
    settings = indexed.model_copy(update={"query_text_precision": "bfloat16"})
    # The encoder is cached per process beside its embedder (models/registry.py): start clean.
    key = ("query-text-bfloat16", settings.embedding_model, "cpu")
    registry._cache.pop(key, None)
    service = SearchService(settings)
    service.warm_up()
    encoder = registry._cache[key]
    assert encoder.precision == "bfloat16"
    assert service.search_text("a red dress", 3).items[0].results
    assert registry._cache[key] is encoder  # the first query used it, made nothing new
