"""The ``flickd`` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from db.migrate import ensure_schema
from flickd.cli import ops as cli_ops
from flickd.core.logs import configured_settings, setup_logging
from flickd.core.settings import Settings


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
@click.version_option(package_name="flickd")
def main() -> None:
    """flickd: catalog feeds in, searchable visual index out."""


# --- database ---------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply schema migrations (Postgres or SQLite)."""
    from db.migrate import current_revision, upgrade

    settings = configured_settings()
    upgrade(settings, revision)
    click.echo(f"database at revision {current_revision(settings)}")


# --- producer ---------------------------------------------------------------------------------
@main.command()
@click.argument("feed", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--id-column", default="product_id", show_default=True)
@click.option("--url-column", default="image_url", show_default=True)
@click.option("--title-column", default="title", show_default=True)
@click.option("--brand-column", default="brand", show_default=True)
@click.option("--category-column", default="category", show_default=True)
@click.option("--price-column", default="price", show_default=True)
@click.option(
    "--url-separator",
    default="|",
    show_default=True,
    help="Separator of several image URLs in one cell.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "tsv", "jsonl", "parquet", "xlsx"]),
    help="Feed format (default: from the file name).",
)
@click.option(
    "--catalog",
    default="default",
    show_default=True,
    help="Catalog name: product ids are unique within a catalog.",
)
@click.option(
    "--wait/--no-wait",
    default=False,
    help="Distributed mode: follow the run until every image is done.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def ingest(
    feed: Path,
    id_column: str,
    url_column: str,
    title_column: str,
    brand_column: str,
    category_column: str,
    price_column: str,
    url_separator: str,
    fmt: str | None,
    catalog: str,
    wait: bool,
    as_json: bool,
) -> None:
    """Read FEED, record its products and images, and enqueue their processing."""
    from producer.feeds import FeedColumns, estimate_rows
    from producer.ingest import ingest as run_ingest

    settings = configured_settings()
    ensure_schema(settings)
    columns = FeedColumns(
        id=id_column,
        url=url_column,
        title=title_column or None,
        brand=brand_column or None,
        category=category_column or None,
        price=price_column or None,
        url_separator=url_separator or None,
    )
    progress = _progress_bar(estimate_rows(feed) if feed.exists() else None, as_json)
    summary = run_ingest(
        feed,
        settings,
        columns=columns,
        catalog=catalog,
        fmt=fmt,
        on_progress=(lambda _s, n: progress.update(n)) if progress else None,
    )
    if progress:
        progress.close()
    if wait and not settings.embedded and summary.error is None:
        _follow(summary.run_id, settings, quiet=as_json)
    result = summary.to_dict()
    result.update(_final_status(summary.run_id, settings))
    if as_json:
        _echo_json(result)
    else:
        _print_summary(result)
    if summary.error:
        sys.exit(2)


def _progress_bar(total: int | None, quiet: bool):  # type: ignore[no-untyped-def]
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc="ingest", file=sys.stderr)


def _final_status(run_id: int, settings: Settings) -> dict[str, Any]:
    from db.runs import run_progress
    from db.session import session_scope

    with session_scope(settings) as session:
        progress = run_progress(session, run_id)
    if progress is None:
        return {}
    return {
        "status": progress.status,
        "images_by_state": progress.images_by_state,
        "failures_by_reason": progress.failures_by_reason,
    }


def _print_summary(result: dict[str, Any]) -> None:
    click.echo(f"run {result['run_id']}: {result['status']}  ({result['feed']})")
    if result.get("error"):
        click.echo(f"  error: {result['error']}")
    click.echo(f"  rows read        {result['rows']:>10,}")
    click.echo(f"  accepted images  {result['accepted']:>10,}")
    click.echo(f"  invalid rows     {result['invalid']:>10,}")
    for reason, count in sorted(result["invalid_by_reason"].items()):
        click.echo(f"    {reason:<18} {count:>8,}")
    click.echo(
        f"  duplicates       {result['duplicates']:>10,}"
        f"  (in feed {result['duplicates_in_feed']:,}, already known "
        f"{result['already_known']:,})"
    )
    click.echo(f"  enqueued         {result['enqueued']:>10,}  in {result['messages']:,} messages")
    if result.get("images_by_state"):
        states = ", ".join(f"{k} {v:,}" for k, v in sorted(result["images_by_state"].items()))
        click.echo(f"  images           {states}")
    if result.get("failures_by_reason"):
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(result["failures_by_reason"].items()))
        click.echo(f"  failures         {reasons}")


