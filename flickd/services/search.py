"""Search the visual index: a text or an image in, catalog products out, best crop per product.

A query image goes through the same stages as a catalog image (detect → plan crops → crop →
colour → embed), so "this dress in my photo" is compared with dress crops, not with a whole
street scene. Each detected item gets its own result list. A query image too thin for the models
is refused (``bad_geometry``); one of extreme aspect ratio is padded before a model sees it, and
an image the detector fails on is searched whole (``flickd/fetching/geometry.py``).

Scores are cosine similarities (index vectors and queries are L2-normalised), so the
prototype's thresholds keep their meaning: ``exact`` ≥ ``match_exact``, ``similar`` ≥
``match_similar``, anything lower is ``weak``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from PIL import Image as PILImage
from pydantic import BaseModel
from sqlalchemy import select

from db.schema import Crop, Image, ModelVersion, Product
from db.session import session_scope
from db.sql import id_in
from db.versions import active_embedder
from flickd.core.reasons import FailureReason, ImageFailure
from flickd.core.settings import Settings
from flickd.core.storage import INDEX, storage_for
from flickd.fetching.fetch import HttpClient, fetch, make_session
from flickd.fetching.geometry import GeometryLimits, check_geometry
from flickd.fetching.imaging import decode_image
from flickd.services.analysis import AnalysedCrop, analyse_images
from flickd.services.batching import InFlight, LruCache, MicroBatcher
from flickd.services.filters import describe, notes_for, passes
from flickd.services.freshness import Freshness
from models import registry
from models.colour import COLOUR_FAMILIES
from models.index import IndexHolder
from models.index.live import CropFilter, LiveIndex

if TYPE_CHECKING:
    from models.embedder import Embedder
    from models.query_text import TextQueryEncoder

log = logging.getLogger(__name__)

T = TypeVar("T")

# FAISS returns crops, several per product; fetch this many crops per wanted product so that
# grouping still fills the list, and grow up to MAX_OVERFETCH when one product hogs the hits.
OVERFETCH = 4
MAX_OVERFETCH = 64
# How long the index-search batcher waits for the rest of a model batch's queries.
SEARCH_GATHER_SECONDS = 0.0005
# A URL query is interactive: retry a flaky host once, not the download stage's four times.
URL_QUERY_ATTEMPTS = 2


class MatchType(StrEnum):
    EXACT = "exact"
    SIMILAR = "similar"
    WEAK = "weak"


def match_type(score: float, exact: float, similar: float) -> MatchType:
    """The match label of a cosine ``score``; thresholds are inclusive."""
    if score >= exact:
        return MatchType.EXACT
    if score >= similar:
        return MatchType.SIMILAR
    return MatchType.WEAK


# --- response models ---------------------------------------------------------------------------
class ProductHit(BaseModel):
    """One product in a result list, represented by its crop closest to the query."""

    product_id: str  # the feed's id
    catalog: str
    title: str | None
    brand: str | None
    category: str | None
    price: float | None
    in_stock: bool | None = None  # None: the feed does not say
    score: float  # cosine similarity in [-1, 1]
    match: MatchType
    crop_id: int
    label: str | None  # fine label of the crop ("skirt"), None for an unlabelled whole image
    coarse_label: str | None
    colour: str | None
    colour_family: str | None  # everyday word (models.colour.COLOUR_FAMILIES)
    colour_rgb: str | None
    prompt: str | None
    image_url: str  # the catalog image the crop was cut from
    thumbnail_url: str  # the crop itself, served by the API


class QueryItem(BaseModel):
    """One thing searched for: the text, or one item detected in the query image."""

    label: str | None = None
    coarse_label: str | None = None
    detection_score: float | None = None
    box: tuple[float, float, float, float] | None = None  # pixels of the query image
    whole_image: bool = False
    colour: str | None = None
    colour_family: str | None = None
    # Why the item is what it is, when that is not plain detection (detection failed, padded).
    detail: str | None = None
    results: list[ProductHit]


class SearchResponse(BaseModel):
    kind: Literal["text", "image"]
    text: str | None = None
    model_version_id: int
    model_version: str
    index_vectors: int
    items: list[QueryItem]
    took_ms: float
    filters: dict[str, Any] = {}  # the filters in force, by their query-parameter names
    notes: list[str] = []  # e.g. a filter value that no indexed product has


# --- errors ------------------------------------------------------------------------------------
class SearchUnavailable(RuntimeError):
    """Search cannot run yet: no index has been built, or its model cannot be loaded."""


class QueryImageError(ValueError):
    """A query image was refused. ``reason`` is a FailureReason value or ``empty_image``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def decode_query_image(data: bytes, settings: Settings) -> PILImage.Image:
    """Bytes of an uploaded or fetched image → an upright RGB image, or QueryImageError."""
    if not data:
        raise QueryImageError("empty_image", "the image is empty (0 bytes)")
    if len(data) > settings.max_upload_bytes:
        raise QueryImageError(
            FailureReason.TOO_LARGE.value,
            f"image is {len(data)} bytes; the limit is {settings.max_upload_bytes}",
        )
    try:
        image = decode_image(data, settings.max_image_pixels).image
        check_geometry(*image.size, GeometryLimits.from_settings(settings))
    except ImageFailure as failure:
        raise _query_error(failure) from None
    return image


