"""``flickd ingest``: read a feed, record its products and images, enqueue their processing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flickd.cli.context import echo_json, needs_schema
from flickd.cli.progress import follow_runs
from flickd.core.settings import Settings

if TYPE_CHECKING:
    from tqdm import tqdm

PRODUCT_COUNTS = ("created", "updated", "unchanged", "delisted", "relisted")


@click.command()
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
    "--full",
    is_flag=True,
    help="The feed is the whole catalog: products of the catalog it does not name are "
    "delisted (refused when it is empty, cut short or would delist more than "
    "FLICKD_MAX_DELIST_SHARE of the catalog). Without it the feed is a delta.",
)
@click.option(
    "--force",
    is_flag=True,
    help="With --full: delist even when the guards would refuse (an empty feed, a large share).",
)
@click.option(
    "--wait/--no-wait",
    default=False,
    help="Distributed mode: follow the run until every image is done.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@needs_schema
def ingest(
    settings: Settings,
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
    full: bool,
    force: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Read FEED, record its products and images, and enqueue their processing."""
    from flickd.cli import preflight
    from producer.feeds import FeedColumns, estimate_rows
    from producer.ingest import ingest as run_ingest

    if force and not full:
        raise click.UsageError("--force is for --full feeds (a delta never delists by itself)")

    # Fail before the first row, not after the last download: database, broker, models.
    preflight.require(preflight.for_ingest(settings))

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
        full=full,
        force=force,
        on_progress=(lambda _s, n: progress.update(n)) if progress else None,
    )
    if progress:
        progress.close()
    if wait and not settings.embedded and summary.error is None:
        follow_runs(settings, [summary.run_id], bars=not as_json and sys.stderr.isatty())
    result = summary.to_dict()
    result.update(_final_status(summary.run_id, settings))
    if as_json:
        echo_json(result)
    else:
        _print_summary(result)
    if summary.error or summary.sync_refused:
        sys.exit(2)


def _progress_bar(total: int | None, quiet: bool) -> tqdm | None:
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
    if result.get("sync_refused"):
        click.echo(f"  refused          {result['sync_refused']}", err=True)
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
    for reason, count in sorted(result.get("notes_by_reason", {}).items()):
        click.echo(f"  kept, {reason:<18}{count:>6,}  (see rejected_rows)")
    products = result["products"]
    click.echo(
        f"  products ({'full' if result['full'] else 'delta'})  "
        + ", ".join(f"{name} {products[name]:,}" for name in PRODUCT_COUNTS)
    )
    click.echo(f"  enqueued         {result['enqueued']:>10,}  in {result['messages']:,} messages")
    if result.get("not_sent"):
        click.echo(
            f"  not yet sent     {result['not_sent']:>10,}  the broker was unreachable "
            f"({result['broker_error']}); they are recorded and the reconciler sends them "
            "once it is back (`flickd scheduler`, or `flickd reconcile` by hand)",
            err=True,
        )
    if result.get("images_by_state"):
        states = ", ".join(f"{k} {v:,}" for k, v in sorted(result["images_by_state"].items()))
        click.echo(f"  images           {states}")
    if result.get("failures_by_reason"):
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(result["failures_by_reason"].items()))
        click.echo(f"  failures         {reasons}")


def register(main: click.Group) -> None:
    main.add_command(ingest)
