"""What became of the ingest runs: ``status`` (``--watch``), ``failures`` and ``retry``."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import click

from flickd.cli.context import echo_json, needs_schema
from flickd.cli.progress import follow_runs, watched_runs
from flickd.core.settings import Settings


def resolve_run(session: Any, run: int | None) -> int:
    """RUN, else the latest run."""
    from db.runs import latest_run_id

    run_id = run if run is not None else latest_run_id(session)
    if run_id is None:
        raise click.ClickException("no ingest run recorded yet")
    return run_id


@click.command()
@click.argument("run", type=int, required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Live progress, rate and ETA until the run finishes.")
@needs_schema
def status(settings: Settings, run: int | None, as_json: bool, watch: bool) -> None:
    """Images per state, failures per reason and rate of RUN (default: the latest run)."""
    from db.runs import run_progress
    from db.session import session_scope

    if watch:
        # Progress bars until the runs finish; Ctrl-C stops watching and shows the status.
        run_ids = watched_runs(settings, run)
        with suppress(KeyboardInterrupt):
            follow_runs(settings, run_ids)
    with session_scope(settings) as session:
        progress = run_progress(session, resolve_run(session, run), settings.lease_seconds)
    if progress is None:
        raise click.ClickException(f"no run {run}")
    if as_json:
        echo_json(progress.to_dict())
        return
    click.echo(f"run {progress.run_id}: {progress.status}  ({progress.feed})")
    click.echo(
        f"  rows {progress.rows_read:,}, accepted {progress.accepted:,}, invalid "
        f"{progress.invalid:,}, enqueued {progress.enqueued:,}"
    )
    kind = "full" if progress.full_feed else "delta"
    click.echo(
        f"  products ({kind}): " + ", ".join(f"{k} {v:,}" for k, v in progress.products.items())
    )
    if progress.sync_refused:
        click.echo(f"  refused: {progress.sync_refused}")
    for state, count in sorted(progress.images_by_state.items()):
        click.echo(f"  {state:<12} {count:>10,}")
    for reason, count in sorted(progress.failures_by_reason.items()):
        click.echo(f"    failed: {reason:<20} {count:>8,}")
    for state, count in sorted(progress.stuck_by_state.items()):
        click.echo(
            f"  stuck {state:<12} {count:>10,}  (no progress for {settings.lease_seconds}s: "
            "the reconciler re-drives them; `flickd retry --stuck` does it now)"
        )
    if progress.finalize_status:
        click.echo(f"  final task: {progress.finalize_status}")
    if progress.error:
        click.echo(f"  note: {progress.error}")
    if progress.images_per_second:
        click.echo(f"  rate {progress.images_per_second:,.1f} images/s")


@click.command()
@click.argument("run", type=int, required=False)
@click.option("--reason", help="Only this failure reason.")
@click.option("--limit", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@needs_schema
def failures(
    settings: Settings, run: int | None, reason: str | None, limit: int | None, as_json: bool
) -> None:
    """Failed images of RUN (default: the latest run): URL, product, reason, detail."""
    from db.runs import failures as list_failures
    from db.session import session_scope

    with session_scope(settings) as session:
        rows = list_failures(session, resolve_run(session, run), reason, limit)
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        click.echo(
            f"{row['reason']:<20} {row['product_id']:<20} {row['url']}  {row['detail'] or ''}"
        )
    click.echo(f"{len(rows)} failed image(s)")


@click.command()
@click.argument("run", type=int, required=False)
@click.option("--reason", help="Only images that failed with this reason.")
@click.option("--all-runs", is_flag=True, help="Failed images of every run.")
@click.option(
    "--stuck",
    is_flag=True,
    help="Instead: re-enqueue pending images with no progress for longer than the lease "
    "(every run), as the reconciler would, without waiting for older messages ahead of them.",
)
@needs_schema
def retry(
    settings: Settings, run: int | None, reason: str | None, all_runs: bool, stuck: bool
) -> None:
    """Re-enqueue failed images of RUN (default: the latest run), or stuck ones."""
    from db.runs import reset_failed
    from db.session import session_scope
    from flickd.core.broker import DOWNLOAD_TASK, enqueue

    if stuck:
        from workers.reconcile import reconcile_once

        report = reconcile_once(settings, ignore_queues=True)
        click.echo(
            f"re-enqueued {report.requeued['download']} stuck download and "
            f"{report.requeued['analyze']} stuck analysis image(s)"
        )
        return

    with session_scope(settings) as session:
        run_id = None if all_runs else resolve_run(session, run)
        ids = reset_failed(session, run_id, reason)
    messages = enqueue(DOWNLOAD_TASK, ids, settings.download_batch_size, settings)
    click.echo(f"re-enqueued {len(ids)} image(s) in {messages} message(s)")


def register(main: click.Group) -> None:
    for command in (status, failures, retry):
        main.add_command(command)
