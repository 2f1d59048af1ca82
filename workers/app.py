"""The Celery app, built from settings. ``celery -A workers.app worker`` finds ``app`` here.

With no broker configured (the embedded default) tasks run in-process (``task_always_eager``):
the same task code, no servers.
"""

from __future__ import annotations

import threading

from celery import Celery

from flickd.settings import Settings, get_settings

DOWNLOAD_QUEUE = "download"
GPU_QUEUE = "gpu"

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
        "task_routes": {
            "flickd.download_batch": {"queue": DOWNLOAD_QUEUE},
            "flickd.analyze_batch": {"queue": GPU_QUEUE},
            "flickd.finalize": {"queue": GPU_QUEUE},
            "flickd.embed_crops": {"queue": GPU_QUEUE},
        },
        # Events for Flower: every task's life is visible to operators.
        "worker_send_task_events": True,
        # A "sent" event per message would double the producer's broker traffic at millions of
        # images; Flower shows each task from the moment a worker receives it.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        # workers.control: the pause/resume remote-control commands and worker start-up hooks.
        "include": ["workers.tasks", "workers.control"],
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
            app.flickd_settings = settings  # type: ignore[attr-defined]
            _apps[key] = app
        app.set_current()
        app.set_default()
    return app


def app_settings(app: Celery) -> Settings:
    return getattr(app, "flickd_settings", None) or get_settings()


app = get_app()
