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
                seconds = time.perf_counter() - started
                # Imported on first use, i.e. after the worker's start-up hook has switched
                # prometheus_client to multiprocess mode (workers/control.py).
                from flickd.metrics import observe_stage

                observe_stage(self.name.removeprefix("flickd."), seconds)
                log.debug("task finished seconds=%.3f", seconds)


@shared_task(base=FlickdTask, name="flickd.download_batch", bind=True)
def download_batch(self: FlickdTask, image_ids: list[int]) -> None:
    pipeline.run_download_batch(image_ids, app_settings(self.app))


@shared_task(base=FlickdTask, name="flickd.analyze_batch", bind=True)
def analyze_batch(self: FlickdTask, image_ids: list[int]) -> None:
    pipeline.run_analyze_batch(image_ids, app_settings(self.app))


@shared_task(base=FlickdTask, name="flickd.finalize", bind=True)
def finalize(self: FlickdTask, run_id: int | None) -> None:
    from workers.finalize import finalize_run

    finalize_run(run_id, app_settings(self.app))


@shared_task(base=FlickdTask, name="flickd.embed_crops", bind=True)
def embed_crops(self: FlickdTask, crop_ids: list[int], version_id: int) -> None:
    from workers.finalize import embed_crops as embed

    embed(crop_ids, version_id, app_settings(self.app))
