"""Following ingest runs to their end: the one poller behind ``flickd ingest --wait`` and
``flickd status --watch``."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from flickd.core.settings import Settings

if TYPE_CHECKING:
    from db.runs import RunProgress

FINISHED = ("done", "failed", "cancelled")  # RunStatus values (db.schema, not imported up here)


def watched_runs(settings: Settings, run_id: int | None) -> list[int]:
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
    if active:
        return active
    if latest is None:
        raise click.ClickException("no ingest run recorded yet")
    return [latest]


def images_done(progress: RunProgress, settings: Settings) -> int:
    """Images of the run that need no more work under the pipeline's last stage."""
    from db.runs import terminal_states

    finished = terminal_states(settings.last_stage)
    return sum(n for state, n in progress.images_by_state.items() if state in finished)


def follow_runs(
    settings: Settings,
    run_ids: Sequence[int],
    *,
    bars: bool = True,
    interval: float = 1.0,
    timeout: float | None = None,
) -> dict[int, str]:
    """Poll the runs every ``interval`` seconds until each is done, failed or cancelled, and
    return their final statuses. With ``bars``, one progress bar per run on stderr, with rate,
    ETA and status. Past ``timeout`` seconds, a ClickException. Ctrl-C is left to the caller."""
    from db.runs import run_progress
    from db.session import session_scope

    started = time.monotonic()
    shown: dict[int, Any] = {}
    try:
        while True:
            with session_scope(settings) as session:
                progresses = [run_progress(session, r) for r in run_ids]
            for position, progress in enumerate(progresses):
                if progress is None:
                    raise click.ClickException(f"no run {run_ids[position]}")
                if bars:
                    _show(shown, position, progress, settings)
            if all(p is not None and p.status in FINISHED for p in progresses):
                return {p.run_id: p.status for p in progresses if p is not None}
            if timeout is not None and time.monotonic() - started > timeout:
                raise click.ClickException(
                    f"run {', '.join(map(str, run_ids))} not finished after {timeout:.0f}s"
                )
            time.sleep(interval)
    finally:
        for bar in shown.values():
            bar.close()


def _show(shown: dict[int, Any], position: int, progress: RunProgress, settings: Settings) -> None:
    bar = shown.get(progress.run_id)
    if bar is None:
        from tqdm import tqdm

        bar = shown[progress.run_id] = tqdm(
            desc=f"run {progress.run_id}",
            unit="img",
            position=position,
            file=sys.stderr,
            dynamic_ncols=True,
        )
    # The producer may still be adding images: the total can grow.
    bar.total = progress.images_total
    bar.update(images_done(progress, settings) - bar.n)  # update() keeps rate/ETA live
    bar.set_postfix_str(progress.status, refresh=True)
