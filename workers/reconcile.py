"""The reconciler: the database, not the broker, is the record of what is left to do.

A message is only a hint that work exists. Each pass compares what the rows say is due with
what is moving, and sends again whatever stalled (the Kubernetes controller pattern):

* **images** waiting for a stage (``queued`` for download, ``downloaded`` for analysis) whose
  last progress (hand-off, claim, or the heartbeat of the worker holding them) is older than the
  lease. A queue is first in, first out, so an image recorded before the oldest message still
  waiting in its queue cannot be behind that message: it is lost, or held by a worker (whose
  heartbeat keeps it fresh). Images that already had attempts go out in smaller batches
  (halved per attempt), so one poison image ends up alone; past FLICKD_MAX_STAGE_ATTEMPTS they
  fail with ``attempts_exhausted``.
* **runs** whose images are all terminal are closed (exactly one closer sends the final task);
  a run whose producer died mid-feed (no heartbeat for a lease) is handed to the workers with
  what it recorded.
* **final tasks** queued or failed without progress, or claimed by a task whose heartbeat
  stopped, are sent again; the claim (db.runs.claim_finalize) lets exactly one delivery run.
* **index builds** waiting on a re-embedding that stalled get the missing crops sent again;
  a build whose builder died goes back to pending and is claimed anew.
* **the served index** is rebuilt when the catalog drifted from it: when the vectors added
  since its build plus the crops it holds that left search since pass
  ``FLICKD_REBUILD_DRIFT_SHARE`` of its size, a pending build is recorded and
  ``flickd.embed_crops`` sent with no crops (by task name): the worker that takes it claims
  and builds the index, as after a re-embedding. Meanwhile replicas serve the drift from their
  delta and tombstones (``flickd/services/freshness.py``); the decision is taken here, once,
  rather than by each replica, which would race its peers to ask;
* **delisted products** whose grace period (FLICKD_DELIST_GRACE_SECONDS) is over are purged:
  their rows go (images, crops and embeddings cascade), then the blobs of their images and
  crops that no other image, crop or video job uses.
* **video jobs** (a long clip's search, ``flickd.video_search``) queued or running without
  progress for a lease go back to ``queued`` and are sent again by task name (the task lives
  with the services, which this layer must not import); the claim (db.videos.claim_job) lets
  one delivery work, and past FLICKD_MAX_STAGE_ATTEMPTS the job fails ``attempts_exhausted``.

Every re-drive is safe while the original is still in flight: every write is keyed or guarded
by state, so a second delivery writes nothing twice. Each pass is a handful of bounded,
set-based queries; on Postgres an advisory lock keeps two schedulers from overlapping.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select, update

from db.catalog import purge_delisted, unused_blobs
from db.counters import add_counts
from db.embeddings import missing_crop_ids
from db.images import fail_exhausted, take_stalled
from db.indexes import request_build, served_build_drift
from db.runs import close_runs, finalize_claimable
from db.schema import (
    FinalizeStatus,
    ImageState,
    IndexBuild,
    IndexBuildStatus,
    IngestRun,
    RunStatus,
    utcnow,
)
from db.session import get_engine, session_scope
from db.versions import active_embedder
from db.videos import fail_exhausted_jobs, take_stalled_jobs
from flickd.core.blobstore import BlobStore
from flickd.core.broker import (
    ANALYZE_TASK,
    DOWNLOAD_QUEUE,
    DOWNLOAD_TASK,
    EMBED_TASK,
    FINALIZE_TASK,
    GPU_QUEUE,
    VIDEO_SEARCH_TASK,
    enqueue,
    oldest_waiting,
    send,
    send_final_tasks,
)
from flickd.core.settings import Settings

log = logging.getLogger(__name__)

# Publisher clocks and the moment of commit differ by a little: a message is only taken as
# "behind the queue's head" when it is older than the head by this much.
CLOCK_SLACK = timedelta(seconds=5)
PASS_LOCK_KEY = 7734202  # pg advisory lock: one pass at a time across schedulers


@dataclass
class ReconcileReport:
    requeued: Counter[str] = field(default_factory=Counter)  # images per stage
    exhausted: int = 0
    producers_lost: list[int] = field(default_factory=list)
    runs_closed: list[int] = field(default_factory=list)
    finalize_redriven: list[int] = field(default_factory=list)
    builds_redriven: list[int] = field(default_factory=list)
    rebuilds_requested: int = 0  # full builds asked for because the catalog drifted
    video_jobs_redriven: list[int] = field(default_factory=list)
    video_jobs_exhausted: list[int] = field(default_factory=list)
    products_purged: int = 0
    blobs_deleted: int = 0
    skipped: bool = False  # another pass held the lock

    def counts(self) -> dict[str, int]:
        return {
            "requeued_download": self.requeued["download"],
            "requeued_analyze": self.requeued["analyze"],
            "exhausted": self.exhausted,
            "producers_lost": len(self.producers_lost),
            "runs_closed": len(self.runs_closed),
            "finalize_redriven": len(self.finalize_redriven),
            "builds_redriven": len(self.builds_redriven),
            "rebuilds_requested": self.rebuilds_requested,
            "video_jobs_redriven": len(self.video_jobs_redriven),
            "video_jobs_exhausted": len(self.video_jobs_exhausted),
            "products_purged": self.products_purged,
            "blobs_deleted": self.blobs_deleted,
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "skipped": self.skipped,
            **self.counts(),
            "runs_closed_ids": self.runs_closed,
            "finalize_redriven_ids": self.finalize_redriven,
        }


@dataclass(frozen=True)
class _Stage:
    name: str
    state: str
    task: str
    queue: str
    batch_size: int


def _stages(settings: Settings) -> list[_Stage]:
    stages = [
        _Stage(
            "download",
            ImageState.QUEUED.value,
            DOWNLOAD_TASK,
            DOWNLOAD_QUEUE,
            settings.download_batch_size,
        )
    ]
    if settings.last_stage == "analyze":
        stages.append(
            _Stage(
                "analyze",
                ImageState.DOWNLOADED.value,
                ANALYZE_TASK,
                GPU_QUEUE,
                settings.analyze_batch_size,
            )
        )
    return stages


def reconcile_once(settings: Settings, *, ignore_queues: bool = False) -> ReconcileReport:
    """One pass over everything the database says is due. ``ignore_queues`` (an operator's
    ``flickd retry --stuck``) re-drives whatever is older than the lease even when the queue
    still holds older messages."""
    report = ReconcileReport()
    with _pass_lock(settings) as held:
        if not held:
            report.skipped = True
            log.info("reconcile skipped: another pass is running")
            return report
        now = utcnow()
        lease = now - timedelta(seconds=settings.lease_seconds)
        cutoffs = {
            queue: lease if ignore_queues else _cutoff(queue, lease, settings)
            for queue in (DOWNLOAD_QUEUE, GPU_QUEUE)
        }
        touched_runs: set[int | None] = set()
        report.producers_lost = _lost_producers(settings, lease)
        for stage in _stages(settings):
            touched_runs |= _redrive_images(stage, cutoffs[stage.queue], settings, report)
        report.runs_closed = _close_runs(settings, touched_runs)
        if settings.finalize_enabled:
            report.finalize_redriven = _redrive_finalize(settings, cutoffs[GPU_QUEUE])
            report.builds_redriven = _redrive_builds(settings, cutoffs[GPU_QUEUE], lease)
            report.rebuilds_requested = _rebuild_on_drift(settings)
        _redrive_video_jobs(settings, cutoffs[GPU_QUEUE], report)
        _purge_delisted(settings, now, report)
        with session_scope(settings) as session:
            add_counts(session.connection(), report.counts())
    if any(report.counts().values()):
        log.info("reconcile pass %s", report.to_dict())
    return report


@contextmanager
def _pass_lock(settings: Settings) -> Iterator[bool]:
    engine = get_engine(settings)
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        held = bool(conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({PASS_LOCK_KEY})").scalar())
        conn.commit()
        try:
            yield held
        finally:
            if held:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({PASS_LOCK_KEY})")
                conn.commit()


def _cutoff(queue: str, lease: datetime, settings: Settings) -> datetime:
    """Work whose last progress is older than this has lost its message: older than the lease,
    and older than the oldest message still waiting in its queue."""
    head = oldest_waiting(queue, settings)
    return lease if head is None else min(lease, head - CLOCK_SLACK)


def _redrive_images(
    stage: _Stage, before: datetime, settings: Settings, report: ReconcileReport
) -> set[int | None]:
    with session_scope(settings) as session:
        conn = session.connection()
        exhausted = fail_exhausted(conn, stage.state, before, settings.max_stage_attempts)
        stalled = take_stalled(conn, stage.state, before, settings.reconcile_batch_limit)
    report.exhausted += len(exhausted)
    by_attempts: dict[int, list[int]] = defaultdict(list)
    for row in stalled:
        by_attempts[row.stage_attempts].append(row.id)
    for attempts, ids in sorted(by_attempts.items()):
        # Each earlier attempt that died halves the batch: a poison image is soon alone.
        size = max(1, stage.batch_size >> min(attempts, 16))
        enqueue(stage.task, ids, size, settings)
        report.requeued[stage.name] += len(ids)
    if stalled:
        log.warning("re-driven stalled images stage=%s images=%d", stage.name, len(stalled))
    return set(exhausted)


def _lost_producers(settings: Settings, lease: datetime) -> list[int]:
    """Runs whose producer stopped sending heartbeats while reading the feed: what it recorded
    is real, so the run goes on to the workers (and says why it is short)."""
    run = IngestRun
    last_seen = func.coalesce(run.updated_at, run.created_at)
    with session_scope(settings) as session:
        ids = list(
            session.scalars(
                update(run)
                .where(run.status == RunStatus.RUNNING.value, last_seen < lease)
                .values(
                    status=RunStatus.ENQUEUED.value,
                    enqueued_at=utcnow(),
                    updated_at=utcnow(),
                    error="the producer stopped before the end of the feed; "
                    "the rows it recorded are processed",
                )
                .returning(run.id)
            )
        )
    for run_id in ids:
        log.warning("producer lost run_id=%s: its recorded images go on", run_id)
    return ids


def _close_runs(settings: Settings, touched: set[int | None]) -> list[int]:
    with session_scope(settings) as session:
        open_runs = set(
            session.scalars(
                select(IngestRun.id)
                .where(IngestRun.status == RunStatus.ENQUEUED.value)
                .limit(settings.reconcile_batch_limit)
            )
        )
    closed = close_runs(settings, open_runs | touched)
    for run_id in closed:
        log.info("run finished run_id=%s (reconciler)", run_id)
    send_final_tasks(closed, settings)
    return closed


def _redrive_finalize(settings: Settings, before: datetime) -> list[int]:
    """Final tasks due and not moving: queued or failed with no progress since ``before``, or
    claimed by a task whose heartbeat stopped. Their claim goes back to ``queued``."""
    run = IngestRun
    stalled = and_(
        finalize_claimable(settings),
        func.coalesce(run.updated_at, run.finished_at, run.created_at) < before,
    )
    with session_scope(settings) as session:
        ids = list(
            session.scalars(
                update(run)
                .where(stalled)
                .values(finalize_status=FinalizeStatus.QUEUED.value, updated_at=utcnow())
                .returning(run.id)
            )
        )
    if ids:
        send(FINALIZE_TASK, [[run_id] for run_id in ids], settings)
        log.warning("re-driven final tasks runs=%s", ids)
    return ids


def _redrive_builds(settings: Settings, before: datetime, lease: datetime) -> list[int]:
    """Index builds waiting on a re-embedding that stalled, or whose builder died: the crops
    still missing an embedding are sent again; with none missing, one empty batch lets the
    worker that takes it claim and build the index."""
    build = IndexBuild
    redriven: list[int] = []
    with session_scope(settings) as session:
        rows = session.scalars(
            select(build).where(
                ((build.status == IndexBuildStatus.PENDING) & (build.updated_at < before))
                | ((build.status == IndexBuildStatus.BUILDING) & (build.updated_at < lease))
            )
        ).all()
        work: list[tuple[int, int, int | None]] = []
        for row in rows:
            params = dict(row.params or {})
            params["redrives"] = int(params.get("redrives", 0)) + 1
            row.params, row.updated_at = params, utcnow()
            if params["redrives"] > settings.max_stage_attempts:
                row.status = IndexBuildStatus.FAILED.value
                log.error("index build %s failed: re-driven %d times", row.id, params["redrives"])
                continue
            row.status = IndexBuildStatus.PENDING.value
            work.append((row.id, row.model_version_id, params.get("up_to_crop_id")))
    for build_id, version_id, up_to in work:
        with session_scope(settings) as session:
            missing = missing_crop_ids(session, version_id, up_to, settings.reconcile_batch_limit)
        if missing:
            enqueue(EMBED_TASK, missing, settings.reembed_batch_size, settings, [version_id])
        else:
            send(EMBED_TASK, [[[], version_id]], settings)
        redriven.append(build_id)
        log.warning("re-driven index build build_id=%s missing_crops=%d", build_id, len(missing))
    return redriven


def _rebuild_on_drift(settings: Settings) -> int:
    """Ask for a full build of the served index when the catalog drifted past the share."""
    with session_scope(settings) as session:
        drift = served_build_drift(session)
        active = active_embedder(session)
        if (
            drift is None
            or active is None
            or active.id != drift.model_version_id  # a re-embedding's build is coming
            or drift.share <= settings.rebuild_drift_share
        ):
            return 0
        request_build(
            session,
            drift.model_version_id,
            {"reason": "drift", "added": drift.added, "left": drift.left, "of": drift.n_vectors},
        )
    send(EMBED_TASK, [[[], drift.model_version_id]], settings)
    log.warning(
        "index drift: %d added and %d left search since build %d of %d vectors; rebuild requested",
        drift.added,
        drift.left,
        drift.build_id,
        drift.n_vectors,
    )
    return 1


def _redrive_video_jobs(settings: Settings, before: datetime, report: ReconcileReport) -> None:
    """Video jobs whose message was lost or whose worker died: sent again, one message each."""
    with session_scope(settings) as session:
        conn = session.connection()
        report.video_jobs_exhausted = fail_exhausted_jobs(conn, before, settings.max_stage_attempts)
        report.video_jobs_redriven = take_stalled_jobs(conn, before, settings.reconcile_batch_limit)
    if report.video_jobs_redriven:
        send(VIDEO_SEARCH_TASK, [[job_id] for job_id in report.video_jobs_redriven], settings)
        log.warning("re-driven stalled video jobs jobs=%s", report.video_jobs_redriven)
    for job_id in report.video_jobs_exhausted:
        log.error("video job %s failed: out of attempts", job_id)


def _purge_delisted(settings: Settings, now: datetime, report: ReconcileReport) -> None:
    """Products delisted for longer than the grace period go, rows first (one transaction),
    then the blobs nothing uses any more. A blob is checked after the rows are gone, so one
    that another image still uses (the same bytes under another product) stays."""
    before = now - timedelta(seconds=settings.delist_grace_seconds)
    with session_scope(settings) as session:
        report.products_purged, keys = purge_delisted(
            session.connection(), before, settings.reconcile_batch_limit
        )
    if not keys:
        return
    with session_scope(settings) as session:
        unused = unused_blobs(session.connection(), keys)
    blobs = BlobStore.for_settings(settings)
    for key in unused:
        blobs.delete(key)
    report.blobs_deleted = len(unused)
    log.info(
        "purged delisted products=%d blobs_deleted=%d blobs_kept=%d",
        report.products_purged,
        len(unused),
        len(keys) - len(unused),
    )
