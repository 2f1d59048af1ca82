"""The served index as the catalog is now: an immutable ``VectorIndex`` (the base) plus what
happened since it was built, and the filter facts of every crop in either.

* **Delta.** Vectors newer than the base (a crop analysed after the build) are appended to a
  small exact store and searched by brute force beside the base; a rebuild folds them in.
* **Tombstones.** A crop whose product is delisted, or whose image is retired, stays in the
  base's lists but is *not served*: every search excludes it through a FAISS id selector, so
  it can never take a result slot. Relisting flips it back. Nothing is ever removed from
  FAISS structures (the base is shared, read-only, by concurrent queries).
* **Facts.** One row per crop (base positions first, in the base's order, then delta rows),
  held as numpy columns: product, catalog, brand, category, fine and coarse label, colour
  family (strings dictionary-encoded, lower-cased), price, stock, served. A filter is a
  vectorised mask over them.

Filtered search (``search(..., allowed=mask)``) uses FAISS id selectors, not over-fetch:
over-fetching by 1/share costs k/share candidates for a selective filter (0.1% of a 1M catalog:
10,000x) and still cannot promise k results, while a selector makes FAISS skip every crop
outside the filter while it scans. A bitmap selector over base positions is one bit per
vector (125 KB at 1M) and one bit test per scanned code. The IVF probes ``nprobe / share``
lists (the lists a filtered query needs grow as its neighbours thin out), capped at ``nlist``:
a very selective filter (share <= nprobe/nlist) thus scans every list, which is an exact scan
over the allowed vectors' codes, complete by construction. When a partial probe still finds
fewer than k crops while k exist, the search is repeated over every list, so a filter returns
k results whenever k crops pass it.

This module is pure: facts come in as arrays (``CropFacts``), the caller reads them from the
database (``db/serving.py``) and decides when (``flickd/services/freshness.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import pandas as pd

from models.index.build import normalised
from models.index.vector_index import VectorIndex

NONE = -1  # code of a missing string
STOCK_UNKNOWN, STOCK_OUT, STOCK_IN = -1, 0, 1


def word(value: str | None) -> str | None:
    """How strings are compared by a filter: trimmed, case-folded; blank is missing."""
    if value is None:
        return None
    value = " ".join(value.split()).casefold()
    return value or None


@dataclass
class CropFacts:
    """What a filter needs to know of some crops, column by column (one entry per crop)."""

    crop_ids: np.ndarray  # int64
    product_ids: np.ndarray  # int64 (products.id)
    catalog: Sequence[str | None]
    brand: Sequence[str | None]
    category: Sequence[str | None]
    fine_label: Sequence[str | None]
    coarse_label: Sequence[str | None]
    colour_family: Sequence[str | None]
    price: np.ndarray  # float64, NaN when unknown
    in_stock: np.ndarray  # int8: STOCK_IN, STOCK_OUT or STOCK_UNKNOWN
    served: np.ndarray  # bool: the product is listed and the image not retired

    def __len__(self) -> int:
        return len(self.crop_ids)

    def take(self, picks: np.ndarray) -> CropFacts:
        """The facts of the entries at ``picks`` (indices into these columns)."""
        keep = picks.tolist()

        def strings(column: Sequence[str | None]) -> list[str | None]:
            return [column[i] for i in keep]

        return CropFacts(
            self.crop_ids[picks],
            self.product_ids[picks],
            strings(self.catalog),
            strings(self.brand),
            strings(self.category),
            strings(self.fine_label),
            strings(self.coarse_label),
            strings(self.colour_family),
            self.price[picks],
            self.in_stock[picks],
            self.served[picks],
        )


@dataclass(frozen=True)
class CropFilter:
    """A shopper's filters; None means "any". Strings match case-insensitively; ``category``
    matches the product's category or the crop's fine or coarse label ("dress", "shoes")."""

    catalog: str | None = None
    category: str | None = None
    brand: str | None = None
    colour_family: str | None = None
    min_price: float | None = None
    max_price: float | None = None
    in_stock: bool | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__dataclass_fields__)


@dataclass
class FilterMask:
    """Which rows pass a filter, and the filter values no crop has (``unknown``: name -> value)."""

    rows: np.ndarray  # bool over rows
    unknown: dict[str, str] = field(default_factory=dict)


_STRING_COLUMNS = ("catalog", "brand", "category", "fine_label", "coarse_label", "colour_family")


class LiveIndex:
    """A base ``VectorIndex`` with its delta, tombstones and per-crop facts.

    Searches may run in any number of threads while one refresher writes: writers hold
    ``_write``; readers take the arrays as they are (a row written later is simply not seen
    yet; a torn row between two columns is harmless because hits are re-checked against the
    database by the caller). Arrays are replaced, never resized in place, when they grow."""

    def __init__(self, base: VectorIndex, delta_capacity: int = 1024) -> None:
        self.base = base
        self.dim = base.dim
        ids = np.asarray(base.backend.position_ids(), dtype=np.int64)
        self._base_ids = ids
        self._base_order = np.argsort(ids, kind="stable")
        self._base_sorted = ids[self._base_order]
        self.n_base = len(ids)
        capacity = self.n_base + delta_capacity
        self._ids = np.full(capacity, -1, np.int64)
        self._ids[: self.n_base] = ids
        self._product = np.full(capacity, -1, np.int64)
        self._strings = {name: np.full(capacity, NONE, np.int32) for name in _STRING_COLUMNS}
        self._price = np.full(capacity, np.nan, np.float64)
        self._stock = np.full(capacity, STOCK_UNKNOWN, np.int8)
        self._served = np.zeros(capacity, bool)  # a base crop with no facts yet is not served
        self._delta = np.zeros((delta_capacity, self.dim), np.float32)
        self._delta_rows: dict[int, int] = {}  # crop id -> row, for delta crops
        self.n_rows = self.n_base
        self._vocab: dict[str, int] = {}
        self._known: dict[str, set[int]] = {name: set() for name in _STRING_COLUMNS}
        self._raw: dict[str, dict[str | None, int]] = {name: {} for name in _STRING_COLUMNS}
        self._write = threading.Lock()
        self.version = 0  # bumped by every write: cached masks are keyed by it
        # (version, rows, served among them): a sum over a million flags is not free, and
        # every query asks for it; recounted after any write.
        self._counted: tuple[int, int, int] = (-1, -1, 0)

    # --- size --------------------------------------------------------------------------------
    @property
    def n_delta(self) -> int:
        return self.n_rows - self.n_base

    @property
    def n_served(self) -> int:
        return self._served_among(self.n_rows)

    def _served_among(self, n: int) -> int:
        """Served crops among the first ``n`` rows, counted once per version."""
        version = self.version  # read before counting: a write meanwhile makes it stale
        counted_version, counted_n, count = self._counted
        if counted_version == version and counted_n == n:
            return count
        count = int(self._served[:n].sum())
        self._counted = (version, n, count)
        return count

    @property
    def ntotal(self) -> int:
        """Crops a search can return (served ones), as ``VectorIndex.ntotal``."""
        return self.n_served

    @property
    def model_version_id(self) -> int | None:
        return self.base.model_version_id

    def count(self, allowed: np.ndarray) -> int:
        """Served crops among the rows of ``allowed`` (a mask from ``mask``)."""
        n = min(self.n_rows, len(allowed))
        return int((self._served[:n] & allowed[:n]).sum())

    def describe(self) -> dict[str, int]:
        return {
            "base_vectors": self.n_base,
            "delta_vectors": self.n_delta,
            "served": self.n_served,
            "not_served": self.n_rows - self.n_served,
        }

    # --- rows ----------------------------------------------------------------------------------
    def rows_of(self, crop_ids: np.ndarray) -> np.ndarray:
        """Row of each crop id, -1 for a crop in neither base nor delta."""
        crop_ids = np.asarray(crop_ids, dtype=np.int64)
        rows = np.full(len(crop_ids), -1, np.int64)
        if self.n_base:
            at = np.searchsorted(self._base_sorted, crop_ids)
            at = np.minimum(at, self.n_base - 1)
            hit = self._base_sorted[at] == crop_ids
            rows[hit] = self._base_order[at[hit]]
        if self._delta_rows:
            for i in np.flatnonzero(rows < 0).tolist():
                rows[i] = self._delta_rows.get(int(crop_ids[i]), -1)
        return rows

    def has(self, crop_ids: np.ndarray) -> np.ndarray:
        return self.rows_of(crop_ids) >= 0

    def served(self, crop_ids: np.ndarray) -> np.ndarray:
        rows = self.rows_of(crop_ids)
        return np.where(rows >= 0, self._served[np.maximum(rows, 0)], False)

    # --- writes --------------------------------------------------------------------------------
    def update(self, facts: CropFacts) -> np.ndarray:
        """Write the facts of crops already held; returns the crop ids of ``facts`` that are
        held by neither base nor delta (the caller fetches their vectors and ``add``s them)."""
        rows = self.rows_of(facts.crop_ids)
        held = rows >= 0
        with self._write:
            self._set(rows[held], facts if held.all() else facts.take(np.flatnonzero(held)))
        return np.asarray(facts.crop_ids)[~held]

    def add(self, facts: CropFacts, vectors: np.ndarray) -> int:
        """Append crops new to this index (vectors newer than the base) with their facts; crops
        already held only get their facts written. Returns the number appended."""
        vectors = normalised(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim), self.dim)
        if len(vectors) != len(facts):
            raise ValueError(f"{len(vectors)} vectors for {len(facts)} crops")
        new = self.update(facts)
        if not len(new):
            return 0
        picks = np.flatnonzero(np.isin(facts.crop_ids, new))
        # one row per crop, the first occurrence wins
        _, first = np.unique(facts.crop_ids[picks], return_index=True)
        picks = picks[np.sort(first)]
        with self._write:
            start = self.n_rows
            self._grow(start + len(picks))
            rows = np.arange(start, start + len(picks))
            self._delta[rows - self.n_base] = vectors[picks]
            self._ids[rows] = facts.crop_ids[picks]
            self._set(rows, facts.take(picks))
            for row, crop_id in zip(rows.tolist(), facts.crop_ids[picks].tolist(), strict=True):
                self._delta_rows[crop_id] = row
            self.n_rows = start + len(picks)  # published last: readers see whole rows only
            self.version += 1
        return len(picks)

    def _set(self, rows: np.ndarray, facts: CropFacts) -> None:
        if not len(rows):
            return
        self._product[rows] = facts.product_ids
        for name in _STRING_COLUMNS:
            # each distinct raw string once (pandas' hash table), then a vectorised take
            labels, uniques = pd.factorize(np.asarray(getattr(facts, name), dtype=object))
            codes = (self._code(name, v) for v in uniques)
            table = np.fromiter(codes, np.int32, len(uniques)) if len(uniques) else np.array([NONE])
            self._strings[name][rows] = np.where(labels >= 0, table[np.maximum(labels, 0)], NONE)
        self._price[rows] = facts.price
        self._stock[rows] = facts.in_stock
        self._served[rows] = facts.served
        self.version += 1

    def _code(self, column: str, value: str | None) -> int:
        seen = self._raw[column].get(value)  # the same raw strings recur: skip word()
        if seen is not None:
            return seen
        key = word(value)
        if key is None:
            code = NONE
        else:
            code = self._vocab.get(key, NONE)
            if code == NONE:
                code = self._vocab[key] = len(self._vocab)
            self._known[column].add(code)
        self._raw[column][value] = code
        return code

    def _grow(self, rows: int) -> None:
        if rows <= len(self._ids):
            return
        capacity = max(rows, 2 * len(self._ids))

        def grown(a: np.ndarray, fill: object) -> np.ndarray:
            out = np.full((capacity, *a.shape[1:]), fill, a.dtype)
            out[: len(a)] = a
            return out

        self._ids = grown(self._ids, -1)
        self._product = grown(self._product, -1)
        self._strings = {k: grown(v, NONE) for k, v in self._strings.items()}
        self._price = grown(self._price, np.nan)
        self._stock = grown(self._stock, STOCK_UNKNOWN)
        self._served = grown(self._served, False)
        delta = np.zeros((capacity - self.n_base, self.dim), np.float32)
        delta[: len(self._delta)] = self._delta
        self._delta = delta

    # --- filters -------------------------------------------------------------------------------
    def values(self, column: str) -> list[str]:
        """The distinct values a string column holds (case-folded), sorted."""
        by_code = {code: value for value, code in self._vocab.items()}
        return sorted(by_code[c] for c in self._known[column])

    def facets(self) -> dict[str, object]:
        """What the filters can take: the values of each string filter, the price range."""
        n = self.n_rows
        prices = self._price[:n][self._served[:n]]
        prices = prices[~np.isnan(prices)]
        categories = {*self.values("category"), *self.values("fine_label")}
        categories |= set(self.values("coarse_label"))
        return {
            "catalogs": self.values("catalog"),
            "brands": self.values("brand"),
            "categories": sorted(categories),
            "colours": self.values("colour_family"),
            "min_price": float(prices.min()) if len(prices) else None,
            "max_price": float(prices.max()) if len(prices) else None,
        }

    def mask(self, wanted: CropFilter) -> FilterMask:
        """Rows passing ``wanted`` (tombstones included: ``search`` removes those)."""
        n = self.n_rows
        rows = np.ones(n, bool)
        unknown: dict[str, str] = {}

        def code(name: str, value: str, columns: Iterable[str]) -> int:
            key = word(value) or ""
            found = self._vocab.get(key, NONE)
            if found == NONE or not any(found in self._known[c] for c in columns):
                unknown[name] = value
                rows[:] = False  # matches nothing (and never the crops that lack the value)
            return found

        for name, column in (("catalog", "catalog"), ("brand", "brand")):
            value = getattr(wanted, name)
            if value is not None:
                rows &= self._strings[column][:n] == code(name, value, [column])
        if wanted.colour_family is not None:
            c = code("colour", wanted.colour_family, ["colour_family"])
            rows &= self._strings["colour_family"][:n] == c
        if wanted.category is not None:
            columns = ("category", "fine_label", "coarse_label")
            c = code("category", wanted.category, columns)
            rows &= np.logical_or.reduce([self._strings[col][:n] == c for col in columns])
        price = self._price[:n]
        with np.errstate(invalid="ignore"):  # NaN (no price) passes no price bound
            if wanted.min_price is not None:
                rows &= price >= wanted.min_price
            if wanted.max_price is not None:
                rows &= price <= wanted.max_price
        if wanted.in_stock is not None:
            rows &= self._stock[:n] == (STOCK_IN if wanted.in_stock else STOCK_OUT)
        return FilterMask(rows, unknown)

    # --- search --------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, crop ids), each (nq, k), best first, over served crops of base and delta
        (and of ``allowed``, a row mask from ``mask``, when given); -1 / -inf pad."""
        q = normalised(np.atleast_2d(queries), self.dim)
        n = self.n_rows  # one snapshot of the row count for this search
        if allowed is not None:
            n = min(n, len(allowed))  # rows appended after the mask was made stay out
        served = self._served[:n]
        rows = served if allowed is None else served & allowed[:n]
        parts = [self._search_base(q, k, rows[: self.n_base], allowed is None)]
        if n > self.n_base:
            parts.append(self._search_delta(q, k, rows[self.n_base : n], n))
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _search_base(
        self, q: np.ndarray, k: int, rows: np.ndarray, unfiltered: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        count = self._served_among(self.n_base) if unfiltered else int(rows.sum())
        if count == 0 or k <= 0:
            return _empty(len(q), k)
        if count == self.n_base:
            return self.base.search(q, k)
        backend = self.base.backend
        bitmap = np.packbits(rows, bitorder="little")
        nlist = _nlist(backend)
        if nlist is None:  # exact backend: the selector is all it takes
            scores, ids = backend.search_selected(q, k, bitmap)
        else:
            tuned = int(self.base.params.get("nprobe", 1))
            nprobe = min(nlist, math.ceil(tuned * self.n_base / count))
            scores, ids = backend.search_selected(q, k, bitmap, nprobe)
            want = min(k, count)
            if nprobe < nlist and ((ids >= 0).sum(axis=1) < want).any():
                scores, ids = backend.search_selected(q, k, bitmap, nlist)  # complete
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)

    def _search_delta(
        self, q: np.ndarray, k: int, rows: np.ndarray, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        picks = np.flatnonzero(rows)
        if not len(picks) or k <= 0:
            return _empty(len(q), k)
        vectors = self._delta[picks]
        kk = min(k, len(picks))
        scores, local = faiss.knn(q, vectors, kk, faiss.METRIC_INNER_PRODUCT)
        ids = self._ids[self.n_base + picks[np.maximum(local, 0)]]
        ids = np.where(local >= 0, ids, -1)
        scores = np.where(local >= 0, scores, -np.inf).astype(np.float32)
        if kk < k:
            pad_s, pad_i = _empty(len(q), k - kk)
            scores, ids = np.hstack([scores, pad_s]), np.hstack([ids, pad_i])
        return scores, ids


def _nlist(backend: object) -> int | None:
    ivf = getattr(backend, "ivf", None)
    return int(ivf.nlist) if ivf is not None else None


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = max(k, 0)
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
