"""Looking things up: ``search`` (no server), ``api`` (the search server) and ``show`` (one
product's images and crops)."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flickd.cli.context import current_settings, echo_json, needs_schema
from flickd.core.settings import Settings

if TYPE_CHECKING:
    from flickd.services.search import QueryItem, SearchResponse


@click.command()
@click.option("--image", "image_ref", help="Query image: a file path or an http(s) URL.")
@click.option("--text", "query_text", help="Query text, e.g. 'a red summer dress'.")
@click.option(
    "--video", "video_ref", help="Query video (MP4, WebM, MOV, GIF): a file path or a URL."
)
@click.option(
    "--top-k",
    "-k",
    type=click.IntRange(1, 100),
    default=None,
    help="Products per item (image, text: 10) or per track (video: 5).",
)
@click.option("--no-detect", is_flag=True, help="Search with the whole image, no detection.")
@click.option("--catalog", help="Only products of this catalog.")
@click.option("--category", help="Product category or detected item, e.g. dress, shoe.")
@click.option("--brand", help="Only this brand (any case).")
@click.option("--colour", help="Colour family: black, white, grey, beige, brown, red, pink, …")
@click.option("--min-price", type=float, help="Lowest price, inclusive.")
@click.option("--max-price", type=float, help="Highest price, inclusive.")
@click.option("--in-stock", is_flag=True, default=None, help="Only products in stock.")
@click.option("--json", "as_json", is_flag=True)
def search(
    image_ref: str | None,
    query_text: str | None,
    video_ref: str | None,
    top_k: int | None,
    no_detect: bool,
    catalog: str | None,
    category: str | None,
    brand: str | None,
    colour: str | None,
    min_price: float | None,
    max_price: float | None,
    in_stock: bool | None,
    as_json: bool,
) -> None:
    """Search the index by --image, --text or --video, without a server; results grouped by
    product (a video's with the time ranges where each product appears). The filters apply to
    --text and --image."""
    from flickd.services.filters import FilterError, make_filter
    from flickd.services.search import QueryImageError, SearchService, SearchUnavailable

    if sum(ref is not None for ref in (image_ref, query_text, video_ref)) != 1:
        raise click.UsageError("give exactly one of --image, --text or --video")
    try:
        filters = make_filter(
            catalog=catalog,
            category=category,
            brand=brand,
            colour=colour,
            min_price=min_price,
            max_price=max_price,
            in_stock=in_stock,
        )
    except FilterError as exc:
        raise click.UsageError(exc.message) from exc
    if video_ref is not None and not filters.empty:
        raise click.UsageError("the filters are for --text and --image")
    if video_ref is not None and no_detect:
        raise click.UsageError("--no-detect is for --image (set FLICKD_DETECTOR_MODEL=none)")
    settings = current_settings(schema=True)  # read only once the query is known to be valid
    service = SearchService(settings)
    if video_ref is not None:
        _search_video(video_ref, service, settings, top_k or 5, as_json)
        return
    try:
        if query_text is not None:
            response = service.search_text(query_text, top_k or 10, filters)
        else:
            image = _query_image(image_ref or "", service, settings)
            response = service.search_image(
                image, top_k or 10, detect=not no_detect, filters=filters
            )
    except (SearchUnavailable, QueryImageError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        echo_json(response.model_dump(mode="json"))
    else:
        click.echo(format_response(response))


def _search_video(ref: str, service: Any, settings: Settings, top_k: int, as_json: bool) -> None:
    """Decode, analyse and search a video; a progress bar on stderr for a long clip."""
    from flickd.core.reasons import ImageFailure
    from flickd.fetching.video import VideoLimits, open_video
    from flickd.services.search import SearchUnavailable
    from flickd.services.video import VideoSearch, format_video_result

    try:
        data = _video_bytes(ref, settings)
        with (
            open_video(data, VideoLimits.from_settings(settings)) as stream,
            _video_progress(stream, settings) as progress,
        ):
            result = VideoSearch(service).search_video(
                stream, hashlib.sha256(data).hexdigest(), top_k, progress
            )
    except ImageFailure as failure:  # VideoFailure, or the SSRF guard's and fetch's refusals
        what = failure.reason.value.replace("_", " ")
        message = f"{what}: {failure.detail}" if failure.detail else what
        raise click.ClickException(message) from None
    except SearchUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        echo_json(result.model_dump(mode="json"))
    else:
        click.echo(format_video_result(result))


def _video_bytes(ref: str, settings: Settings) -> bytes:
    """A URL is fetched through the SSRF guard (capped while it streams in); anything else is
    a local file, refused past the upload cap before it is read."""
    from flickd.core.reasons import FailureReason
    from flickd.fetching.fetch import make_session
    from flickd.fetching.video import VideoFailure, fetch_video

    if "://" in ref:
        return fetch_video(ref, make_session(settings), settings)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise click.ClickException(f"no such video file: {path}")
    size = path.stat().st_size
    if size > settings.video_max_upload_bytes:
        raise VideoFailure(
            FailureReason.TOO_LARGE,
            f"{path} is {size} bytes; the limit is {settings.video_max_upload_bytes} "
            "(FLICKD_VIDEO_MAX_UPLOAD_BYTES)",
        )
    return path.read_bytes()


@contextmanager
def _video_progress(stream: Any, settings: Settings) -> Iterator[Callable[[float], None] | None]:
    """A tqdm bar on stderr, in percent of the clip, when it is longer than
    FLICKD_VIDEO_INLINE_SECONDS (or of unknown length); nothing for a short clip."""
    duration = stream.info.duration_s
    if duration is not None and duration <= settings.video_inline_seconds:
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=100, desc="video", unit="%", file=sys.stderr, dynamic_ncols=True, leave=False
    ) as bar:

        def progress(fraction: float) -> None:
            bar.update(round(100 * fraction) - bar.n)

        yield progress


def _query_image(ref: str, service: Any, settings: Settings) -> Any:
    """A URL is fetched through the SSRF guard; anything else is a local file."""
    from flickd.services.search import decode_query_image

    if ref.lower().startswith(("http://", "https://")):
        return service.fetch_image(ref)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise click.ClickException(f"no such image file: {path}")
    return decode_query_image(path.read_bytes(), settings)


@click.command()
@click.argument("product_id")
@click.option("--catalog", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@needs_schema
def show(settings: Settings, product_id: str, catalog: str, as_json: bool) -> None:
    """A product's images and crops: label, colour, prompt, score, box."""
    from db.products import product_details
    from db.session import session_scope

    with session_scope(settings) as session:
        details = product_details(session, product_id, catalog)
    if details is None:
        raise click.ClickException(f"no product {product_id!r} in catalog {catalog!r}")
    if as_json:
        echo_json(details)
        return
    click.echo(
        f"{details['product_id']}: {details['title'] or ''}  "
        f"[{details['brand'] or '-'} / {details['category'] or '-'}]"
    )
    click.echo(f"  {_listing(details)}")
    for image in details["images"]:
        size = f"{image['width']}x{image['height']}" if image["width"] else ""
        reason = (
            f" {image['failure_reason']}: {image['failure_detail']}"
            if image["failure_reason"]
            else ""
        )
        served = (
            f" retired {image['retired_at']}"
            if image["retired_at"]
            else f" superseded {image['superseded_at']} (served until its successor is analysed)"
            if image["superseded_at"]
            else ""
        )
        click.echo(
            f"  image {image['image_id']} {image['state']} {size} {image['url']}{reason}{served}"
        )
        for crop in image["crops"]:
            box = ",".join(f"{v:.0f}" for v in crop["box"])
            score = f"{crop['score']:.2f}" if crop["score"] is not None else "whole"
            click.echo(
                f"    #{crop['index']} {crop['fine_label'] or '?'} ({crop['coarse_label'] or '?'})"
                f" {crop['colour']} {crop['colour_rgb']} score={score} box={box}"
            )
            click.echo(f'       "{crop["prompt"]}"')


def _listing(details: dict[str, Any]) -> str:
    """``listed`` or ``DELISTED since …``, then the stock state and the price."""
    listing = (
        "listed"
        if details["listed"]
        else f"DELISTED since {details['delisted_at']} (not in search)"
    )
    stock = {True: "in stock", False: "out of stock", None: "stock unknown"}[details["in_stock"]]
    price = details["price"]
    shown = "no price" if price is None else f"{price:.2f} {details['currency'] or ''}".strip()
    return f"{listing}; {stock}; {shown}"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="API processes on this port; they share the memory-mapped index, and torch's threads "
    "are split between them unless FLICKD_TORCH_THREADS says otherwise",
)
@needs_schema
def api(settings: Settings, host: str, port: int, workers: int) -> None:
    """Serve the search API, its OpenAPI docs (/docs) and the web page (/)."""
    import uvicorn

    from flickd.cli import preflight

    preflight.require(preflight.for_api(settings))
    if workers > 1 and settings.torch_threads is None:
        # Each process would otherwise start one torch thread per core: N processes on C
        # cores would run N x C threads and slow each other down.
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["FLICKD_TORCH_THREADS"] = str(threads)
    uvicorn.run(
        "flickd.services.api:create_default_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
    )


