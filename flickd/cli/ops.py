"""Operator commands: ``flower``, ``metrics``, ``pause``, ``resume``, ``cancel``, ``reprocess``,
and the live view behind ``flickd status --watch``. ``register(main)`` adds them to the CLI.

The commands are thin: the work is done by plain functions in workers/control.py and
flickd/services/metrics.py, which tests call directly.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from db.migrate import ensure_schema
from flickd.core.logs import configured_settings
from flickd.core.settings import Settings

if TYPE_CHECKING:
    from db.runs import RunProgress
    from workers.control import QueueCommand

QUEUE_NAMES = ("download", "gpu")
FINISHED = ("done", "failed", "cancelled")  # RunStatus values (db.schema, not imported up here)


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


# --- services ---------------------------------------------------------------------------------
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
def flower(port: int, address: str, flower_args: tuple[str, ...]) -> None:
    """Start Flower, the Celery dashboard, behind basic auth (FLICKD_FLOWER_BASIC_AUTH)."""
    settings = configured_settings()
    _require_broker(settings, "workers to watch")
    auth = _flower_auth(settings)
    from flickd.core.broker import get_app

    # Passed in-process (not on a command line), so the password never shows in `ps`.
    argv = ["flower", f"--basic-auth={auth}", f"--port={port}", f"--address={address}"]
    get_app(settings).start([*argv, *flower_args])


@click.command()
@click.option("--port", type=int, default=9108, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="0.0.0.0 in a container.")
def metrics(port: int, address: str) -> None:
    """Serve Prometheus metrics (queues, images per state, failures, model, index) on /metrics."""
    from flickd.services.metrics import serve_metrics

    settings = configured_settings()
    ensure_schema(settings)
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
    run: Callable[[str, Settings], QueueCommand], queues: tuple[str, ...], what: str
) -> None:
    settings = configured_settings()
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
def pause(queues: tuple[str, ...]) -> None:
    """Stop the workers taking messages from a queue; nothing is lost, the messages wait in
    Redis. Running tasks finish. Workers started while paused do not consume it either."""
    from workers.control import pause_queue

    _queue_command(pause_queue, queues, "queues to pause")


@click.command()
@click.option(
    "--queue",
    "queues",
    type=click.Choice(QUEUE_NAMES),
    multiple=True,
    help="Queue to resume (repeatable; default: all).",
)
def resume(queues: tuple[str, ...]) -> None:
    """Let the workers started for a queue take its messages again."""
    from workers.control import resume_queue

    _queue_command(resume_queue, queues, "queues to resume")


# --- cancel / reprocess -----------------------------------------------------------------------
@click.command()
@click.argument("run", type=int)
@click.option("--json", "as_json", is_flag=True)
def cancel(run: int, as_json: bool) -> None:
    """Cancel RUN: its images not yet processed fail with reason `cancelled`."""
    from workers.control import cancel_run

    settings = configured_settings()
    ensure_schema(settings)
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
def reprocess(all_analyzed: bool, run_id: int | None) -> None:
    """Re-analyse images after a model change: those lacking an embedding under the active
    embedder version (--all: every analysed image). The GPU workers embed with their
    FLICKD_EMBEDDING_MODEL; existing crops are kept."""
    from workers.control import reprocess as run_reprocess

    settings = configured_settings()
    ensure_schema(settings)
    with _control_errors():
        result = run_reprocess(settings, run_id=run_id, all_analyzed=all_analyzed)
    scope = "every analysed image" if all_analyzed else "images missing an embedding"
    version = f" of embedder version {result.active_version}" if result.active_version else ""
    click.echo(
        f"re-analysing {result.images:,} image(s) in {result.messages:,} message(s) "
        f"({scope}{version})"
    )


# --- status --watch ---------------------------------------------------------------------------
def _watched_runs(settings: Settings, run_id: int | None) -> list[int]:
    """RUN, else every run still in progress, else the latest run."""
    from sqlalchemy import select

    from db.runs import latest_run_id
    from db.schema import IngestRun, RunStatus
    from db.session import session_scope

    if run_id is not None:
        return [run_id]
    with session_scope(settings) as session:
        active = list(
            session.scalars(
                select(IngestRun.id)
                .where(IngestRun.status.in_([RunStatus.RUNNING.value, RunStatus.ENQUEUED.value]))
                .order_by(IngestRun.id)
            )
        )
        latest = latest_run_id(session)
    if not active and latest is None:
        raise click.ClickException("no ingest run recorded yet")
    return active or [latest]  # type: ignore[list-item]


def _done(progress: RunProgress, settings: Settings) -> int:
    from db.runs import terminal_states

    finished = terminal_states(settings.last_stage)
    return sum(n for state, n in progress.images_by_state.items() if state in finished)


def watch_runs(settings: Settings, run_id: int | None, interval: float = 1.0) -> None:
    """Progress bars with rate and ETA, one per run, refreshed every ``interval`` seconds until
    the runs finish (or Ctrl-C)."""
    from tqdm import tqdm

    from db.runs import run_progress
    from db.session import session_scope

    run_ids = _watched_runs(settings, run_id)
    bars: dict[int, Any] = {}
    try:
        while True:
            with session_scope(settings) as session:
                progresses = [run_progress(session, r) for r in run_ids]
            for position, progress in enumerate(progresses):
                if progress is None:
                    raise click.ClickException(f"no run {run_ids[position]}")
                bar = bars.get(progress.run_id)
                if bar is None:
                    bar = bars[progress.run_id] = tqdm(
                        desc=f"run {progress.run_id}",
                        unit="img",
                        position=position,
                        file=sys.stderr,
                        dynamic_ncols=True,
                    )
                # The producer may still be adding images: the total can grow.
                bar.total = progress.images_total
                bar.update(_done(progress, settings) - bar.n)  # update() keeps rate/ETA live
                bar.set_postfix_str(progress.status, refresh=True)
            if all(p is not None and p.status in FINISHED for p in progresses):
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
    finally:
        for bar in bars.values():
            bar.close()


def register(main: click.Group) -> None:
    for command in (flower, metrics, pause, resume, cancel, reprocess):
        main.add_command(command)