def _follow(
    run_id: int, settings: Settings, quiet: bool, poll: float = 1.0, timeout: float | None = None
) -> str:
    """Poll the run until it is done (or cancelled/failed), showing a progress bar."""
    from db.runs import run_progress
    from db.schema import RunStatus
    from db.session import session_scope

    bar = None
    started = time.monotonic()
    while True:
        with session_scope(settings) as session:
            progress = run_progress(session, run_id)
        assert progress is not None
        done = progress.images_total - progress.images_by_state.get("queued", 0)
        if settings.last_stage == "analyze":
            done -= progress.images_by_state.get("downloaded", 0)
        if not quiet and sys.stderr.isatty():
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(
                    total=progress.images_total, unit="img", desc=f"run {run_id}", file=sys.stderr
                )
            bar.n = done
            bar.refresh()
        if progress.status in (RunStatus.DONE, RunStatus.FAILED, RunStatus.CANCELLED):
            if bar:
                bar.close()
            return progress.status
        if timeout is not None and time.monotonic() - started > timeout:
            raise click.ClickException(f"run {run_id} not finished after {timeout:.0f}s")
        time.sleep(poll)


# --- operators --------------------------------------------------------------------------------
def _resolve_run(session: Any, run: int | None) -> int:
    from db.runs import latest_run_id

    run_id = run if run is not None else latest_run_id(session)
    if run_id is None:
        raise click.ClickException("no ingest run recorded yet")
    return run_id


@main.command()
@click.argument("run", type=int, required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Live progress, rate and ETA until the run finishes.")
def status(run: int | None, as_json: bool, watch: bool) -> None:
    """Images per state, failures per reason and rate of RUN (default: the latest run)."""
    from db.runs import run_progress
    from db.session import session_scope

    settings = configured_settings()
    ensure_schema(settings)
    if watch:
        cli_ops.watch_runs(settings, run)
    with session_scope(settings) as session:
        progress = run_progress(session, _resolve_run(session, run))
    if progress is None:
        raise click.ClickException(f"no run {run}")
    if as_json:
        _echo_json(progress.to_dict())
        return
    click.echo(f"run {progress.run_id}: {progress.status}  ({progress.feed})")
    click.echo(
        f"  rows {progress.rows_read:,}, accepted {progress.accepted:,}, invalid "
        f"{progress.invalid:,}, enqueued {progress.enqueued:,}"
    )
    for state, count in sorted(progress.images_by_state.items()):
        click.echo(f"  {state:<12} {count:>10,}")
    for reason, count in sorted(progress.failures_by_reason.items()):
        click.echo(f"    failed: {reason:<20} {count:>8,}")
    if progress.images_per_second:
        click.echo(f"  rate {progress.images_per_second:,.1f} images/s")


@main.command()
@click.argument("run", type=int, required=False)
@click.option("--reason", help="Only this failure reason.")
@click.option("--limit", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
def failures(run: int | None, reason: str | None, limit: int | None, as_json: bool) -> None:
    """Failed images of RUN (default: the latest run): URL, product, reason, detail."""
    from db.runs import failures as list_failures
    from db.session import session_scope

    settings = configured_settings()
    ensure_schema(settings)
    with session_scope(settings) as session:
        rows = list_failures(session, _resolve_run(session, run), reason, limit)
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        click.echo(
            f"{row['reason']:<20} {row['product_id']:<20} {row['url']}  {row['detail'] or ''}"
        )
    click.echo(f"{len(rows)} failed image(s)")


@main.command()
@click.argument("run", type=int, required=False)
@click.option("--reason", help="Only images that failed with this reason.")
@click.option("--all-runs", is_flag=True, help="Failed images of every run.")
def retry(run: int | None, reason: str | None, all_runs: bool) -> None:
    """Re-enqueue failed images of RUN (default: the latest run)."""
    from db.runs import reset_failed
    from db.session import session_scope
    from flickd.core.broker import DOWNLOAD_TASK, enqueue

    settings = configured_settings()
    ensure_schema(settings)
    with session_scope(settings) as session:
        run_id = None if all_runs else _resolve_run(session, run)
        ids = reset_failed(session, run_id, reason)
    messages = enqueue(DOWNLOAD_TASK, ids, settings.download_batch_size, settings)
    click.echo(f"re-enqueued {len(ids)} image(s) in {messages} message(s)")


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--queues",
    "-Q",
    default="download",
    show_default=True,
    help="download, gpu, or both (comma-separated).",
)
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=None,
    help="Worker processes (gpu queue: always 1 per GPU, solo pool).",
)
@click.option("--hostname", "-n", default=None)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    queues: str, concurrency: int | None, hostname: str | None, celery_args: tuple[str, ...]
) -> None:
    """Start a Celery worker (runs `celery -A workers.app worker` with flickd's defaults)."""
    settings = configured_settings()
    if settings.embedded:
        raise click.ClickException("FLICKD_BROKER_URL is not set: embedded mode needs no worker")
    from flickd.core.broker import get_app

    argv = ["worker", "-Q", queues, "--loglevel", settings.log_level]
    if "gpu" in queues.split(","):
        # One model copy per GPU: a solo pool keeps the weights in the one process that loaded
        # them, and CUDA must not be initialised before a fork.
        argv += ["--pool", "solo"]
    elif concurrency:
        argv += ["--concurrency", str(concurrency)]
    if hostname:
        argv += ["--hostname", hostname]
    argv += list(celery_args)
    get_app(settings).worker_main(argv)


