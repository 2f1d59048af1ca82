"""Looking things up: ``search`` (no server), ``api`` (the search server) and ``show`` (one
product's images and crops)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from flickd.cli.context import current_settings, echo_json, needs_schema
from flickd.core.settings import Settings


@click.command()
@click.option("--image", "image_ref", help="Query image: a file path or an http(s) URL.")
@click.option("--text", "query_text", help="Query text, e.g. 'a red summer dress'.")
@click.option("--top-k", "-k", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--no-detect", is_flag=True, help="Search with the whole image, no detection.")
@click.option("--json", "as_json", is_flag=True)
def search(
    image_ref: str | None, query_text: str | None, top_k: int, no_detect: bool, as_json: bool
) -> None:
    """Search the index by --image or --text, without a server; results grouped by product."""
    from flickd.services.search import (
        QueryImageError,
        SearchService,
        SearchUnavailable,
        format_response,
    )

    if (image_ref is None) == (query_text is None):
        raise click.UsageError("give exactly one of --image or --text")
    settings = current_settings(schema=True)  # read only once the query is known to be valid
    service = SearchService(settings)
    try:
        if query_text is not None:
            response = service.search_text(query_text, top_k)
        else:
            image = _query_image(image_ref or "", service, settings)
            response = service.search_image(image, top_k, detect=not no_detect)
    except (SearchUnavailable, QueryImageError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        echo_json(response.model_dump(mode="json"))
    else:
        click.echo(format_response(response))


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
    for image in details["images"]:
        size = f"{image['width']}x{image['height']}" if image["width"] else ""
        reason = (
            f" {image['failure_reason']}: {image['failure_detail']}"
            if image["failure_reason"]
            else ""
        )
        click.echo(f"  image {image['image_id']} {image['state']} {size} {image['url']}{reason}")
        for crop in image["crops"]:
            box = ",".join(f"{v:.0f}" for v in crop["box"])
            score = f"{crop['score']:.2f}" if crop["score"] is not None else "whole"
            click.echo(
                f"    #{crop['index']} {crop['fine_label'] or '?'} ({crop['coarse_label'] or '?'})"
                f" {crop['colour']} {crop['colour_rgb']} score={score} box={box}"
            )
            click.echo(f'       "{crop["prompt"]}"')


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@needs_schema
def api(settings: Settings, host: str, port: int) -> None:
    """Serve the search API, its OpenAPI docs (/docs) and the web page (/)."""
    import uvicorn

    from flickd.cli import preflight

    preflight.require(preflight.for_api(settings))

    uvicorn.run(
        "flickd.services.api:create_default_app",
        factory=True,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
    )


def register(main: click.Group) -> None:
    for command in (search, api, show):
        main.add_command(command)
