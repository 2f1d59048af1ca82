"""Operator control of a running pipeline: pause and resume a queue, cancel a run, re-analyse
images after a model change. Plain functions; ``flickd/cli/ops.py`` wraps them in commands.

The module is also imported by every worker (``include`` in workers/app.py) for its worker-side
parts: the remote-control commands that pause and resume consumption, the ``worker_ready`` hook
that keeps a paused queue paused in workers started later, and the per-worker metrics endpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from celery.signals import worker_init, worker_ready, worker_shutdown
from celery.worker.control import control_command
from sqlalchemy import CursorResult, and_, exists, func, select, update
from sqlalchemy.orm import Session

from db.runs import close_runs
from db.schema import Crop, Embedding, Image, ImageState, IngestRun, ModelVersion, RunStatus, utcnow
from db.session import session_scope
from db.versions import active_embedder
from flickd.core.broker import (
    ANALYZE_TASK,
    DOWNLOAD_TASK,
    QUEUES,
    app_settings,
    enqueue,
    get_app,
    send_final_tasks,
)
from flickd.core.reasons import FailureReason
from flickd.core.settings import Settings

log = logging.getLogger(__name__)

# Under the deployment's broker prefix, like Celery's own keys: deployments sharing a Redis
# pause their own queues only.
PAUSED_KEY = "{prefix}flickd:paused:{queue}"
# Seconds to collect the workers' replies to a broadcast. A solo (GPU) worker busy with a batch
# reads the broadcast only after it, when the command has expired: every worker therefore also
# polls the pause flags (PAUSE_POLL_SECONDS) and follows them.
REPLY_TIMEOUT = 2.0
PAUSE_POLL_SECONDS = 2.0
_UPDATE_CHUNK = 5000


class ControlError(Exception):
    """An operator command that cannot be carried out (the message says why)."""


# --- pause / resume ---------------------------------------------------------------------------
@dataclass
class QueueCommand:
    queue: str
    paused: bool
    # hostname -> what the worker did ("stopped consuming", "was not consuming", …)
    workers: dict[str, str] = field(default_factory=dict)


def _broker(settings: Settings) -> Any:
    if settings.embedded:
        raise ControlError("FLICKD_BROKER_URL is not set: embedded mode has no queues to pause")
    import redis

    return redis.Redis.from_url(settings.broker_url or "", socket_timeout=5)


def _check_queue(queue: str) -> None:
    if queue not in QUEUES:
        raise ControlError(f"unknown queue {queue!r} (one of {', '.join(QUEUES)})")


def _paused_key(queue: str, settings: Settings) -> str:
    return PAUSED_KEY.format(prefix=settings.broker_prefix, queue=queue)


def paused_queues(settings: Settings) -> set[str]:
    """Queues an operator paused (the flag outlives every worker: it is in Redis)."""
    if settings.embedded:
        return set()
    client = _broker(settings)
    return {q for q in QUEUES if client.exists(_paused_key(q, settings))}


def pause_queue(queue: str, settings: Settings) -> QueueCommand:
    """Stop every worker consuming ``queue``; its messages stay in Redis until resumed.

    Tasks already running finish (and hand their images on). The flag is set before the
    broadcast so that a worker starting in between still sees it at start-up."""
    _check_queue(queue)
    _broker(settings).set(_paused_key(queue, settings), "1")
    return QueueCommand(queue, True, _broadcast("flickd_pause", queue, settings))


def resume_queue(queue: str, settings: Settings) -> QueueCommand:
    """Let the workers started for ``queue`` consume it again."""
    _check_queue(queue)
    _broker(settings).delete(_paused_key(queue, settings))
    return QueueCommand(queue, False, _broadcast("flickd_resume", queue, settings))


def _broadcast(command: str, queue: str, settings: Settings) -> dict[str, str]:
    replies = get_app(settings).control.broadcast(
        command, arguments={"queue": queue}, reply=True, timeout=REPLY_TIMEOUT
    )
    workers: dict[str, str] = {}
    for reply in replies or []:
        for hostname, answer in reply.items():
            workers[hostname] = str(answer.get("ok") or answer.get("error") or answer)
    return workers


# Custom remote-control commands rather than Celery's add_consumer/cancel_consumer: those act on
# every worker that hears them, so resuming "gpu" would make download workers (prefork, no GPU)
# start taking analysis batches. These act only on workers started for the queue.
@control_command(args=[("queue", str)], signature="<queue>")
def flickd_pause(state: Any, queue: str, **_: Any) -> dict[str, str]:
    consumer = state.consumer
    if not consumer.task_consumer or not consumer.task_consumer.consuming_from(queue):
        return {"ok": f"was not consuming {queue}"}
    consumer.call_soon(consumer.cancel_task_queue, queue)
    return {"ok": f"stopped consuming {queue}"}


@control_command(args=[("queue", str)], signature="<queue>")
def flickd_resume(state: Any, queue: str, **_: Any) -> dict[str, str]:
    consumer = state.consumer
    if queue not in getattr(consumer, "flickd_queues", ()):
        return {"ok": f"not started for {queue}"}
    consumer.call_soon(consumer.add_task_queue, queue)
    return {"ok": f"consuming {queue}"}


@worker_ready.connect
def _follow_pause_flags_from_start(sender: Any, **_: Any) -> None:
    """A worker started while its queue is paused must not take messages from it; and a worker
    that missed a broadcast must still follow the flags, so it checks them every few seconds.

    Runs in the worker's main process before its event loop reads the first message."""
    sender.flickd_queues = frozenset(sender.app.amqp.queues.consume_from)
    follow_pause_flags(sender)
    sender.timer.call_repeatedly(PAUSE_POLL_SECONDS, follow_pause_flags, (sender,))


