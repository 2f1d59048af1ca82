"""Work that finishes by itself: ``reconcile`` (one pass by hand) and ``scheduler`` (the
periodic passes, as a service). See workers/reconcile.py for what a pass does."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from flickd.cli.context import echo_json, needs_schema, pass_settings
from flickd.core.settings import Settings


def _echo_report(report: object, as_json: bool) -> None:
    from workers.reconcile import ReconcileReport

    assert isinstance(report, ReconcileReport)
    if as_json:
        echo_json(report.to_dict())
        return
    if report.skipped:
        click.echo("another reconciler pass is running; nothing done")
        return
    counts = report.counts()
    click.echo(
        "re-enqueued {requeued_download} download and {requeued_analyze} analysis image(s); "
        "{exhausted} out of attempts; {runs_closed} run(s) finished; {finalize_redriven} final "
        "task(s), {builds_redriven} index build(s) and {video_jobs_redriven} video job(s) "
        "re-driven; {video_jobs_exhausted} video job(s) out of attempts; {producers_lost} lost "
        "producer(s)".format(**counts)
    )


@click.command()
@click.option("--json", "as_json", is_flag=True)
@needs_schema
def reconcile(settings: Settings, as_json: bool) -> None:
    """One reconciler pass: re-drive stalled work, finish complete runs (either mode)."""
    from workers.reconcile import reconcile_once

    _echo_report(reconcile_once(settings), as_json)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--hostname", "-n", default="scheduler@%h", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@pass_settings
def scheduler(settings: Settings, hostname: str, celery_args: tuple[str, ...]) -> None:
    """Run the reconciler every FLICKD_RECONCILE_INTERVAL seconds (Celery beat and the one
    worker of the reconcile queue, in one process). One per deployment; a second is harmless
    (passes take a lock)."""
    if settings.embedded:
        raise click.ClickException(
            "FLICKD_BROKER_URL is not set: embedded mode needs no scheduler "
            "(`flickd reconcile` runs one pass by hand)"
        )
    from flickd.core.broker import RECONCILE_QUEUE, get_app

    # Beat's schedule state is throw-away: the schedule itself comes from the settings.
    state = Path(tempfile.mkdtemp(prefix="flickd-beat-")) / "schedule"
    argv = [
        "worker",
        "--beat",
        "--schedule",
        str(state),
        "-Q",
        RECONCILE_QUEUE,
        "--pool",
        "solo",
        "--loglevel",
        settings.log_level,
        "--hostname",
        hostname,
        *celery_args,
    ]
    get_app(settings).worker_main(argv)


@click.command()
@pass_settings
def doctor(settings: Settings) -> None:
    """Check the set-up, one line each: database (reachable, schema at head), broker, storage,
    both models (loaded, one tiny forward pass), free disk, Chromium for the page tests."""
    from flickd.cli import preflight

    checks = preflight.everything(settings)
    for check in checks:
        click.echo(check.line())
    failed = [c for c in checks if not c.ok and not c.warning]
    if failed:
        code = failed[0].problem.exit_code if failed[0].problem else 1
        click.echo(f"{len(failed)} check(s) failed", err=True)
        raise SystemExit(code)


def register(main: click.Group) -> None:
    for command in (reconcile, scheduler, doctor):
        main.add_command(command)
