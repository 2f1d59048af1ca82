"""Heartbeats: renew a lease in the background while a long piece of work runs.

The database is the record of who holds what. A worker stamps the rows it holds when it starts
and renews the stamp every third of the lease while it works; if the process dies the stamps
age, and past the lease the reconciler hands the work to someone else. A renewal that fails
(the database briefly away) is logged and tried again at the next beat: the lease has two
more beats of slack.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def heartbeat(
    lease_seconds: float, renew: Callable[[], None], *, enabled: bool = True
) -> Iterator[None]:
    """Call ``renew`` every ``lease_seconds / 3`` until the block ends (nothing if not
    ``enabled``: in-process runs have no reconciler to hold a lease against)."""
    if not enabled:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(0.2, lease_seconds / 3)):
            try:
                renew()
            except Exception as error:
                log.warning("lease renewal failed: %s", error)

    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
