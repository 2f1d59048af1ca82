"""How long each stage takes: a clock for the steps of one batch, and the Prometheus histogram
the workers observe (``flickd_stage_seconds``).

Only the observing process has the histogram, so each worker serves its own on
``FLICKD_WORKER_METRICS_PORT`` (workers/control.py switches prometheus_client to multiprocess
mode so that the prefork children's observations reach the worker's main process).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Histogram, start_http_server

# A download batch takes seconds to minutes; one vision step on a GPU tens of milliseconds.
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
STAGE_SECONDS = Histogram(
    "flickd_stage_seconds",
    "Wall-clock seconds of one batch through a pipeline stage, as observed by a worker",
    ["stage"],
    buckets=STAGE_BUCKETS,
)


class StepClock:
    """Seconds spent per named step: ``with clock("detect"): ...`` adds to ``seconds["detect"]``."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] += time.perf_counter() - started

    def summary(self) -> str:
        """``step_s=1.234`` pairs for a log line."""
        return " ".join(f"{step}_s={value:.3f}" for step, value in self.seconds.items())


def observe_stage(stage: str, seconds: float) -> None:
    """Record one batch's time in ``stage`` (a task's short name, or a vision step)."""
    STAGE_SECONDS.labels(stage=stage).observe(seconds)


def observe_stages(seconds: Mapping[str, float]) -> None:
    """Record a batch's time per step, e.g. a :class:`StepClock`'s (decode, detect, …)."""
    for stage, value in seconds.items():
        observe_stage(stage, value)


def serve_worker_metrics(port: int, multiprocess_dir: str | None, address: str = "0.0.0.0") -> None:
    """Serve the stage histograms of this worker (a background thread): with
    ``multiprocess_dir``, those of all its pool processes, gathered from their files there."""
    from prometheus_client import REGISTRY, multiprocess

    registry = REGISTRY
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
    start_http_server(port, address, registry=registry)
