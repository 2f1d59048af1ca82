"""Filtered search on real Postgres and a real built index: randomised filters compared with a
brute-force answer computed from the database rows; every refused filter with its status and
message; a filter value that no product has."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from db.schema import Crop, Embedding, Image, Product
from db.session import session_scope
from db.versions import embedder_version_id
from flickd.core.settings import Settings
from flickd.services.api import create_app
from flickd.services.filters import FilterError, make_filter
from flickd.services.search import SearchService
from models.colour import COLOUR_FAMILIES
from models.embedder import Embedder
from models.index.live import CropFilter
from models.query_text import TextQueryEncoder
from tests.models_fixtures import tiny_embedder, tiny_models
from workers.indexing import build_from_database

BRANDS = ["Acme", "Zed", "Lumen", "Orbit", None]
CATEGORIES = ["dresses", "shoes", "jackets", "bags"]
LABELS = ["dress", "shoe", "jacket", "bag", "skirt"]
N_PRODUCTS = 240
QUERIES = ["a red dress", "black shoes", "a navy jacket", "a small bag", "a green skirt"]


def generated_catalog(settings: Settings, embedder: Embedder, seed: int = 0) -> int:
    """Products (some delisted), images (some retired) and crops with varied brand, price,
    stock, colour family and label, and random unit embeddings; returns the version id."""
    rng = np.random.default_rng(seed)
    products, images, crops, embeddings = [], [], [], []
    crop_id = 0
    with session_scope(settings) as session:
        version = embedder_version_id(
            session.connection(), embedder.name_or_dir, embedder.model_version
        )
    for p in range(1, N_PRODUCTS + 1):
        price = None if rng.random() < 0.08 else round(float(rng.uniform(5, 300)), 2)
        stock = [None, True, False][int(rng.integers(0, 3))]
        products.append(
            {
                "id": p,
                "catalog": "shop" if p % 4 else "outlet",
                "external_id": f"p{p}",
                "title": f"Product {p}",
                "brand": BRANDS[int(rng.integers(0, len(BRANDS)))],
                "category": CATEGORIES[int(rng.integers(0, len(CATEGORIES)))],
                "price": price,
                "in_stock": stock,
                "listed": bool(rng.random() > 0.1),
            }
        )
        for i in range(int(rng.integers(1, 3))):
            image_id = p * 10 + i
            retired = rng.random() < 0.1
            images.append(
                {
                    "id": image_id,
                    "product_id": p,
                    "url": f"https://cdn.example.com/{image_id}.jpg",
                    "url_hash": f"{image_id:032d}",
                    "state": "analyzed",
                    "retired_at": _now() if retired else None,
                }
            )
            for c in range(int(rng.integers(1, 3))):
                crop_id += 1
                label = LABELS[int(rng.integers(0, len(LABELS)))]
                colour = COLOUR_FAMILIES[int(rng.integers(0, len(COLOUR_FAMILIES)))]
                crops.append(
                    {
                        "id": crop_id,
                        "image_id": image_id,
                        "crop_index": c,
                        **dict.fromkeys(("x0", "y0", "nx0", "ny0"), 0.0),
                        **dict.fromkeys(("x1", "y1", "nx1", "ny1"), 1.0),
                        "fine_label": label,
                        "coarse_label": "clothing" if label != "bag" else "accessory",
                        "colour_name": colour,
                        "colour_family": colour,
                        "colour_rgb": "#000000",
                        "prompt": f"a photo of a {colour} {label}",
                    }
                )
                vector = rng.standard_normal(embedder.dim).astype(np.float32)
                vector /= np.linalg.norm(vector)
                embeddings.append(
                    {
                        "crop_id": crop_id,
                        "model_version_id": version,
                        "dim": embedder.dim,
                        "vector": vector.astype("<f4").tobytes(),
                    }
                )
    with session_scope(settings) as session:
        for table, rows in (
            (Product, products),
            (Image, images),
            (Crop, crops),
            (Embedding, embeddings),
        ):
            session.execute(insert(table), rows)
    return version


def _now() -> Any:
    from db.schema import utcnow

    return utcnow()


def brute_force(
    settings: Settings, query: np.ndarray, wanted: CropFilter, k: int
) -> list[tuple[str, float]]:
    """Top k (product, best crop score) among served crops inside ``wanted``, from the rows."""
    with session_scope(settings) as session:
        rows = session.execute(
            select(
                Product.external_id,
                Product.catalog,
                Product.brand,
                Product.category,
                Product.price,
                Product.in_stock,
                Product.listed,
                Image.retired_at,
                Crop.fine_label,
                Crop.coarse_label,
                Crop.colour_family,
                Embedding.vector,
            )
            .join(Image, Image.product_id == Product.id)
            .join(Crop, Crop.image_id == Image.id)
            .join(Embedding, Embedding.crop_id == Crop.id)
        ).all()
    best: dict[str, float] = {}

    def eq(a: str | None, b: str) -> bool:
        return a is not None and a.lower() == b.lower()

    for r in rows:
        if not r.listed or r.retired_at is not None:
            continue
        if wanted.catalog and not eq(r.catalog, wanted.catalog):
            continue
        if wanted.brand and not eq(r.brand, wanted.brand):
            continue
        if wanted.colour_family and r.colour_family != wanted.colour_family:
            continue
        if wanted.category and not any(
            eq(v, wanted.category) for v in (r.category, r.fine_label, r.coarse_label)
        ):
            continue
        if wanted.min_price is not None and (r.price is None or r.price < wanted.min_price):
            continue
        if wanted.max_price is not None and (r.price is None or r.price > wanted.max_price):
            continue
        if wanted.in_stock is not None and r.in_stock is not wanted.in_stock:
            continue
        score = float(np.frombuffer(r.vector, "<f4") @ query)
        best[r.external_id] = max(score, best.get(r.external_id, -math.inf))
    return sorted(best.items(), key=lambda item: -item[1])[:k]


def random_filter(rng: np.random.Generator) -> CropFilter:
    def maybe(values: list[Any]) -> Any:
        return values[int(rng.integers(0, len(values)))] if rng.random() < 0.5 else None

    low = float(rng.uniform(0, 200)) if rng.random() < 0.4 else None
    high = (low or 0) + float(rng.uniform(10, 150)) if rng.random() < 0.4 else None
    return make_filter(
        catalog=maybe(["shop", "outlet", "SHOP"]),
        category=maybe([*CATEGORIES, *LABELS, "accessory"]),
        brand=maybe(["Acme", "zed", "Lumen", "Orbit"]),
        colour=maybe(list(COLOUR_FAMILIES)),
        min_price=low,
        max_price=high,
        in_stock=maybe([True, False]),
    )


@pytest.fixture(scope="module")
def catalog_db(pg_url, tmp_path_factory, tiny_models, tiny_embedder) -> Settings:
    from tests.conftest import _truncate_all

    _truncate_all(pg_url)
    settings = Settings(
        database_url=pg_url,
        data_dir=tmp_path_factory.mktemp("filters") / "data",
        embedding_model=str(tiny_models["clip"]),
        detector_model="none",
        device="cpu",
    )
    version = generated_catalog(settings, tiny_embedder)
    build_from_database(settings, version, settings.index_dir)
    return settings


@pytest.fixture(scope="module")
def client(catalog_db: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(catalog_db)) as test_client:
        yield test_client


def test_random_filters_never_leak_and_match_brute_force(catalog_db, tiny_embedder):
    service = SearchService(catalog_db)
    queries = TextQueryEncoder(tiny_embedder, catalog_db.query_text_precision)  # as the service
    rng = np.random.default_rng(7)
    checked_short = checked_full = 0
    for i in range(40):
        wanted = random_filter(rng) if i else CropFilter()
        text = QUERIES[i % len(QUERIES)]
        k = int(rng.choice([3, 10, 25]))
        hits = service.search_text(text, k, wanted).items[0].results
        query = queries.embed([text])[0]
        expected = brute_force(catalog_db, query, wanted, k)
        assert [h.product_id for h in hits] == [pid for pid, _ in expected], wanted
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-4)
        checked_short += len(expected) < k
        checked_full += len(expected) == k
    # both kinds happened: filters that keep fewer than k products, and ones that keep more
    assert checked_short and checked_full


def test_a_very_selective_filter_still_returns_k_results(catalog_db, tiny_embedder):
    # the narrowest combination that still holds at least 3 products
    service = SearchService(catalog_db)
    query = TextQueryEncoder(tiny_embedder, catalog_db.query_text_precision).embed(["a dress"])[0]
    for brand, colour in [(b, c) for b in BRANDS if b for c in COLOUR_FAMILIES]:
        wanted = make_filter(brand=brand, colour=colour, in_stock=True)
        expected = brute_force(catalog_db, query, wanted, 50)
        if 3 <= len(expected) <= 6:
            break
    else:
        pytest.fail("the generated catalog has no narrow filter of 3-6 products")
    hits = service.search_text("a dress", len(expected), wanted).items[0].results
    assert [h.product_id for h in hits] == [pid for pid, _ in expected]


def test_filters_through_the_api(client):
    response = client.get(
        "/search",
        params={"q": "a red dress", "k": 20, "colour": "Red", "max_price": 100, "in_stock": True},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filters"] == {"colour": "red", "max_price": 100.0, "in_stock": True}
    hits = body["items"][0]["results"]
    assert hits and all(
        h["colour_family"] == "red" and h["price"] <= 100 and h["in_stock"] is True for h in hits
    )
    facets = client.get("/search/filters").json()
    assert set(facets["colour_families"]) == set(COLOUR_FAMILIES)
    assert {"acme", "zed"} <= set(facets["brands"]) and "dress" in facets["categories"]


@pytest.mark.parametrize(
    ("params", "reason", "words"),
    [
        ({"colour": "pumpkin"}, "unknown_colour", ["'pumpkin'", *COLOUR_FAMILIES]),
        ({"min_price": 80, "max_price": 20}, "bad_price_range", ["min_price (80)", "above"]),
        ({"min_price": -5}, "bad_price_range", ["min_price", "0 or more"]),
        ({"max_price": "nan"}, "bad_price_range", ["max_price"]),
    ],
)
def test_refused_filters_say_why(client, params, reason, words):
    for route in ("text", "image"):
        if route == "text":
            response = client.get("/search", params={"q": "a dress", **params})
        else:
            response = client.post(
                "/search/image", params=params, files={"file": ("q.jpg", b"x", "image/jpeg")}
            )
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["reason"] == reason
        assert all(word in body["detail"] for word in words), body["detail"]
    # nothing else changed: the service still answers
    assert client.get("/search", params={"q": "a dress"}).status_code == 200


def test_a_filter_value_no_product_has_matches_nothing_and_says_so(client):
    response = client.get("/search", params={"q": "a dress", "brand": "Nonexistent Ltd"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["items"][0]["results"] == []
    assert body["notes"] == ["no indexed product has brand 'Nonexistent Ltd'"]
    response = client.get("/search", params={"q": "a dress", "category": "spacesuit"})
    assert response.json()["items"][0]["results"] == []
    assert response.json()["notes"] == ["no indexed product has category 'spacesuit'"]


def test_make_filter_checks_alone():
    with pytest.raises(FilterError, match="use one of: black, white"):
        make_filter(colour="olive drab")
    assert make_filter(colour=" NAVY ").colour_family == "navy"
    assert make_filter(min_price=10, max_price=10).max_price == 10


def test_cli_filters(catalog_db):
    from tests.conftest import run_flickd, settings_env

    env = settings_env(catalog_db)
    out = run_flickd("search", "--text", "a dress", "--colour", "pumpkin", env=env, expect_ok=False)
    assert out.returncode == 2 and "use one of: black, white" in out.stderr
    out = run_flickd(
        "search",
        "--text",
        "a dress",
        "--min-price",
        "9",
        "--max-price",
        "1",
        env=env,
        expect_ok=False,
    )
    assert out.returncode == 2 and "min_price (9) is above max_price (1)" in out.stderr
    out = run_flickd(
        "search",
        "--text",
        "a dress",
        "--brand",
        "acme",
        "--max-price",
        "150",
        "--in-stock",
        "--json",
        env=env,
    )
    body = json.loads(out.stdout)
    hits = body["items"][0]["results"]
    assert body["filters"] == {"brand": "acme", "max_price": 150.0, "in_stock": True}
    assert hits and all(
        h["brand"] == "Acme" and h["price"] <= 150 and h["in_stock"] is True for h in hits
    )
