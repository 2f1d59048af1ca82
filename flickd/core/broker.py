"""The broker: the Celery app built from settings, the queue and task names, and sending work
by task name. Every layer that hands work on (the producer, the stages, the reconciler, the
operator commands) sends through here and never imports the worker code that runs it.

With no broker configured (the embedded default) tasks run in-process (``task_always_eager``):
the same task code, no servers. ``celery -A workers.app worker`` finds the app in workers/app.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from flickd.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

DOWNLOAD_QUEUE = "download"
GPU_QUEUE = "gpu"
# The reconciler's own queue, consumed by `flickd scheduler` alone: a pass must never wait
# behind a backlog of image batches.
RECONCILE_QUEUE = "reconcile"
QUEUES = (DOWNLOAD_QUEUE, GPU_QUEUE)

DOWNLOAD_TASK = "flickd.download_batch"
ANALYZE_TASK = "flickd.analyze_batch"
FINALIZE_TASK = "flickd.finalize"
EMBED_TASK = "flickd.embed_crops"
RECONCILE_TASK = "flickd.reconcile"
# A long clip's video search (flickd/services/video_jobs.py): it needs the search service, so
# it lives with the services; workers load it through ``include`` like the stage tasks.
VIDEO_SEARCH_TASK = "flickd.video_search"

TASK_QUEUES = {
    DOWNLOAD_TASK: DOWNLOAD_QUEUE,
    ANALYZE_TASK: GPU_QUEUE,
    FINALIZE_TASK: GPU_QUEUE,
    EMBED_TASK: GPU_QUEUE,
    VIDEO_SEARCH_TASK: GPU_QUEUE,
    RECONCILE_TASK: RECONCILE_QUEUE,
}

# Every message carries the moment it was sent. The reconciler reads it off the oldest message
# still waiting in a queue: work recorded before that moment, and neither done nor held by a
# worker, has lost its message (a queue is first in, first out).
ENQUEUED_AT_HEADER = "flickd_enqueued_at"

# kombu keeps a queue's higher-priority messages in sibling lists "<queue>\x06\x16<priority>";
# flickd sends none, but a backlog there must still be counted.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)

_lock = threading.Lock()
_apps: dict[str, Celery] = {}


def celery_config(settings: Settings) -> dict[str, object]:
    # Redis re-delivers a message that stays unacknowledged longer than visibility_timeout.
    # Celery reads it from the broker and the result-backend transport options; both are set
    # from the one setting so they never disagree.
    transport: dict[str, object] = {
        "visibility_timeout": settings.visibility_timeout,
        # Sweep for messages of dead workers every N seconds (kombu's default is ~100 s).
        "unacked_restore_interval": settings.redelivery_sweep_seconds,
        "unacked_restore_throttle": 1,
    }
    if settings.broker_prefix:
        transport["global_keyprefix"] = settings.broker_prefix
    return {
        "broker_url": settings.broker_url or "memory://",
        "result_backend": settings.result_backend,
        "task_always_eager": settings.embedded,
        "task_eager_propagates": True,
        # JSON only: a pickle payload from a compromised broker would execute code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # state lives in the database
        # At-least-once: acknowledge after the task ran, re-queue if the worker dies. Tasks are
        # idempotent, so a re-delivery only repeats work, never duplicates rows.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": DOWNLOAD_QUEUE,
        "task_routes": {name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        # Events for Flower: every task's life is visible to operators.
        "worker_send_task_events": True,
        # A "sent" event per message would double the producer's broker traffic at millions of
        # images; Flower shows each task from the moment a worker receives it.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        # The worker code: the tasks, and the pause/resume commands and start-up hooks. Named,
        # not imported: a worker (or an in-process run) loads them, nothing below them does.
        "include": ["workers.tasks", "workers.control", "flickd.services.video_jobs"],
        # The reconciler's schedule, run by `flickd scheduler` (Celery beat inside that worker).
        "beat_schedule": {
            "reconcile": {
                "task": RECONCILE_TASK,
                "schedule": float(settings.reconcile_interval),
                # A pass that could not start in time is replaced by the next one.
                "options": {"expires": float(settings.reconcile_interval)},
            }
        },
    }


def get_app(settings: Settings | None = None) -> Celery:
    """The Celery app for these settings (one per distinct configuration, made current)."""
    settings = settings or get_settings()
    key = settings.model_dump_json()
    with _lock:
        app = _apps.get(key)
        if app is None:
            app = Celery("flickd", set_as_current=False)
            app.conf.update(celery_config(settings))
            # Tasks read their settings from their app, so an in-process (eager) run uses
            # exactly the settings the caller passed, not whatever the environment says.
            app.flickd_settings = settings
            _apps[key] = app
        app.set_current()
        app.set_default()
    return app


def app_settings(app: Celery) -> Settings:
    return getattr(app, "flickd_settings", None) or get_settings()


def _broker_errors() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import redis.exceptions

    return (
        kombu.exceptions.OperationalError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        ConnectionError,
        TimeoutError,
    )


# What publishing raises when the broker cannot be reached (after the publish retries).
BROKER_ERRORS = _broker_errors()


def publish_retry_policy(settings: Settings) -> dict[str, float]:
    """Publishing retries while the broker is briefly away (a restart, a fail-over): kombu
    reconnects between tries. Past them the caller decides; the database still says the work
    is due, so nothing is lost either way."""
    return {
        "max_retries": settings.publish_retries,
        "interval_start": 0.5,
        "interval_step": 1.0,
        "interval_max": 5.0,
    }


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
    never look for rows that are not visible yet. Raises one of BROKER_ERRORS if the broker
    stays unreachable through the publish retries."""
    if not ids:
        return 0
    return send(task_name, [[batch, *extra_args] for batch in batched(ids, batch_size)], settings)


