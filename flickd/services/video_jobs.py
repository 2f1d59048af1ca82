"""The long-clip job: ``flickd.video_search`` on the gpu queue searches one stored video.

The API stores the video's bytes in the blob store (keyed by their SHA-256), records the job
(``db/videos.py``) and, after that commit, sends this task. The job row is the record, the
message a hint (ARCHITECTURE.md, "Work that finishes by itself"):

* the task *claims* the job, so of any number of deliveries (a re-delivery by Redis, a re-drive
  by the reconciler, a retry) exactly one works on it, and only that holder's outcome is
  written;
* while it works it renews the job's heartbeat every third of the lease and reports progress;
* a bad video fails the job with its reason; an unexpected error puts it back to ``queued``
  with the error, to be re-driven (bounded by FLICKD_MAX_STAGE_ATTEMPTS, then
  ``attempts_exhausted`` with that error).

Who re-drives a job whose worker died: the reconciler (``workers/reconcile.py``), by task name.
It already runs every FLICKD_RECONCILE_INTERVAL seconds and re-drives every other kind of
stalled work the same way, and it works whether or not anyone polls the status endpoint (a
client that posted a clip and went away still gets its result stored). Re-driving from the
status endpoint instead would leave a job nobody polls stalled forever, and would make a GET
send messages.

The task lives in ``flickd/services/`` because it runs the search service; Celery's
``include`` names this module, so workers load it without anything below importing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from celery import shared_task

from db.session import session_scope
from db.videos import (
    ClaimedJob,
    claim_job,
    fail_job,
    finish_job,
    release_job,
    renew_job,
)
from flickd.core.broker import VIDEO_SEARCH_TASK
from flickd.core.lease import heartbeat
from flickd.core.logs import log_context
from flickd.core.reasons import FailureReason
from flickd.core.settings import Settings
from workers.tasks import FlickdTask

if TYPE_CHECKING:
    from flickd.services.search import SearchService

log = logging.getLogger(__name__)

# Progress goes to the database at most this often (seconds): a status poll sees it move, and
# a 600-second clip does not write a row per frame.
PROGRESS_INTERVAL = 0.5
SEARCH_UNAVAILABLE = "search_unavailable"

_services: dict[str, SearchService] = {}
_services_lock = threading.Lock()


def search_service(settings: Settings) -> SearchService:
    """One search service per worker process and settings: its models load once."""
    from flickd.services.search import SearchService

    key = settings.model_dump_json()
    with _services_lock:
        service = _services.get(key)
        if service is None:
            service = _services[key] = SearchService(settings)
        return service


# The task base's autoretry (database or broker hiccups) only sends the job again: the claim
# decides who works, and the job's row counts the attempts.
@shared_task(base=FlickdTask, name=VIDEO_SEARCH_TASK, bind=True)
def video_search(self: FlickdTask, job_id: int) -> None:
    run_video_job(job_id, self.settings)


def run_video_job(
    job_id: int, settings: Settings, service: SearchService | None = None
) -> str | None:
    """Claim the job and search its video; returns the job's new status, or None when this
    delivery had nothing to do (done, failed, or held by a live worker)."""
    with log_context(video_job=job_id):
        with session_scope(settings) as session:
            job = claim_job(
                session.connection(), job_id, settings.max_stage_attempts, settings.lease_seconds
            )
        if job is None:
            log.info("video job not claimable (done, failed or held) job_id=%s", job_id)
            return None
        log.info("video job claimed job_id=%s attempt=%s", job_id, job.token)
        return _work(job, settings, service or search_service(settings))


def _work(job: ClaimedJob, settings: Settings, service: SearchService) -> str:
    from flickd.core.blobstore import BlobStore
    from flickd.fetching.video import VideoFailure, VideoLimits, open_video
    from flickd.services.search import SearchUnavailable
    from flickd.services.video import VideoSearch

    def renew() -> None:
        _write(settings, lambda conn: renew_job(conn, job))

    try:
        try:
            if job.blob_key is None:
                raise FileNotFoundError(job.sha256)
            data = BlobStore.for_settings(settings).get(job.blob_key)
        except FileNotFoundError:
            return _fail(
                settings,
                job,
                FailureReason.INTERNAL_ERROR.value,
                "the video's bytes are no longer in the blob store; send the video again",
            )
        with (
            heartbeat(settings.lease_seconds, renew, enabled=not settings.embedded),
            open_video(data, VideoLimits.from_settings(settings)) as stream,
        ):
            result = VideoSearch(service).search_video(
                stream, job.sha256, job.top_k, progress=_progress_reporter(settings, job)
            )
    except VideoFailure as failure:
        return _fail(settings, job, failure.reason.value, failure.detail or str(failure))
    except SearchUnavailable as exc:
        return _fail(settings, job, SEARCH_UNAVAILABLE, str(exc))
    except BaseException as exc:
        # Killed by a time limit, a bug, the database away: the next delivery tries again.
        error = f"{type(exc).__name__}: {exc}"
        try:
            _write(settings, lambda conn: release_job(conn, job, error))
        except Exception as failure:
            log.warning("cannot release video job %s: %s", job.job_id, failure)
        raise
    payload = result.model_dump(mode="json")
    if not _write(settings, lambda conn: finish_job(conn, job, payload)):
        log.warning("video job %s was taken over; its result is not written", job.job_id)
        return "superseded"
    log.info(
        "video job done job_id=%s products=%d seconds_analysed=%s",
        job.job_id,
        len(result.products),
        result.cut_at_s or result.duration_s,
    )
    return "done"


def _fail(settings: Settings, job: ClaimedJob, reason: str, detail: str) -> str:
    log.info("video job failed job_id=%s reason=%s detail=%s", job.job_id, reason, detail)
    _write(settings, lambda conn: fail_job(conn, job, reason, detail))
    return "failed"


def _write(settings: Settings, change: Callable[..., bool]) -> bool:
    with session_scope(settings) as session:
        return change(session.connection())


def _progress_reporter(settings: Settings, job: ClaimedJob) -> Callable[[float], None]:
    last = 0.0

    def report(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < PROGRESS_INTERVAL and fraction < 1.0:
            return
        last = now
        try:
            _write(settings, lambda conn: renew_job(conn, job, fraction))
        except Exception as error:  # progress is a nicety; the heartbeat keeps the lease
            log.warning("cannot record video job progress: %s", error)

    return report