@main.command()
@click.argument("product_id")
@click.option("--catalog", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def show(product_id: str, catalog: str, as_json: bool) -> None:
    """A product's images and crops: label, colour, prompt, score, box."""
    from db.products import product_details
    from db.session import session_scope

    settings = configured_settings()
    ensure_schema(settings)
    with session_scope(settings) as session:
        details = product_details(session, product_id, catalog)
    if details is None:
        raise click.ClickException(f"no product {product_id!r} in catalog {catalog!r}")
    if as_json:
        _echo_json(details)
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


@main.command()
@click.option("--json", "as_json", is_flag=True)
def finetune(as_json: bool) -> None:
    """Fine-tune CLIP on the catalog now; if it retrieves better, re-embed and re-index."""
    from workers.finalize import finetune_now, start_reembed

    settings = configured_settings()
    ensure_schema(settings)
    result = finetune_now(settings)
    summary: dict[str, Any] = {
        "version_id": result.version_id,
        "promoted": result.promoted,
        "score_before": result.score_before,
        "score_after": result.score_after,
        "before": result.before,
        "after": result.after,
        "model_dir": str(result.out_dir),
        "report": str(result.report_png),
    }
    if result.promoted:
        summary["reembedding_crops"] = start_reembed(result.version_id, settings)
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"model version {result.version_id} in {result.out_dir}")
    for task in ("text_to_image", "image_to_image"):
        before, after = result.before.get(task, {}), result.after.get(task, {})
        click.echo(
            f"  {task:<15} recall@5 {before.get('recall@5', float('nan')):.3f} -> "
            f"{after.get('recall@5', float('nan')):.3f}"
        )
    if result.promoted:
        click.echo(
            f"promoted: re-embedding {summary['reembedding_crops']} crops, then the index "
            "switches to it"
        )
    else:
        click.echo("not promoted: retrieval did not improve enough; the active model stays")


@main.group()
def index() -> None:
    """The FAISS index."""


@index.command("build")
def index_build() -> None:
    """Build the index of the active embedder from the database and switch to it."""
    from db.session import session_scope
    from db.versions import active_embedder
    from workers.finalize import refresh_index

    settings = configured_settings()
    ensure_schema(settings)
    with session_scope(settings) as session:
        if active_embedder(session) is None:
            raise click.ClickException("nothing to index yet: no image has been analysed")
    path = refresh_index(settings)
    if path is None:
        click.echo(
            "crops lack embeddings under the active model: re-embedding queued; the "
            "index is built when it finishes"
        )
    else:
        click.echo(f"index written: {path}")


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("flickd-demo"),
    show_default=True,
)
@click.option("--products", type=int, default=100, show_default=True)
@click.option(
    "--detector/--no-detector",
    default=False,
    show_default=True,
    help="Use the offline (random-weight) detector; its boxes carry no meaning.",
)
def demo(out_dir: Path, products: int, detector: bool) -> None:
    """The whole pipeline on the embedded default with offline models, in one command."""
    from flickd.cli.demo import run_demo

    setup_logging("WARNING")
    result = run_demo(out_dir, products=products, detector=detector)
    summary = result.summary
    click.echo(
        f"ingested {summary['accepted']} images of {products} products: "
        f"{summary.get('images_by_state') or summary['status']}"
    )
    if result.finalize:
        before = result.finalize.get("before", {}).get("text_to_image", {}).get("recall@5")
        after = result.finalize.get("after", {}).get("text_to_image", {}).get("recall@5")
        click.echo(
            f"fine-tuned CLIP: held-out text->image recall@5 {before} -> {after}, "
            f"{'promoted' if result.finalize.get('promoted') else 'not promoted'}"
        )
    for search in result.searches:
        top = search["hits"][0] if search["hits"] else None
        found = f"{top['product_id']} {top['score']:.3f} {top['match']}" if top else "nothing"
        click.echo(f"  {search['query']!r}: {found}")
    click.echo(f"report: {result.report}  ({result.seconds:.0f} s)")


@main.group()
def models() -> None:
    """ML models."""


@models.command("build")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--size", type=click.Choice(["tiny", "base"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def models_build(out_dir: Path, size: str, seed: int) -> None:
    """Build offline detector and CLIP models (seeded random weights) into OUT_DIR."""
    from models.build import build_offline_models

    paths = build_offline_models(out_dir, size, seed)  # type: ignore[arg-type]
    click.echo(f"FLICKD_DETECTOR_MODEL={paths['detector']}")
    click.echo(f"FLICKD_EMBEDDING_MODEL={paths['clip']}")


cli_ops.register(main)


# --- search --------------------------------------------------------------------------------------
@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
def api(host: str, port: int) -> None:
    """Serve the search API, its OpenAPI docs (/docs) and the web page (/)."""
    import uvicorn

    settings = configured_settings()
    ensure_schema(settings)
    uvicorn.run(
        "flickd.services.api:create_default_app",
        factory=True,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
    )


@main.command()
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
    settings = configured_settings()
    ensure_schema(settings)
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
        _echo_json(response.model_dump(mode="json"))
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


if __name__ == "__main__":
    main()
