"""Celery tasks: thin wrappers around the stage functions in workers/.

``FlickdTask`` owns each task's life: its settings, log context and timing, retries of
retryable errors, and what follows a stage (send the next stage's messages, close the runs
whose last image this was, send their final task).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, shared_task
from sqlalchemy.exc import OperationalError

from db.runs import close_runs
from flickd.core.broker import FINALIZE_TASK, app_settings, enqueue, send
from flickd.core.logs import log_context
from flickd.core.settings import Settings
from flickd.core.timing import observe_stage
from workers.stage import StageResult

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

    @property
    def settings(self) -> Settings:
        return app_settings(self.app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        with log_context(task=self.name, task_id=self.request.id):
            try:
                result = super().__call__(*args, **kwargs)
                if isinstance(result, StageResult):
                    self.hand_off(result)
                return None
            finally:
                seconds = time.perf_counter() - started
                observe_stage(self.name.removeprefix("flickd."), seconds)
                log.debug("task finished seconds=%.3f", seconds)

    def hand_off(self, result: StageResult) -> None:
        """Send the next stage its work, then close the runs this batch may have completed.

        Runs after the stage's commit, so a worker of the next stage finds its rows."""
        settings = self.settings
        if result.next_task:
            enqueue(result.next_task, result.next_ids, result.batch_size, settings)
        for run_id in close_runs(settings, result.run_ids):
            log.info("run finished run_id=%s", run_id)
            if settings.finalize_enabled:
                send(FINALIZE_TASK, [[run_id]], settings)


@shared_task(base=FlickdTask, name="flickd.download_batch", bind=True)
def download_batch(self: FlickdTask, image_ids: list[int]) -> StageResult:
    from workers.download import download_stage

    return download_stage(image_ids, self.settings)


@shared_task(base=FlickdTask, name="flickd.analyze_batch", bind=True)
def analyze_batch(self: FlickdTask, image_ids: list[int]) -> StageResult:
    from workers.vision import analyze_stage

    return analyze_stage(image_ids, self.settings)


@shared_task(base=FlickdTask, name="flickd.finalize", bind=True)
def finalize(self: FlickdTask, run_id: int | None) -> None:
    from workers.finalize import finalize_run

    finalize_run(run_id, self.settings)


@shared_task(base=FlickdTask, name="flickd.embed_crops", bind=True)
def embed_crops(self: FlickdTask, crop_ids: list[int], version_id: int) -> None:
    from workers.finalize import embed_crops as embed

    embed(crop_ids, version_id, self.settings)
