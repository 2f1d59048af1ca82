"""Operator commands: ``db upgrade``, ``worker``, ``flower``, ``metrics``, ``pause``, ``resume``,
``cancel`` and ``reprocess``. ``register(main)`` adds them to the CLI.

The commands are thin: the work is done by plain functions in db/migrate.py, workers/control.py
and flickd/services/metrics.py, which tests call directly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from flickd.cli.context import needs_schema, pass_settings
from flickd.core.settings import Settings

if TYPE_CHECKING:
    from workers.control import QueueCommand

QUEUE_NAMES = ("download", "gpu")


def _require_broker(settings: Settings, what: str) -> None:
    if settings.embedded:
        raise click.ClickException(f"FLICKD_BROKER_URL is not set: embedded mode has no {what}")


@contextmanager
def _control_errors() -> Iterator[None]:
    from workers.control import ControlError

    try:
        yield
    except ControlError as error:
        raise click.ClickException(str(error)) from error


# --- database ---------------------------------------------------------------------------------
@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_settings
def db_upgrade(settings: Settings, revision: str) -> None:
    """Apply schema migrations (Postgres or SQLite)."""
    from db.migrate import current_revision, upgrade

    upgrade(settings, revision)
    click.echo(f"database at revision {current_revision(settings)}")


# --- services ---------------------------------------------------------------------------------
@click.command(context_settings={"ignore_unknown_options": True})
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
@click.option(
    "--hostname",
    "-n",
    default=None,
    help="Node name. Default: the queues and the host (download@%h, gpu@%h), so that a "
    "download and a gpu worker on one machine show up as two nodes in Flower.",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@pass_settings
def worker(
    settings: Settings,
    queues: str,
    concurrency: int | None,
    hostname: str | None,
    celery_args: tuple[str, ...],
) -> None:
    """Start a Celery worker (runs `celery -A workers.app worker` with flickd's defaults)."""
    if settings.embedded:
        raise click.ClickException("FLICKD_BROKER_URL is not set: embedded mode needs no worker")
    from flickd.cli import preflight
    from flickd.core.broker import get_app

    # A worker that could not work refuses to start, in one line, instead of retrying the
    # broker forever or failing every batch on a missing model.
    preflight.require(preflight.for_worker(settings, queues))

    argv = ["worker", "-Q", queues, "--loglevel", settings.log_level]
    if "gpu" in queues.split(","):
        # One model copy per GPU: a solo pool keeps the weights in the one process that loaded
        # them, and CUDA must not be initialised before a fork.
        argv += ["--pool", "solo"]
    elif concurrency:
        argv += ["--concurrency", str(concurrency)]
    argv += ["--hostname", hostname or default_node_name(queues)]
    argv += list(celery_args)
    get_app(settings).worker_main(argv)


def default_node_name(queues: str) -> str:
    """``download@%h``, ``gpu@%h``, ``download-gpu@%h``: Celery's own default is
    ``celery@%h`` for every worker, and nodes of one name on one host are one node to Flower."""
    names = sorted({q.strip() for q in queues.split(",") if q.strip()})
    return f"{'-'.join(names) or 'worker'}@%h"


def _flower_auth(settings: Settings) -> str:
    auth = settings.flower_basic_auth or ""
    user, _, password = auth.partition(":")
    if not user or not password:
        raise click.ClickException(
            "FLICKD_FLOWER_BASIC_AUTH=user:password is required: Flower can revoke tasks and "
            "shut workers down, so it is never served without credentials"
        )
    if "," in auth:
        # Flower splits its basic-auth option on commas (a list of credentials).
        raise click.ClickException("FLICKD_FLOWER_BASIC_AUTH must not contain a comma")
    return auth


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="0.0.0.0 in a container.")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@pass_settings
def flower(settings: Settings, port: int, address: str, flower_args: tuple[str, ...]) -> None:
    """Start Flower, the Celery dashboard, behind basic auth (FLICKD_FLOWER_BASIC_AUTH)."""
    _require_broker(settings, "workers to watch")
    auth = _flower_auth(settings)
    from flickd.core.broker import get_app

    # Passed in-process (not on a command line), so the password never shows in `ps`.
    argv = ["flower", f"--basic-auth={auth}", f"--port={port}", f"--address={address}"]
    get_app(settings).start([*argv, *flower_args])