def register(main: click.Group) -> None:
    for command in (search, api, show):
        main.add_command(command)


# --- plain-text rendering (``flickd search``) ------------------------------------------------
def format_response(response: SearchResponse) -> str:
    """Results grouped by product, one line each: rank, score, match, product, crop."""
    lines = [
        f"model {response.model_version} · {response.index_vectors} indexed crops · "
        f"{response.took_ms:.0f} ms"
    ]
    if response.filters:
        lines.append("filters: " + ", ".join(f"{k}={v}" for k, v in response.filters.items()))
    lines.extend(f"note: {note}" for note in response.notes)
    for number, item in enumerate(response.items, start=1):
        if response.kind == "image":
            lines.append(_item_heading(number, item))
        if not item.results:
            lines.append("   no matching products")
        for rank, hit in enumerate(item.results, start=1):
            crop = " ".join(part for part in (hit.colour, hit.label) if part) or "-"
            lines.append(
                f"  {rank:>3}. {hit.score:6.3f} {hit.match.value:<7} {hit.product_id}  "
                f"{hit.title or ''} [{hit.brand or '-'} / {hit.category or '-'}]  "
                f"crop {hit.crop_id}: {crop}"
            )
    return "\n".join(lines)


def _item_heading(number: int, item: QueryItem) -> str:
    what = item.label or ("whole image" if item.whole_image else "item")
    detected = f" (detected {item.detection_score:.2f})" if item.detection_score is not None else ""
    colour = f", {item.colour}" if item.colour else ""
    return f"item {number}: {what}{colour}{detected}"
