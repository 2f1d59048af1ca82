"""Celery tasks: thin wrappers that call the stage functions in workers/ and db/.

``FlickdTask`` owns the cross-cutting parts: settings, log context, timing, and what happens
after a stage (enqueue the next stage, finish the run).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, shared_task
from sqlalchemy.exc import OperationalError

from flickd.logs import log_context
from workers import pipeline
from workers.app import app_settings

log = logging.getLogger(__name__)


class FlickdTask(Task):
    # Database or broker hiccups: retry the whole (idempotent) batch with backoff.
    autoretry_for = (OperationalError, ConnectionError)
    retry_backoff = True
    retry_backoff_max = 120
    retry_jitter = True
    max_retries = 8
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        with log_context(task=self.name, task_id=self.request.id):
            try:
                return super().__call__(*args, **kwargs)
            finally:
                log.debug("task finished seconds=%.3f", time.perf_counter() - started)


@shared_task(base=FlickdTask, name="flickd.download_batch", bind=True)
def download_batch(self: FlickdTask, image_ids: list[int]) -> None:
    pipeline.run_download_batch(image_ids, app_settings(self.app))


@shared_task(base=FlickdTask, name="flickd.analyze_batch", bind=True)
def analyze_batch(self: FlickdTask, image_ids: list[int]) -> None:
    pipeline.run_analyze_batch(image_ids, app_settings(self.app))