def follow_pause_flags(consumer: Any) -> None:
    """Consume exactly the queues this worker was started for that are not paused.

    The flags are the truth: a queue cancelled by other means (Flower's buttons) is taken up
    again here unless it is paused."""
    if consumer.task_consumer is None:  # reconnecting: the new consumer reads the selection
        return
    try:
        paused = paused_queues(app_settings(consumer.app))
    except Exception as error:  # Redis is the broker: the connection code will complain too
        log.warning("cannot read the pause flags: %s", error)
        return
    for queue in sorted(consumer.flickd_queues):
        consuming = consumer.task_consumer.consuming_from(queue)
        if queue in paused and consuming:
            consumer.cancel_task_queue(queue)
            log.warning("queue paused by an operator: not consuming queue=%s", queue)
        elif queue not in paused and not consuming:
            consumer.add_task_queue(queue)
            log.info("queue resumed: consuming queue=%s", queue)


# --- per-worker metrics -----------------------------------------------------------------------
_metrics_dir: str | None = None  # this worker's multiprocess directory, removed at shutdown


@worker_init.connect
def _serve_stage_metrics(sender: Any, **_: Any) -> None:
    """Serve this worker's per-stage histograms when FLICKD_WORKER_METRICS_PORT is set.

    Tasks run in the pool's child processes, so their observations must reach the parent that
    serves them: prometheus_client's multiprocess mode, where each process writes its values to
    files in one directory. Runs in the main process, before the pool forks."""
    global _metrics_dir
    settings = app_settings(sender.app)
    if settings.worker_metrics_port is None:
        return
    from prometheus_client import values

    # A fresh directory per worker: stale files of an earlier run would add to the counts, and
    # pids of two containers sharing a directory could collide.
    _metrics_dir = tempfile.mkdtemp(prefix="flickd-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    # The library picks the mode from that variable when first imported, and Celery's command
    # line (through Flower's plugin) has imported it already. Every metric value created from
    # now on, the stage histogram's included (its values are made on first observation, in the
    # pool processes), is built from this class, so switching it here is enough.
    values.ValueClass = values.MultiProcessValue()
    from flickd.core.timing import serve_worker_metrics

    serve_worker_metrics(settings.worker_metrics_port, _metrics_dir)
    log.info("stage metrics served port=%s", settings.worker_metrics_port)


@worker_shutdown.connect
def _remove_metrics_dir(**_: Any) -> None:
    if _metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


# --- cancel -----------------------------------------------------------------------------------
@dataclass
class CancelResult:
    run_id: int
    previous_status: str
    cancelled_images: int  # pending images now failed with reason "cancelled"
    images_by_state: dict[str, int]


CANCELLABLE = (RunStatus.RUNNING.value, RunStatus.ENQUEUED.value, RunStatus.CANCELLED.value)


def _pending_states(settings: Settings) -> tuple[str, ...]:
    if settings.last_stage == "download":
        return (ImageState.QUEUED.value,)
    return (ImageState.QUEUED.value, ImageState.DOWNLOADED.value)


def cancel_run(run_id: int, settings: Settings) -> CancelResult:
    """Cancel the run: its images still waiting for work fail with reason ``cancelled``.

    Workers only take images in ``queued``/``downloaded``, so the messages still in Redis for
    them become no-ops; images already analysed or failed keep their outcome. A run whose
    producer is still reading the feed (``running``) is marked too, but that producer enqueues
    the rows it records afterwards."""
    with session_scope(settings) as session:
        run = session.get(IngestRun, run_id, with_for_update=True)
        if run is None:
            raise ControlError(f"no run {run_id}")
        previous = run.status
        if previous not in CANCELLABLE:
            raise ControlError(f"run {run_id} is already {previous}: nothing to cancel")
        run.status = RunStatus.CANCELLED.value
        run.finished_at = run.finished_at or utcnow()
        result = cast(
            "CursorResult[Any]",
            session.execute(
                update(Image)
                .where(Image.run_id == run_id, Image.state.in_(_pending_states(settings)))
                .values(
                    state=ImageState.FAILED.value,
                    failure_reason=FailureReason.CANCELLED.value,
                    failure_detail=f"run {run_id} cancelled by an operator",
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            ),
        )
        by_state = dict(
            session.execute(
                select(Image.state, func.count())
                .where(Image.run_id == run_id)
                .group_by(Image.state)
            ).all()
        )
    log.info("run cancelled run_id=%s images=%s", run_id, result.rowcount)
    return CancelResult(run_id, previous, result.rowcount, by_state)


# --- resume a cancelled run -------------------------------------------------------------------
@dataclass
class ResumeResult:
    run_id: int
    images: int  # cancelled images sent again
    analysis: int  # of those, straight to analysis (their bytes were already stored)


def resume_run(run_id: int, settings: Settings) -> ResumeResult:
    """Resume a cancelled run: its cancelled images are due again (those whose bytes were
    already stored go straight to analysis) and the run finishes and finalizes like any other.
    Images that failed for any other reason keep their outcome."""
    with session_scope(settings) as session:
        resumed = cast(
            "CursorResult[Any]",
            session.execute(
                update(IngestRun)
                .where(IngestRun.id == run_id, IngestRun.status == RunStatus.CANCELLED.value)
                .values(
                    status=RunStatus.ENQUEUED.value,
                    finished_at=None,
                    finalize_status=None,
                    finalize_attempts=0,
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            ),
        ).rowcount
        if not resumed:
            status = session.scalar(select(IngestRun.status).where(IngestRun.id == run_id))
            raise ControlError(
                f"no run {run_id}" if status is None else f"run {run_id} is {status}, not cancelled"
            )
        cancelled = (
            (Image.run_id == run_id)
            & (Image.state == ImageState.FAILED.value)
            & (Image.failure_reason == FailureReason.CANCELLED.value)
        )
        again = {"failure_reason": None, "failure_detail": None, "stage_attempts": 0}
        to_analyze: list[int] = []
        if settings.last_stage == "analyze":
            to_analyze = list(
                session.scalars(
                    update(Image)
                    .where(cancelled, Image.blob_key.is_not(None))
                    .values(state=ImageState.DOWNLOADED.value, updated_at=utcnow(), **again)
                    .returning(Image.id)
                    .execution_options(synchronize_session=False)
                )
            )
        to_download = list(
            session.scalars(
                update(Image)
                .where(cancelled)
                .values(state=ImageState.QUEUED.value, updated_at=utcnow(), **again)
                .returning(Image.id)
                .execution_options(synchronize_session=False)
            )
        )
    # Committed: now the workers may see them. A send that fails leaves them to the reconciler.
    enqueue(DOWNLOAD_TASK, sorted(to_download), settings.download_batch_size, settings)
    enqueue(ANALYZE_TASK, sorted(to_analyze), settings.analyze_batch_size, settings)
    send_final_tasks(close_runs(settings, [run_id]), settings)  # if nothing was left to do
    log.info("run resumed run_id=%s images=%d", run_id, len(to_download) + len(to_analyze))
    return ResumeResult(run_id, len(to_download) + len(to_analyze), len(to_analyze))


# --- reprocess --------------------------------------------------------------------------------
@dataclass
class ReprocessResult:
    images: int
    messages: int
    active_version: str | None  # the embedder version whose embeddings were looked for


def _missing_embedding(version_id: int) -> Any:
    """Images with a crop that has no embedding under ``version_id``, or with no crop at all."""
    embedded = exists().where(
        Embedding.crop_id == Crop.id, Embedding.model_version_id == version_id
    )
    crop_without = exists().where(and_(Crop.image_id == Image.id, ~embedded))
    any_crop = exists().where(Crop.image_id == Image.id)
    return crop_without | ~any_crop


def images_to_reprocess(
    session: Session, run_id: int | None, all_analyzed: bool
) -> tuple[list[int], ModelVersion | None]:
    query = select(Image.id).where(Image.state == ImageState.ANALYZED.value)
    if run_id is not None:
        query = query.where(Image.run_id == run_id)
    active = active_embedder(session)
    # With no active embedder nothing has a usable embedding yet: every analysed image counts.
    if not all_analyzed and active is not None:
        query = query.where(_missing_embedding(active.id))
    return list(session.scalars(query.order_by(Image.id))), active


def _reset_to_downloaded(session: Session, ids: Sequence[int]) -> list[int]:
    """Move analysed images back to ``downloaded``; return those that moved (a worker may have
    touched one since it was selected)."""
    moved: list[int] = []
    for start in range(0, len(ids), _UPDATE_CHUNK):
        chunk = list(ids[start : start + _UPDATE_CHUNK])
        moved += session.scalars(
            update(Image)
            .where(Image.id.in_(chunk), Image.state == ImageState.ANALYZED.value)
            .values(
                state=ImageState.DOWNLOADED.value,
                analyzed_at=None,
                stage_attempts=0,  # a new round of analysis: its attempts count afresh
                last_error=None,
                updated_at=utcnow(),
            )
            .returning(Image.id)
            .execution_options(synchronize_session=False)
        ).all()
    return moved


def _reopen_runs(session: Session, ids: Sequence[int]) -> None:
    """Runs of the images go back to ``enqueued`` so that they finish (and follow up) again,
    as ``flickd retry`` does."""
    run_ids: set[int] = set()
    for start in range(0, len(ids), _UPDATE_CHUNK):
        chunk = list(ids[start : start + _UPDATE_CHUNK])
        run_ids.update(
            r
            for r in session.scalars(select(Image.run_id).where(Image.id.in_(chunk)).distinct())
            if r is not None
        )
    if run_ids:
        session.execute(
            update(IngestRun)
            .where(IngestRun.id.in_(run_ids), IngestRun.status == RunStatus.DONE.value)
            .values(status=RunStatus.ENQUEUED.value, finished_at=None)
            .execution_options(synchronize_session=False)
        )


def reprocess(
    settings: Settings, run_id: int | None = None, all_analyzed: bool = False
) -> ReprocessResult:
    """Re-analyse images after a model change: by default the analysed images that lack an
    embedding under the active embedder version, with ``all_analyzed`` every analysed image.

    Analysis is idempotent: existing crops are kept (ON CONFLICT DO NOTHING) and only missing
    embeddings are added. The workers embed with *their* FLICKD_EMBEDDING_MODEL."""
    if settings.last_stage != "analyze":
        raise ControlError("FLICKD_LAST_STAGE is 'download': analysis is switched off")
    with session_scope(settings) as session:
        ids, active = images_to_reprocess(session, run_id, all_analyzed)
        ids = _reset_to_downloaded(session, ids)
        _reopen_runs(session, ids)
        version = active.version if active else None
    # Committed: now the workers may see the images as downloaded.
    messages = enqueue(ANALYZE_TASK, ids, settings.analyze_batch_size, settings)
    log.info("reprocess enqueued images=%d messages=%d", len(ids), messages)
    return ReprocessResult(len(ids), messages, version)
