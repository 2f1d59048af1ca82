"""Prometheus metrics for what Flower does not show: the backlog per queue, images per state,
failures per reason, ingest runs per status, the embedder in use, the size of the served index,
and how long each stage takes.

Two kinds, served in two places:

* **Gauges read at scrape time** (:class:`FlickdCollector`) from the database and Redis, with
  cheap aggregate queries, so any process can serve them: ``flickd metrics`` (a standalone
  exporter), or the API through :func:`metrics_asgi_app` / :func:`render_metrics`.
* **Stage durations** (``flickd_stage_seconds``, flickd/core/timing.py), a histogram the workers
  observe while they run tasks. Only the observing process has them, so each worker serves its
  own on ``FLICKD_WORKER_METRICS_PORT``. Scrape every worker for them; ``flickd metrics`` and the
  API do not show them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.counters import RECONCILER_ACTIONS, read_counts
from db.images import stalled_counts
from db.schema import (
    PENDING_STATES,
    Image,
    ImageState,
    IndexBuild,
    IngestRun,
    ModelVersion,
    RunStatus,
    utcnow,
)
from db.session import session_scope
from flickd.core.broker import queue_lengths
from flickd.core.reasons import FailureReason
from flickd.core.settings import Settings

log = logging.getLogger(__name__)


# --- gauges read at scrape time ----------------------------------------------------------------
class FlickdCollector(Collector):
    """Reads the pipeline's state from the database and the broker on every scrape.

    A source that cannot be reached is reported by ``flickd_metrics_source_up`` instead of
    failing the whole scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "flickd_metrics_source_up",
            "1 when the source could be read during this scrape",
            labels=["source"],
        )
        for source, read in (("broker", self._broker_metrics), ("database", self._db_metrics)):
            try:
                metrics = list(read())
            except Exception:
                log.exception("metrics: cannot read %s", source)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from metrics
        yield up

    def _broker_metrics(self) -> Iterable[Metric]:
        waiting = GaugeMetricFamily(
            "flickd_queue_messages",
            "Messages waiting in a broker queue (0 in embedded mode: tasks run in-process)",
            labels=["queue"],
        )
        unacked = GaugeMetricFamily(
            "flickd_unacked_messages",
            "Messages delivered to a worker and not yet acknowledged (tasks in flight)",
        )
        lengths, in_flight = queue_lengths(self.settings)
        for queue, length in lengths.items():
            waiting.add_metric([queue], length)
        unacked.add_metric([], in_flight)
        return [waiting, unacked]

    def _db_metrics(self) -> Iterable[Metric]:
        with session_scope(self.settings) as session:
            return [
                _by_label(
                    "flickd_images",
                    "Images per state",
                    "state",
                    [s.value for s in ImageState],
                    session.execute(select(Image.state, func.count()).group_by(Image.state)),
                ),
                _by_label(
                    "flickd_image_failures",
                    "Failed images per reason",
                    "reason",
                    [r.value for r in FailureReason],
                    session.execute(
                        select(Image.failure_reason, func.count())
                        .where(Image.state == ImageState.FAILED.value)
                        .group_by(Image.failure_reason)
                    ),
                ),
                _by_label(
                    "flickd_runs",
                    "Ingest runs per status",
                    "status",
                    [s.value for s in RunStatus],
                    session.execute(
                        select(IngestRun.status, func.count()).group_by(IngestRun.status)
                    ),
                ),
                _active_model(session),
                _active_index(session),
                *_reliability(session, self.settings),
            ]


def _by_label(
    name: str, documentation: str, label: str, known: list[str], rows: Iterable[Any]
) -> GaugeMetricFamily:
    """A gauge per label value; known values are always present (0) so that series don't
    vanish and rates over them stay defined."""
    counts = dict.fromkeys(known, 0)
    for value, count in rows:
        counts[str(value)] = int(count)
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def _reliability(session: Session, settings: Settings) -> list[Metric]:
    """How old the oldest pending image of each state is (a stuck pipeline shows as a line
    that keeps climbing), how many are stuck past the lease, and what the reconciler did."""
    before = utcnow() - timedelta(seconds=settings.lease_seconds)
    counts = stalled_counts(session.connection(), before)
    now = utcnow()
    oldest = GaugeMetricFamily(
        "flickd_oldest_pending_seconds",
        "Seconds since the last progress of the longest-waiting image, per pending state",
        labels=["state"],
    )
    stuck = GaugeMetricFamily(
        "flickd_stuck_images",
        "Pending images with no progress for longer than FLICKD_LEASE_SECONDS, per state",
        labels=["state"],
    )
    for state in PENDING_STATES:
        n_stuck, last = counts.get(state, (0, None))
        age = (now - _aware(last)).total_seconds() if last is not None else 0.0
        oldest.add_metric([state], max(0.0, age))
        stuck.add_metric([state], n_stuck)
    done = CounterMetricFamily(
        "flickd_reconciler",
        "What the reconciler did, summed over every pass (requeued_download, exhausted, ...)",
        labels=["action"],
    )
    totals = read_counts(session.connection())
    for action in RECONCILER_ACTIONS:
        done.add_metric([action], totals.get(action, 0))
    return [oldest, stuck, done]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _active_model(session: Session) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "flickd_model_info",
        "The active model version (value 1); absent until something has been embedded",
        labels=["kind", "name", "version"],
    )
    rows = session.execute(
        select(ModelVersion.kind, ModelVersion.name, ModelVersion.version).where(
            ModelVersion.active.is_(True)
        )
    )
    for kind, name, version in rows:
        family.add_metric([kind, name, version], 1)
    return family


def _active_index(session: Session) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "flickd_index_vectors",
        "Vectors in the active (served) search index; absent until one is built",
        labels=["index_type", "model_version"],
    )
    row = session.execute(
        select(IndexBuild.n_vectors, IndexBuild.index_type, ModelVersion.version)
        .join(ModelVersion, ModelVersion.id == IndexBuild.model_version_id)
        .where(IndexBuild.active.is_(True))
        .order_by(IndexBuild.id.desc())
        .limit(1)
    ).first()
    if row is not None:
        family.add_metric([row.index_type or "", row.version], row.n_vectors or 0)
    return family


# --- serving -----------------------------------------------------------------------------------
def flickd_registry(settings: Settings) -> CollectorRegistry:
    """A registry with the scrape-time gauges for these settings (and nothing else)."""
    registry = CollectorRegistry()
    registry.register(FlickdCollector(settings))
    return registry


def render_metrics(settings: Settings) -> bytes:
    """The gauges in Prometheus text format, e.g. for a ``/metrics`` route."""
    return generate_latest(flickd_registry(settings))


def metrics_asgi_app(settings: Settings) -> Callable[..., Any]:
    """An ASGI app serving the gauges; mount it: ``app.mount("/metrics", metrics_asgi_app(s))``."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry=flickd_registry(settings))


def serve_metrics(settings: Settings, port: int, address: str = "0.0.0.0") -> None:
    """Serve the gauges over HTTP until the process is stopped (``flickd metrics``)."""
    start_http_server(port, address, registry=flickd_registry(settings))
    log.info("serving metrics on http://%s:%d/metrics", address, port)
    threading.Event().wait()
