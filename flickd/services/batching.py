"""Micro-batching: concurrent queries answered by one model call per batch.

A CPU forward pass of CLIP's text encoder costs nearly as much for one short query as for
eight (the weights are read from memory once per call either way, and two cores are kept busy by
one call), so serving concurrent clients one call each makes them queue behind each other.
``MicroBatcher`` puts every request of a process on one queue; one thread takes the first
request, waits at most ``window`` seconds for more (up to ``max_batch``), makes one call for all
of them and hands each caller its own answer. While a batch runs, the next one fills, so under
load the batch grows by itself. ``company`` (when given) says how many queries are in flight
anywhere in the service; while none but the batch's own are, nobody else can arrive, and the
batch runs at once instead of waiting out the window: one client pays no window.

The batch thread is the only caller of the function it runs, so a Hugging Face fast tokenizer
(which raises "Already borrowed" when two threads encode at once) is never entered twice.

A batch that raises is retried item by item, so one bad query fails alone with its own error
and the others still get their answers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class MicroBatcher(Generic[T, R]):
    """Calls ``run(items) -> results`` (same length, same order) for batches of concurrent
    ``submit(item)`` calls. Safe to share between any number of threads."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        window: float,
        max_batch: int,
        name: str = "batcher",
        company: Callable[[], int] | None = None,
    ) -> None:
        self._run = run
        self._company = company
        self.window = max(0.0, window)
        self.max_batch = max(1, max_batch)
        self.name = name
        self._queue: queue.SimpleQueue[tuple[T, Future[R]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0  # calls made, and the items they answered: batching at a glance
        self.items = 0

    def submit(self, item: T) -> R:
        """``item``'s result, computed in a batch with whatever else is waiting; raises what
        its computation raised."""
        future: Future[R] = Future()
        self._ensure_thread()
        self._queue.put((item, future))
        return future.result()

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:
                    if self._company is not None and self._company() <= len(batch):
                        batch.append(self._queue.get_nowait())  # alone: take what is here
                    else:
                        wait = max(0.0, deadline - time.monotonic())
                        batch.append(self._queue.get(timeout=wait))
                except queue.Empty:
                    break
            self._answer(batch)

    def _answer(self, batch: list[tuple[T, Future[R]]]) -> None:
        items = [item for item, _ in batch]
        self.batches += 1
        self.items += len(items)
        try:
            results = list(self._run(items))
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        except BaseException as error:
            if len(batch) == 1:
                batch[0][1].set_exception(error)
                return
            log.warning(
                "%s: a batch of %d failed (%s); retrying one by one", self.name, len(batch), error
            )
            for one in batch:
                self._answer([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)


class InFlight:
    """A thread-safe count of the queries being answered (``with in_flight:`` around each)."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self._count -= 1

    def __call__(self) -> int:
        return self._count


class LruCache(Generic[K, V]):
    """A small thread-safe least-recently-used map (``max_items`` 0 keeps nothing)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max(0, max_items)
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: K, value: V) -> None:
        if self.max_items == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