def send(task_name: str, messages: Sequence[Sequence[object]], settings: Settings) -> int:
    """Send one message per argument list to ``task_name``; return how many were sent."""
    if not messages:
        return 0
    app = get_app(settings)
    if settings.embedded:
        # In-process: run the registered task itself (sending by name would not run it).
        app.loader.import_default_modules()
        task = app.tasks[task_name]
        for args in messages:
            task.apply_async(args=list(args))
        return len(messages)
    headers = {ENQUEUED_AT_HEADER: time.time()}
    policy = publish_retry_policy(settings)
    with app.producer_or_acquire() as producer:
        for args in messages:
            app.send_task(
                task_name,
                args=list(args),
                producer=producer,
                headers=headers,
                retry=True,
                retry_policy=policy,
            )
    return len(messages)


def send_final_tasks(run_ids: Sequence[int], settings: Settings) -> int:
    """Send the final task of each run just closed (``db.runs.close_runs`` marked it queued
    when one is due); nothing when the settings run none. Returns how many were sent."""
    if not settings.finalize_enabled:
        return 0
    return send(FINALIZE_TASK, [[run_id] for run_id in run_ids], settings)


# --- reading the queues (metrics, the reconciler) ------------------------------------------------
def _redis(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url or "", socket_timeout=3)


def queue_lengths(settings: Settings) -> tuple[dict[str, int], int]:
    """Messages waiting per queue, and messages in flight (delivered, unacknowledged)."""
    if settings.embedded:
        return dict.fromkeys(QUEUES, 0), 0
    prefix = settings.broker_prefix  # kombu's global_keyprefix: this deployment's keys
    client = _redis(settings)
    try:
        pipe = client.pipeline(transaction=False)
        for queue in QUEUES:
            for key in (queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)):
                pipe.llen(prefix + key)
        pipe.hlen(prefix + "unacked")  # kombu's hash of delivered, unacknowledged messages
        counts = pipe.execute()
    finally:
        client.close()
    per_queue = 1 + len(_PRIORITY_STEPS)
    lengths = {q: sum(counts[i * per_queue : (i + 1) * per_queue]) for i, q in enumerate(QUEUES)}
    return lengths, int(counts[-1])


def oldest_waiting(queue: str, settings: Settings) -> datetime | None:
    """When the oldest message still waiting in ``queue`` was sent; None when it is empty.

    kombu pushes on the left and pops on the right, so the oldest message is the last element.
    A message without the header (sent by an older flickd, or by hand) counts as sent now,
    which only makes the reconciler wait longer."""
    if settings.embedded:
        return None
    client = _redis(settings)
    try:
        raw = client.lindex(settings.broker_prefix + queue, -1)
    finally:
        client.close()
    if raw is None:
        return None
    try:
        sent = float(json.loads(raw)["headers"][ENQUEUED_AT_HEADER])
    except (ValueError, KeyError, TypeError):
        sent = time.time()
    return datetime.fromtimestamp(sent, UTC)
