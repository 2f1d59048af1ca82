"""The live layer over a built index (pure: no database): delta, tombstones, filters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.index import VectorIndex
from models.index.live import STOCK_IN, STOCK_OUT, STOCK_UNKNOWN, CropFacts, CropFilter, LiveIndex
from tests.test_index import chunked, clustered, near

BRANDS = ["Acme", "Zed", "Lumen", None]
COLOURS = ["red", "navy", "black", "multicolour"]
LABELS = ["dress", "shoe", "jacket", "bag"]


def facts_for(ids: np.ndarray, seed: int) -> CropFacts:
    rng = np.random.default_rng(seed)
    n = len(ids)
    price = rng.uniform(5, 200, n)
    price[rng.random(n) < 0.1] = math.nan
    return CropFacts(
        crop_ids=ids.astype(np.int64),
        product_ids=(ids // 2).astype(np.int64),
        catalog=[("shop" if i % 3 else "outlet") for i in ids.tolist()],
        brand=[BRANDS[i] for i in rng.integers(0, len(BRANDS), n).tolist()],
        category=[LABELS[i] + "s" for i in rng.integers(0, len(LABELS), n).tolist()],
        fine_label=[LABELS[i] for i in rng.integers(0, len(LABELS), n).tolist()],
        coarse_label=["clothing"] * n,
        colour_family=[COLOURS[i] for i in rng.integers(0, len(COLOURS), n).tolist()],
        price=price,
        in_stock=rng.choice([STOCK_IN, STOCK_OUT, STOCK_UNKNOWN], n).astype(np.int8),
        served=np.ones(n, bool),
    )


def brute_mask(facts: CropFacts, f: CropFilter) -> np.ndarray:
    ok = facts.served.copy()
    for i in range(len(facts)):
        if f.brand is not None and (facts.brand[i] or "").lower() != f.brand.lower():
            ok[i] = False
        if f.colour_family is not None and facts.colour_family[i] != f.colour_family:
            ok[i] = False
        if f.category is not None and f.category not in (
            facts.category[i],
            facts.fine_label[i],
            facts.coarse_label[i],
        ):
            ok[i] = False
        p = facts.price[i]
        if f.min_price is not None and not p >= f.min_price:
            ok[i] = False
        if f.max_price is not None and not p <= f.max_price:
            ok[i] = False
        if f.in_stock is not None and facts.in_stock[i] != (STOCK_IN if f.in_stock else STOCK_OUT):
            ok[i] = False
    return ok


@pytest.fixture(scope="module", params=["flat", "ivf"])
def built(request) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    n, dim = (3000, 32) if request.param == "flat" else (30_000, 32)
    x = clustered(n, dim, seed=3)
    ids = np.arange(n, dtype=np.int64) * 3 + 10
    index = VectorIndex.build(chunked(ids, x, 4096), dim, flat_max=20_000 if n < 20_000 else 1)
    return index, ids, x


def test_filtered_search_is_complete_and_never_leaks(built) -> None:
    index, ids, x = built
    live = LiveIndex(index)
    facts = facts_for(ids, seed=1)
    assert not len(live.update(facts))
    queries = near(x[:20], seed=2)
    filters = [
        CropFilter(brand="acme"),
        CropFilter(colour_family="navy", max_price=60),
        CropFilter(category="shoe", brand="Zed", in_stock=True, min_price=20, max_price=90),
        CropFilter(category="bags", colour_family="red", in_stock=False, max_price=12),
    ]
    for f in filters:
        ok = brute_mask(facts, f)
        allowed = live.mask(f).rows
        np.testing.assert_array_equal(allowed & live._served[: live.n_rows], ok)
        scores, found = live.search(queries, 10, allowed)
        valid = found >= 0
        assert set(found[valid].tolist()) <= set(ids[ok].tolist())  # never leaks
        assert (valid.sum(axis=1) == min(10, int(ok.sum()))).all()  # k results when k exist
        exact = (queries @ x[ok].T).max(axis=1)
        np.testing.assert_allclose(scores[:, 0], exact, atol=0.02)


def test_tombstones_leave_and_delta_arrives(built) -> None:
    index, ids, x = built
    live = LiveIndex(index)
    facts = facts_for(ids, seed=4)
    live.update(facts)
    target = x[7:8]
    _, found = live.search(target, 1)
    assert found[0, 0] == ids[7]
    gone = facts.take(np.array([7]))
    gone.served[:] = False  # delisted
    live.update(gone)
    _, found = live.search(target, 5)
    assert ids[7] not in found[0].tolist()
    # a new crop identical to the query arrives in the delta and wins
    new = facts_for(np.array([10**9]), seed=5)
    assert live.add(new, target) == 1
    scores, found = live.search(target, 3)
    assert found[0, 0] == 10**9 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert live.add(new, target) == 0  # once only
    assert live.n_delta == 1 and live.ntotal == len(ids)  # one left, one came
    # and a delta crop can be tombstoned too, and filtered
    assert live.search(target, 3, live.mask(CropFilter(brand="nobody")).rows)[1][0, 0] == -1
    assert live.mask(CropFilter(brand="nobody")).unknown == {"brand": "nobody"}
    new.served[:] = False
    live.update(new)
    assert 10**9 not in live.search(target, 3)[1][0].tolist()


def test_facts_with_a_column_all_missing(built) -> None:
    index, ids, _ = built
    live = LiveIndex(index)
    facts = facts_for(ids, seed=9)
    facts.brand = [None] * len(ids)  # a feed without brands
    facts.colour_family = [None] * len(ids)  # crops analysed before colour families
    live.update(facts)
    assert live.ntotal == len(ids)
    assert live.mask(CropFilter(brand="acme")).rows.sum() == 0
    assert live.mask(CropFilter(colour_family="red")).unknown == {"colour": "red"}
    assert live.facets()["brands"] == []
