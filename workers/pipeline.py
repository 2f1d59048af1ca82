"""How the stages hand work on: enqueue in batches, run a stage, pass survivors to the next,
finish the run when its last image is done. Plain functions: tasks.py only wraps them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from sqlalchemy import select, update

from db.runs import finish_run_if_complete
from db.schema import Image, ImageState
from db.session import session_scope
from flickd.settings import Settings
from workers.app import get_app

log = logging.getLogger(__name__)

DOWNLOAD_TASK = "flickd.download_batch"
ANALYZE_TASK = "flickd.analyze_batch"
FINALIZE_TASK = "flickd.finalize"
EMBED_TASK = "flickd.embed_crops"


def batched(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def enqueue(
    task_name: str,
    ids: Sequence[int],
    batch_size: int,
    settings: Settings,
    extra_args: Sequence[object] = (),
) -> int:
    """Send ``ids`` to ``task_name`` in batches over one broker connection; return #messages.

    Call only after the transaction that wrote the rows has committed: a fast worker must
    never look for rows that are not visible yet."""
    if not ids:
        return 0
    import workers.tasks  # noqa: F401  (registers the tasks with the app)

    app = get_app(settings)
    task = app.tasks[task_name]
    messages = 0
    if settings.embedded:
        for batch in batched(ids, batch_size):
            task.apply_async(args=[batch, *extra_args])
            messages += 1
        return messages
    with app.producer_or_acquire() as producer:
        for batch in batched(ids, batch_size):
            task.apply_async(args=[batch, *extra_args], producer=producer)
            messages += 1
    return messages


def finish_runs(run_ids: Iterable[int | None], settings: Settings) -> list[int]:
    finished = []
    for run_id in {r for r in run_ids if r is not None}:
        with session_scope(settings) as session:
            if finish_run_if_complete(session, run_id, settings.last_stage):
                finished.append(run_id)
    for run_id in finished:
        log.info("run finished run_id=%s", run_id)
        if settings.last_stage == "analyze" and settings.finalize != "off":
            _queue_finalize(run_id, settings)
    return finished


def _queue_finalize(run_id: int, settings: Settings) -> None:
    """Send the run's one final task (this caller closed the run, so nobody else does)."""
    from db.schema import IngestRun

    with session_scope(settings) as session:
        session.execute(
            update(IngestRun).where(IngestRun.id == run_id).values(finalize_status="queued")
        )
    import workers.tasks  # noqa: F401  (registers the tasks with the app)

    get_app(settings).tasks[FINALIZE_TASK].apply_async(args=[run_id])


def run_download_batch(image_ids: list[int], settings: Settings) -> None:
    from workers.download import download_batch

    download_batch(image_ids, settings)
    # Read the batch back rather than trusting this delivery's outcomes: if an earlier delivery
    # stored the images and died before handing them on, this one must hand them on.
    with session_scope(settings) as session:
        rows = session.execute(
            select(Image.id, Image.run_id, Image.state).where(Image.id.in_(image_ids))
        ).all()
    if settings.last_stage == "analyze":
        ready = [row.id for row in rows if row.state == ImageState.DOWNLOADED.value]
        enqueue(ANALYZE_TASK, ready, settings.analyze_batch_size, settings)
    finish_runs((row.run_id for row in rows), settings)


def run_analyze_batch(image_ids: list[int], settings: Settings) -> None:
    from workers.vision import analyze_batch

    report = analyze_batch(image_ids, settings)
    finish_runs(report.run_ids, settings)