def _query_error(failure: ImageFailure) -> QueryImageError:
    what = failure.reason.value.replace("_", " ")
    return QueryImageError(
        failure.reason.value, f"{what}: {failure.detail}" if failure.detail else what
    )


# --- the service -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Version:
    id: int
    name: str  # hub id or model directory: what the embedder is loaded from
    version: str


@dataclass(frozen=True)
class _ImageQuery:
    embedder: Embedder
    image: PILImage.Image
    detect: bool


@dataclass(frozen=True)
class _IndexQuery:
    """Query vectors (one row per item) to search ``index`` with: batched with the others of the
    same index, ``top_k`` and filters into one FAISS call and one database read."""

    index: LiveIndex
    vectors: np.ndarray
    top_k: int
    filters: CropFilter | None


@dataclass(frozen=True)
class _Found:
    hits: list[list[ProductHit]]  # per row of the query's vectors
    notes: list[str]


def _by_key(items: Sequence[T], key: Callable[[T], Hashable]) -> list[tuple[Any, list[int]]]:
    """Positions of ``items`` grouped by ``key`` (compared by identity of the objects it
    holds, e.g. one embedder), in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for position, item in enumerate(items):
        groups.setdefault(key(item), []).append(position)
    return list(groups.items())


@dataclass(frozen=True)
class _CropRow:
    crop_id: int
    product_pk: int
    product_id: str
    catalog: str
    title: str | None
    brand: str | None
    category: str | None
    price: float | None
    label: str | None
    coarse_label: str | None
    colour: str | None
    colour_family: str | None
    colour_rgb: str | None
    prompt: str | None
    image_url: str
    in_stock: bool | None
    served: bool  # the product is listed and the image not retired


class SearchService:
    """Text and image search against the served index. Safe to share between threads.

    The index is taken from ``IndexHolder`` once per query, so a query started on one index
    finishes on it even when a rebuilt index is swapped in meanwhile.
    """

    def __init__(self, settings: Settings, holder: IndexHolder | None = None) -> None:
        self.settings = settings
        self.holder = holder or IndexHolder(
            storage_for(settings).at(INDEX), check_interval=settings.index_poll_seconds
        )
        # On a CPU torch already uses every core per call: model calls are serialised. Queries
        # reach the models through micro-batchers (batching.py): concurrent queries share one
        # forward pass, and only each batcher's thread ever calls a tokenizer.
        self._model_lock = threading.Lock()
        window = settings.search_batch_window_ms / 1000
        # Queries being answered: a batcher waits out its window only while there are others.
        self._in_flight = InFlight()
        self._texts: MicroBatcher[tuple[TextQueryEncoder, str], np.ndarray] = MicroBatcher(
            self._embed_texts,
            window=window,
            max_batch=settings.search_max_batch,
            name="texts",
            company=self._in_flight,
        )
        self._images: MicroBatcher[_ImageQuery, list[AnalysedCrop]] = MicroBatcher(
            self._analyse,
            window=window,
            max_batch=settings.search_max_batch,
            name="images",
            company=self._in_flight,
        )
        # The index search and the database read of the hits' rows are batched too, on their
        # own thread: while one batch is searched the model embeds the next. The queries of a
        # model batch reach it together, so its window only has to cover their threads waking.
        self._searches: MicroBatcher[_IndexQuery, _Found] = MicroBatcher(
            self._search_batch,
            window=min(window, SEARCH_GATHER_SECONDS),
            max_batch=settings.search_max_batch,
            name="searches",
            company=self._in_flight,
        )
        self._text_cache: LruCache[tuple[str, str], np.ndarray] = LruCache(settings.text_cache_size)
        self._versions: dict[int, _Version] = {}
        self._warned: set[int] = set()
        self._session: HttpClient | None = None
        self._session_lock = threading.Lock()
        # The base index with what changed since it was built (freshness.py); the API polls on
        # a thread (``freshness.start()``), other callers when a query finds it stale.
        self.freshness = Freshness(settings, self.holder)

    # --- public ----------------------------------------------------------------------------
    def search_text(
        self, text: str, top_k: int = 10, filters: CropFilter | None = None
    ) -> SearchResponse:
        with self._in_flight:
            return self._search_text(text, top_k, filters)

    def _search_text(self, text: str, top_k: int, filters: CropFilter | None) -> SearchResponse:
        started = time.perf_counter()
        index, version = self._index_and_version()
        vector = self._text_vector(self._text_encoder(version), text)
        found = self._searches.submit(_IndexQuery(index, vector[None, :], top_k, filters))
        (hits,) = found.hits
        return SearchResponse(
            kind="text",
            text=text,
            model_version_id=version.id,
            model_version=version.version,
            index_vectors=index.ntotal,
            items=[QueryItem(results=hits)],
            took_ms=_ms_since(started),
            filters=describe(filters) if filters else {},
            notes=found.notes,
        )

    def search_image(
        self,
        image: PILImage.Image,
        top_k: int = 10,
        detect: bool = True,
        filters: CropFilter | None = None,
    ) -> SearchResponse:
        """Search per detected item of ``image`` (the whole image when nothing is detected).

        QueryImageError (``bad_geometry``) for an image too thin for the models."""
        with self._in_flight:
            return self._search_image(image, top_k, detect, filters)

    def _search_image(
        self,
        image: PILImage.Image,
        top_k: int,
        detect: bool,
        filters: CropFilter | None,
    ) -> SearchResponse:
        started = time.perf_counter()
        try:
            check_geometry(*image.size, GeometryLimits.from_settings(self.settings))
        except ImageFailure as failure:
            raise _query_error(failure) from None
        index, version = self._index_and_version()
        embedder = self._embedder(version)
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        analysed = self._images.submit(_ImageQuery(embedder, rgb, detect))
        vectors = np.stack([a.vector for a in analysed])
        found = self._searches.submit(_IndexQuery(index, vectors, top_k, filters))
        items = [_query_item(item, hits) for item, hits in zip(analysed, found.hits, strict=True)]
        return SearchResponse(
            kind="image",
            model_version_id=version.id,
            model_version=version.version,
            index_vectors=index.ntotal,
            items=items,
            took_ms=_ms_since(started),
            filters=describe(filters) if filters else {},
            notes=found.notes,
        )

    def fetch_image(self, url: str) -> PILImage.Image:
        """Download a query image through the SSRF guard; QueryImageError when refused. ``url``
        may hold raw spaces, non-ASCII or an IDN host: fetch encodes it as a browser would."""
        settings = self.settings.model_copy(
            update={
                "max_download_bytes": self.settings.max_upload_bytes,
                "max_attempts": min(self.settings.max_attempts, URL_QUERY_ATTEMPTS),
            }
        )
        try:
            result = fetch(url, self._http(), settings)
        except ImageFailure as failure:
            raise _query_error(failure) from None
        return decode_query_image(result.content, self.settings)

    def warm_up(self) -> None:
        """Load the models the served index needs, so the first query does not pay for it.
        Does nothing while no index exists; never raises (a query reports the problem)."""
        try:
            _index, version = self._index_and_version()
            self._text_encoder(version)  # the embedder, and its bf16 text tower where used
            registry.get_detector(self.settings)
        except Exception as exc:
            log.info("search warm-up skipped: %s", exc)

    def filter_values(self) -> dict[str, Any]:
        """The values each filter can take now (``LiveIndex.facets``), for the web page; the
        accepted colour words always."""
        try:
            index, _version = self._index_and_version()
        except SearchUnavailable:
            return {"colour_families": list(COLOUR_FAMILIES)}
        return {**index.facets(), "colour_families": list(COLOUR_FAMILIES)}

    def status(self) -> dict[str, Any]:
        """What /health reports about the index; never raises for a missing index."""
        try:
            index, version = self._index_and_version()
        except SearchUnavailable as exc:
            return {"loaded": False, "detail": str(exc)}
        return {
            "loaded": True,
            "vectors": index.ntotal,
            "model_version_id": version.id,
            "model_version": version.version,
            "freshness": self.freshness.status(),
        }

    # --- index and models --------------------------------------------------------------------
    def _index_and_version(self) -> tuple[LiveIndex, _Version]:
        index = self.freshness.current()
        if index is None:
            raise SearchUnavailable(
                "no search index has been built yet: ingest a catalog, then run `flickd index "
                "build` (or let a run's final task build it)"
            )
        return index, self._version(index.model_version_id)

    def _version(self, version_id: int | None) -> _Version:
        """The embedder that produced the index's vectors: queries must be embedded by the
        same weights. An index that does not say (built by hand) is taken to be the active
        embedder's."""
        cached = self._versions.get(version_id) if version_id is not None else None
        if cached is not None:
            return cached
        with session_scope(self.settings) as session:
            row = (
                session.get(ModelVersion, version_id)
                if version_id is not None
                else active_embedder(session)
            )
            if row is None:
                raise SearchUnavailable(
                    f"the index's embedder (model version {version_id}) is not recorded"
                )
            version = _Version(row.id, row.name, row.version)
        if version_id is not None:
            self._versions[version_id] = version  # rows never change name or version
        return version

    def _embedder(self, version: _Version) -> Embedder:
        try:
            embedder = registry.get_embedder_by_name(version.name, self.settings)
        except Exception as exc:  # ModelLoadError, or a broken model directory
            raise SearchUnavailable(f"cannot load embedder {version.name!r}: {exc}") from exc
        if embedder.model_version != version.version and version.id not in self._warned:
            # Same name, other weights: the query vectors may not match the indexed ones.
            self._warned.add(version.id)
            log.warning(
                "embedder %s loads as %s but the index was built with %s",
                version.name,
                embedder.model_version,
                version.version,
            )
        return embedder

    # --- batched model calls ---------------------------------------------------------------
    def _text_encoder(self, version: _Version) -> TextQueryEncoder:
        """The query text encoder over the version's embedder (``_embedder`` checks it)."""
        self._embedder(version)
        return registry.get_text_query_encoder(version.name, self.settings)

    def _text_vector(self, encoder: TextQueryEncoder, text: str) -> np.ndarray:
        """The unit vector of a query text: from the cache, else from a batched forward pass."""
        key = (encoder.embedder.model_version, text)
        vector = self._text_cache.get(key)
        if vector is None:
            vector = self._texts.submit((encoder, text))
            vector.flags.writeable = False  # shared by every later query of the same text
            self._text_cache.put(key, vector)
        return vector

    def _embed_texts(self, queries: list[tuple[TextQueryEncoder, str]]) -> list[np.ndarray]:
        """One forward pass per encoder for a batch of (encoder, text) queries."""
        vectors: list[np.ndarray | None] = [None] * len(queries)
        for encoder, positions in _by_key(queries, lambda q: q[0]):
            with self._model_lock:
                found = encoder.embed([queries[i][1] for i in positions])
            for i, vector in zip(positions, found, strict=True):
                vectors[i] = vector.copy()
        return [v for v in vectors if v is not None]

    def _search_batch(self, queries: list[_IndexQuery]) -> list[_Found]:
        """The queries of a batch that share an index, ``top_k`` and filters, searched as one."""
        found: list[_Found | None] = [None] * len(queries)
        for (index, top_k, filters), positions in _by_key(
            queries, lambda q: (q.index, q.top_k, q.filters)
        ):
            vectors = np.concatenate([queries[i].vectors for i in positions])
            notes: list[str] = []
            grouped = self._search_grouped(index, vectors, top_k, filters, notes)
            start = 0
            for i in positions:
                end = start + len(queries[i].vectors)
                found[i] = _Found(grouped[start:end], list(notes))
                start = end
        return [f for f in found if f is not None]

    def _analyse(self, queries: list[_ImageQuery]) -> list[list[AnalysedCrop]]:
        """One detection and one embedding pass per (embedder, detect) for a batch of images."""
        results: list[list[AnalysedCrop] | None] = [None] * len(queries)
        for (embedder, detect), positions in _by_key(queries, lambda q: (q.embedder, q.detect)):
            found = analyse_images(
                [queries[i].image for i in positions],
                self.settings,
                embedder,
                self._model_lock,
                detect=detect,
            )
            for i, items in zip(positions, found, strict=True):
                results[i] = items
        return [r for r in results if r is not None]

    def _http(self) -> HttpClient:
        with self._session_lock:
            if self._session is None:
                self._session = make_session(self.settings)
            return self._session

    # --- grouping ------------------------------------------------------------------------------
    def _search_grouped(
        self,
        index: LiveIndex,
        vectors: np.ndarray,
        top_k: int,
        filters: CropFilter | None = None,
        notes: list[str] | None = None,
    ) -> list[list[ProductHit]]:
        """Best crop per product, ``top_k`` products per query vector, inside ``filters``
        (a row mask for the index's id selectors; each hit re-checked on its database row).
        ``notes`` gets a sentence per filter value that no indexed crop has."""
        allowed = None
        total = index.ntotal
        if filters is not None and not filters.empty:
            mask = index.mask(filters)
            allowed = mask.rows
            total = index.count(allowed)
            if notes is not None:
                notes.extend(notes_for(mask.unknown))
        limit = min(total, top_k * MAX_OVERFETCH)
        fetch_k = min(total, top_k * OVERFETCH)
        if total == 0:
            return [[] for _ in range(len(np.atleast_2d(vectors)))]
        while True:
            scores, ids = index.search(vectors, max(1, fetch_k), allowed)
            rows = self._crop_rows(ids)
            grouped = [
                self._group(row_scores, row_ids, rows, top_k, filters)
                for row_scores, row_ids in zip(scores, ids, strict=True)
            ]
            if fetch_k >= limit or all(len(hits) >= top_k for hits in grouped):
                return grouped
            fetch_k = min(limit, fetch_k * 4)

    def _group(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        rows: dict[int, _CropRow],
        top_k: int,
        filters: CropFilter | None = None,
    ) -> list[ProductHit]:
        hits: list[ProductHit] = []
        seen: set[int] = set()
        wanted = filters or CropFilter()
        for score, crop_id in zip(scores.tolist(), ids.tolist(), strict=True):
            row = rows.get(int(crop_id))  # -1 pads a short result; a crop may have been deleted
            if row is None or row.product_pk in seen or not passes(wanted, row):
                continue  # hits come best first, so the first crop of a product is its best
            seen.add(row.product_pk)
            hits.append(self._hit(row, float(score)))
            if len(hits) == top_k:
                break
        return hits

    def _hit(self, row: _CropRow, score: float) -> ProductHit:
        return ProductHit(
            product_id=row.product_id,
            catalog=row.catalog,
            title=row.title,
            brand=row.brand,
            category=row.category,
            price=row.price,
            in_stock=row.in_stock,
            score=score,
            match=match_type(score, self.settings.match_exact, self.settings.match_similar),
            crop_id=row.crop_id,
            label=row.label,
            coarse_label=row.coarse_label,
            colour=row.colour,
            colour_family=row.colour_family,
            colour_rgb=row.colour_rgb,
            prompt=row.prompt,
            image_url=row.image_url,
            thumbnail_url=f"/crops/{row.crop_id}.jpg",
        )

    def _crop_rows(self, ids: np.ndarray) -> dict[int, _CropRow]:
        """Crop, image and product of every hit, in one query."""
        wanted = sorted({int(i) for i in np.asarray(ids).ravel() if i >= 0})
        if not wanted:
            return {}
        query = (
            select(
                Crop.id,
                Crop.fine_label,
                Crop.coarse_label,
                Crop.colour_name,
                Crop.colour_family,
                Crop.colour_rgb,
                Crop.prompt,
                Image.url,
                Product.id.label("product_pk"),
                Product.external_id,
                Product.catalog,
                Product.title,
                Product.brand,
                Product.category,
                Product.price,
                Product.in_stock,
                Product.listed,
                Image.retired_at,
            )
            .join(Image, Image.id == Crop.image_id)
            .join(Product, Product.id == Image.product_id)
        )
        with session_scope(self.settings) as session:
            # One cached statement whatever the number of hits (db.sql.id_in), not one per
            # length of the IN list: this runs for every query.
            query = query.where(id_in(session.connection(), Crop.id, wanted))
            return {r.id: _crop_row(r) for r in session.execute(query)}


def _crop_row(r: Any) -> _CropRow:
    return _CropRow(
        crop_id=r.id,
        product_pk=r.product_pk,
        product_id=r.external_id,
        catalog=r.catalog,
        title=r.title,
        brand=r.brand,
        category=r.category,
        price=r.price,
        label=r.fine_label,
        coarse_label=r.coarse_label,
        colour=r.colour_name,
        colour_family=r.colour_family,
        colour_rgb=r.colour_rgb,
        prompt=r.prompt,
        image_url=r.url,
        in_stock=r.in_stock,
        served=r.listed is not False and r.retired_at is None,
    )


def _query_item(item: AnalysedCrop, hits: Sequence[ProductHit]) -> QueryItem:
    crop = item.crop
    return QueryItem(
        label=crop.fine_label,
        coarse_label=crop.coarse_label,
        detection_score=crop.score,
        box=crop.box,
        whole_image=crop.whole_image,
        colour=item.colour,
        colour_family=item.colour_family,
        detail=item.detail,
        results=list(hits),
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