@click.command()
@click.option("--port", type=int, default=9108, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="0.0.0.0 in a container.")
@needs_schema
def metrics(settings: Settings, port: int, address: str) -> None:
    """Serve Prometheus metrics (queues, images per state, failures, model, index) on /metrics."""
    from flickd.services.metrics import serve_metrics

    serve_metrics(settings, port, address)


# --- pause / resume ---------------------------------------------------------------------------
def _echo_queue_command(result: QueueCommand) -> None:
    verb = "paused" if result.paused else "resumed"
    click.echo(f"{verb} queue {result.queue}")
    for hostname, answer in sorted(result.workers.items()):
        click.echo(f"  {hostname}: {answer}")
    if not result.workers:
        click.echo("  no worker answered; workers that start later follow the new state")


def _queue_command(
    settings: Settings,
    run: Callable[[str, Settings], QueueCommand],
    queues: tuple[str, ...],
    what: str,
) -> None:
    _require_broker(settings, what)
    with _control_errors():
        for queue in queues or QUEUE_NAMES:
            _echo_queue_command(run(queue, settings))


@click.command()
@click.option(
    "--queue",
    "queues",
    type=click.Choice(QUEUE_NAMES),
    multiple=True,
    help="Queue to pause (repeatable; default: all).",
)
@pass_settings
def pause(settings: Settings, queues: tuple[str, ...]) -> None:
    """Stop the workers taking messages from a queue; nothing is lost, the messages wait in
    Redis. Running tasks finish. Workers started while paused do not consume it either."""
    from workers.control import pause_queue

    _queue_command(settings, pause_queue, queues, "queues to pause")


@click.command()
@click.option(
    "--queue",
    "queues",
    type=click.Choice(QUEUE_NAMES),
    multiple=True,
    help="Queue to resume (repeatable; default: all).",
)
@click.option("--run", "run_id", type=int, default=None, help="Instead: resume this cancelled run.")
@pass_settings
def resume(settings: Settings, queues: tuple[str, ...], run_id: int | None) -> None:
    """Let the workers started for a queue take its messages again; with --run, resume a
    cancelled run (it then finishes and finalizes like any other)."""
    if run_id is not None:
        from db.migrate import ensure_schema
        from workers.control import resume_run

        ensure_schema(settings)
        with _control_errors():
            result = resume_run(run_id, settings)
        click.echo(
            f"run {run_id} resumed: {result.images} image(s) re-enqueued "
            f"({result.analysis} straight to analysis, their bytes already stored)"
        )
        return
    from workers.control import resume_queue

    _queue_command(settings, resume_queue, queues, "queues to resume")


# --- cancel / reprocess -----------------------------------------------------------------------
@click.command()
@click.argument("run", type=int)
@click.option("--json", "as_json", is_flag=True)
@needs_schema
def cancel(settings: Settings, run: int, as_json: bool) -> None:
    """Cancel RUN: its images not yet processed fail with reason `cancelled`."""
    from workers.control import cancel_run

    with _control_errors():
        result = cancel_run(run, settings)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result), indent=2))
        return
    click.echo(
        f"run {run} cancelled (was {result.previous_status}): "
        f"{result.cancelled_images:,} image(s) will not be processed"
    )
    for state, count in sorted(result.images_by_state.items()):
        click.echo(f"  {state:<12} {count:>10,}")


@click.command()
@click.option("--all", "all_analyzed", is_flag=True, help="Every analysed image, embedded or not.")
@click.option("--run", "run_id", type=int, default=None, help="Only images of this run.")
@needs_schema
def reprocess(settings: Settings, all_analyzed: bool, run_id: int | None) -> None:
    """Re-analyse images after a model change: those lacking an embedding under the active
    embedder version (--all: every analysed image). The GPU workers embed with their
    FLICKD_EMBEDDING_MODEL; existing crops are kept."""
    from workers.control import reprocess as run_reprocess

    with _control_errors():
        result = run_reprocess(settings, run_id=run_id, all_analyzed=all_analyzed)
    scope = "every analysed image" if all_analyzed else "images missing an embedding"
    version = f" of embedder version {result.active_version}" if result.active_version else ""
    click.echo(
        f"re-analysing {result.images:,} image(s) in {result.messages:,} message(s) "
        f"({scope}{version})"
    )


def register(main: click.Group) -> None:
    for command in (db, worker, flower, metrics, pause, resume, cancel, reprocess):
        main.add_command(command)
