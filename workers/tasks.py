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

from db.images import record_error
from db.runs import close_runs
from db.schema import ImageState
from db.session import session_scope
from flickd.core.broker import (
    BROKER_ERRORS,
    RECONCILE_TASK,
    app_settings,
    enqueue,
    send_final_tasks,
)
from flickd.core.logs import log_context
from flickd.core.settings import Settings
from flickd.core.storage import StorageUnavailable
from flickd.core.timing import observe_stage
from workers.stage import StageResult

log = logging.getLogger(__name__)


class FlickdTask(Task):
    # Database or broker hiccups: retry the whole (idempotent) batch with backoff. A hand-off
    # that cannot reach the broker is among them; if the retry cannot be sent either, the
    # images stay due in the database and the reconciler sends them again.
    # An unreachable storage likewise: the batch is retried, and re-driven after the lease.
    autoretry_for = (OperationalError, StorageUnavailable, *BROKER_ERRORS)
    retry_backoff = True
    retry_backoff_max = 120
    retry_jitter = True
    max_retries = 8
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    # The state the images of this task's batch wait in (None: the task holds no images).
    image_state: str | None = None

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
        closed = close_runs(settings, result.run_ids)
        for run_id in closed:
            log.info("run finished run_id=%s", run_id)
        send_final_tasks(closed, settings)

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        self._record_error(exc, args)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # The images stay due in the database: the reconciler re-drives them after the lease,
        # and once they are out of attempts they fail with this error in their detail.
        self._record_error(exc, args)

    def _record_error(self, exc: BaseException, args: Any) -> None:
        if self.image_state is None or not args or not args[0]:
            return
        error = f"{self.name.removeprefix('flickd.')}: {type(exc).__name__}: {exc}"
        try:
            with session_scope(self.settings) as session:
                record_error(session.connection(), list(args[0]), self.image_state, error)
        except Exception as failure:  # the database may be what failed
            log.warning("cannot record the task's error: %s", failure)


@shared_task(
    base=FlickdTask, name="flickd.download_batch", bind=True, image_state=ImageState.QUEUED.value
)
def download_batch(self: FlickdTask, image_ids: list[int]) -> StageResult:
    from workers.download import download_stage

    return download_stage(image_ids, self.settings)


@shared_task(
    base=FlickdTask,
    name="flickd.analyze_batch",
    bind=True,
    image_state=ImageState.DOWNLOADED.value,
)
def analyze_batch(self: FlickdTask, image_ids: list[int]) -> StageResult:
    from workers.vision import analyze_stage

    return analyze_stage(image_ids, self.settings)


@shared_task(base=FlickdTask, name="flickd.finalize", bind=True)
def finalize(self: FlickdTask, run_id: int | None) -> None:
    from workers.finalize import finalize_run

    finalize_run(run_id, self.settings, claim=True)


@shared_task(base=FlickdTask, name="flickd.embed_crops", bind=True)
def embed_crops(self: FlickdTask, crop_ids: list[int], version_id: int) -> None:
    from workers.finalize import embed_crops as embed

    embed(crop_ids, version_id, self.settings)


# No retries: the next scheduled pass is the retry.
@shared_task(base=FlickdTask, name=RECONCILE_TASK, bind=True, autoretry_for=(), max_retries=0)
def reconcile(self: FlickdTask) -> None:
    from workers.reconcile import reconcile_once

    reconcile_once(self.settings)
