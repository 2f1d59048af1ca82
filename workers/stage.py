"""What a stage hands back to its task: the work that follows it and the runs it touched.

Each stage module does its stage and nothing else; the task base (workers/tasks.py) sends the
next stage's messages and closes the runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from db.images import renew
from db.session import session_scope
from flickd.core.lease import heartbeat
from flickd.core.settings import Settings


@dataclass
class StageResult:
    # Runs whose images this batch touched: one of them may be complete now.
    run_ids: set[int | None] = field(default_factory=set)
    # The next stage's task and the images (or crops) it should take, in batches of batch_size.
    next_task: str | None = None
    next_ids: list[int] = field(default_factory=list)
    batch_size: int = 1


@contextmanager
def holding(image_ids: Sequence[int], state: str, settings: Settings) -> Iterator[None]:
    """Renew the lease on the claimed images while the stage works on them, so that the
    reconciler leaves a live worker's images alone however long the batch takes."""
    ids = list(image_ids)

    def renew_lease() -> None:
        with session_scope(settings) as session:
            renew(session.connection(), ids, state)

    with heartbeat(settings.lease_seconds, renew_lease, enabled=not settings.embedded):
        yield
