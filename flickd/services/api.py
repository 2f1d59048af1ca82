"""The HTTP API and web page: search by text, uploaded image or image URL; products; crops.
Video search (upload or URL, and its jobs) is in ``video_api.py``.

``create_app(settings)`` builds the app; ``flickd api`` serves it with uvicorn. Every endpoint is
a plain ``def``: model calls and database reads block, and FastAPI runs such endpoints in its
thread pool, so a slow image query does not stall ``/health``.

Errors are JSON ``{"detail": message, "reason": code}`` with the status saying whose fault it
is: 4xx for the query (400 blocked or invalid URL, 413 too large, 415 not an image type, 422
undecodable, empty or too thin to look at, or a refused filter: ``unknown_colour``,
``bad_price_range``), 502 when a query URL's host fails, 503 when no index exists yet.

Every search route takes the filters ``catalog``, ``category``, ``brand``, ``colour``,
``min_price``, ``max_price`` and ``in_stock`` as query parameters (``filters.py``); the
serving index follows the database on a background thread (``freshness.py``).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from sqlalchemy import select, text

from db.products import product_details
from db.schema import Crop
from db.session import session_scope
from flickd.core.blobstore import BlobStore
from flickd.core.settings import Settings, get_settings
from flickd.services.api_errors import (
    MAX_TOP_K,
    MULTIPART_SLACK,
    UPSTREAM_FAILURE,
    ApiError,
    BodySizeLimit,
    ErrorBody,
    error_response,
)
from flickd.services.filters import FilterError, make_filter
from flickd.services.metrics import render_metrics
from flickd.services.search import (
    QueryImageError,
    SearchResponse,
    SearchService,
    SearchUnavailable,
    decode_query_image,
)
from flickd.services.video_api import VIDEO_SEARCH_PATH, add_video_routes
from models.colour import COLOUR_FAMILIES
from models.index.live import CropFilter

WEB_DIR = Path(__file__).parent / "web"
ACCEPTED_TYPES_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"

# HTTP status of each reason a query image is refused; anything unlisted is the remote's fault.
STATUS_BY_REASON: dict[str, int] = {
    "invalid_url": 400,
    "blocked_address": 400,
    "too_large": 413,
    "decompression_bomb": 413,
    "not_an_image": 415,
    "unsupported_format": 415,
    "unsupported_media_type": 415,
    "corrupt_image": 422,
    "bad_geometry": 422,
    "empty_image": 422,
}


class UrlQuery(BaseModel):
    url: str = Field(min_length=1, max_length=2048, description="http(s) URL of an image")
    k: int = Field(10, ge=1, le=MAX_TOP_K, description="products per result list")
    detect: bool = Field(True, description="search per detected item, not the whole image")


def _query_failed(error: QueryImageError) -> ApiError:
    return ApiError(
        STATUS_BY_REASON.get(error.reason, UPSTREAM_FAILURE), error.reason, error.message
    )


def _unavailable(error: SearchUnavailable) -> ApiError:
    return ApiError(503, "search_unavailable", str(error))


def create_app(settings: Settings | None = None, service: SearchService | None = None) -> FastAPI:
    """The flickd API. ``service`` defaults to a SearchService over ``settings.index_dir``."""
    settings = settings or get_settings()
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    service = service or SearchService(settings)
    app = FastAPI(
        lifespan=_warm_up_in_background(service),
        title="flickd",
        summary="Visual search over fashion catalogs",
        description="Search catalog products by text, by an uploaded image or by an image URL.",
        version="0.1.0",
    )
    app.state.settings = settings
    app.state.search = service
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_upload_bytes + MULTIPART_SLACK,
        per_path={VIDEO_SEARCH_PATH: settings.video_max_upload_bytes + MULTIPART_SLACK},
    )
    app.add_exception_handler(ApiError, _handle_api_error)  # type: ignore[arg-type]  # Starlette types handlers for any Exception; this one gets only ApiError
    _add_search_routes(app, settings, service)
    add_video_routes(app, settings, service)
    _add_catalog_routes(app, settings, service)
    _add_web_routes(app)
    _add_metrics_routes(app, settings)
    return app


def _add_metrics_routes(app: FastAPI, settings: Settings) -> None:
    """The gauges at ``/metrics`` and ``/metrics/`` alike: a mounted app would answer the first
    with a redirect, which a plain ``curl`` or a scraper without redirects does not follow."""
    from prometheus_client import CONTENT_TYPE_LATEST

    def metrics() -> Response:
        return Response(render_metrics(settings), media_type=CONTENT_TYPE_LATEST)

    for path in ("/metrics", "/metrics/"):
        app.add_api_route(path, metrics, methods=["GET"], include_in_schema=False)


def _warm_up_in_background(service: SearchService) -> Any:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Loading CLIP takes seconds: do it beside serving, so /health answers at once.
        threading.Thread(target=service.warm_up, name="search-warm-up", daemon=True).start()
        service.freshness.start()  # follow the catalog: new crops in, delisted ones out
        try:
            yield
        finally:
            service.freshness.stop()

    return lifespan


def create_default_app() -> FastAPI:
    """App factory for uvicorn: settings from the environment."""
    return create_app(get_settings())


async def _handle_api_error(_request: Request, error: ApiError) -> JSONResponse:
    return error_response(error)


# --- search ------------------------------------------------------------------------------------
TopK = Annotated[int, Query(ge=1, le=MAX_TOP_K, description="products per result list")]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 413, 415, 422, 502, 503)
}


def search_filters(
    catalog: Annotated[str | None, Query(max_length=200, description="catalog name")] = None,
    category: Annotated[
        str | None,
        Query(max_length=200, description="product category, or detected item (fine or coarse)"),
    ] = None,
    brand: Annotated[str | None, Query(max_length=200)] = None,
    colour: Annotated[
        str | None, Query(max_length=40, description=f"one of: {', '.join(COLOUR_FAMILIES)}")
    ] = None,
    min_price: Annotated[float | None, Query(description="lowest price, inclusive")] = None,
    max_price: Annotated[float | None, Query(description="highest price, inclusive")] = None,
    in_stock: Annotated[bool | None, Query(description="true: in stock only")] = None,
) -> CropFilter:
    """The filters of a search request; 422 for a refused one (``filters.make_filter``)."""
    try:
        return make_filter(
            catalog=catalog,
            category=category,
            brand=brand,
            colour=colour,
            min_price=min_price,
            max_price=max_price,
            in_stock=in_stock,
        )
    except FilterError as exc:
        raise ApiError(422, exc.reason, exc.message) from exc


Filters = Annotated[CropFilter, Depends(search_filters)]


def _add_search_routes(app: FastAPI, settings: Settings, service: SearchService) -> None:
    @app.get("/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    def search_text(
        q: Annotated[str, Query(min_length=1, max_length=500, description="what to look for")],
        filters: Filters,
        k: TopK = 10,
    ) -> SearchResponse:
        """Products whose crops are closest to the text, best first."""
        if not q.strip():
            raise ApiError(422, "empty_query", "the query text is blank")
        try:
            return service.search_text(q.strip(), k, filters)
        except SearchUnavailable as exc:
            raise _unavailable(exc) from exc

    @app.post("/search/image", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    def search_upload(
        file: Annotated[UploadFile, File(description=f"a {ACCEPTED_TYPES_TEXT} image")],
        filters: Filters,
        k: TopK = 10,
        detect: bool = True,
    ) -> SearchResponse:
        """Products matching each item detected in the uploaded image."""
        _check_upload_type(file.content_type)
        # One byte over the limit is enough to know it is too large.
        data = file.file.read(settings.max_upload_bytes + 1)
        try:
            image = decode_query_image(data, settings)
        except QueryImageError as exc:
            raise _query_failed(exc) from exc
        return _search_image(service, image, k, detect, filters)

    @app.post("/search/url", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    def search_url(query: UrlQuery, filters: Filters) -> SearchResponse:
        """Products matching each item detected in the image at ``url`` (fetched through the
        SSRF guard: private and loopback addresses are refused)."""
        try:
            image = service.fetch_image(query.url)
        except QueryImageError as exc:
            raise _query_failed(exc) from exc
        return _search_image(service, image, query.k, query.detect, filters)

    @app.get("/search/filters", tags=["search"])
    def filter_values() -> dict[str, Any]:
        """The values the filters can take now: catalogs, brands, categories (with detected
        items), colour families, and the price range of served products."""
        return service.filter_values()


def _check_upload_type(content_type: str | None) -> None:
    """Refuse declared non-image types early; image/* and unlabelled uploads are sniffed by
    the decoder, which trusts the bytes, not the label."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared in ("", "application/octet-stream") or declared.startswith("image/"):
        return
    raise ApiError(
        415,
        "unsupported_media_type",
        f"uploads must be a {ACCEPTED_TYPES_TEXT} image, not {declared}",
    )


def _search_image(
    service: SearchService, image: Any, k: int, detect: bool, filters: CropFilter
) -> SearchResponse:
    try:
        return service.search_image(image, k, detect=detect, filters=filters)
    except SearchUnavailable as exc:
        raise _unavailable(exc) from exc
    except QueryImageError as exc:
        raise _query_failed(exc) from exc


# --- catalog and health ------------------------------------------------------------------------
def _add_catalog_routes(app: FastAPI, settings: Settings, service: SearchService) -> None:
    blobs = BlobStore.for_settings(settings)

    @app.get("/health", tags=["operations"])
    def health(response: Response) -> dict[str, Any]:
        """200 when the database answers and an index is loaded; 503 (same body) otherwise."""
        database = _database_status(settings)
        index = service.status()
        ok = database["ok"] and index["loaded"]
        response.status_code = 200 if ok else 503
        return {"status": "ok" if ok else "unavailable", "database": database, "index": index}

    @app.get("/products/{product_id}", tags=["catalog"], responses={404: {"model": ErrorBody}})
    def product(product_id: str, catalog: str = "default") -> dict[str, Any]:
        """A product with its images and their crops (label, colour, prompt, box)."""
        with session_scope(settings) as session:
            details = product_details(session, product_id, catalog)
        if details is None:
            raise ApiError(404, "not_found", f"no product {product_id!r} in catalog {catalog!r}")
        return details

    @app.get(
        "/crops/{crop_id}.jpg",
        tags=["catalog"],
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorBody}},
    )
    def crop_jpeg(crop_id: int) -> Response:
        """The JPEG of one crop, as stored by the vision stage."""
        with session_scope(settings) as session:
            key = session.scalar(select(Crop.blob_key).where(Crop.id == crop_id))
        if not key or not blobs.exists(key):
            raise ApiError(404, "not_found", f"no stored image for crop {crop_id}")
        # A crop's blob is content-addressed and never rewritten: cache it for long.
        return Response(
            blobs.get(key),
            media_type="image/jpeg",
            headers={"Cache-Control": "public, max-age=86400", "ETag": f'"{key}"'},
        )


def _database_status(settings: Settings) -> dict[str, Any]:
    try:
        with session_scope(settings) as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ok"; say which
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ok": True}


# --- web page ----------------------------------------------------------------------------------
def _add_web_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
