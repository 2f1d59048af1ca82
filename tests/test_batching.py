"""Micro-batching of concurrent queries (flickd/services/batching.py) and the text cache."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from flickd.services.batching import InFlight, LruCache, MicroBatcher
from tests.conftest import wait_until


def test_concurrent_submits_share_one_call_and_each_gets_its_own_answer() -> None:
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * i for i in items]

    # A long window and max_batch = number of callers: the batch closes exactly when all six
    # are in, however the threads are scheduled.
    batcher = MicroBatcher(square, window=30.0, max_batch=6)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(batcher.submit, range(6)))
    assert results == [i * i for i in range(6)]
    assert len(calls) == 1 and sorted(calls[0]) == list(range(6))
    assert (batcher.batches, batcher.items) == (1, 6)


def test_batches_never_exceed_max_batch() -> None:
    sizes: list[int] = []
    release = threading.Event()

    def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        release.wait(10)
        return items

    batcher = MicroBatcher(run, window=0.0, max_batch=3)
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(batcher.submit, i) for i in range(10)]
        # The first batch holds the thread; the others wait in the queue meanwhile.
        wait_until(lambda: len(sizes) == 1 and batcher._queue.qsize() == 10 - sizes[0], 10, "queue")
        release.set()
        assert sorted(f.result(10) for f in futures) == list(range(10))
    assert sum(sizes) == 10 and max(sizes) <= 3
    assert len(sizes) >= 4  # 10 items, at most 3 per call


def test_a_bad_item_fails_alone_and_the_batcher_keeps_serving() -> None:
    def run(items: list[int]) -> list[float]:
        return [1 / i for i in items]  # 0 raises ZeroDivisionError for the whole batch

    batcher = MicroBatcher(run, window=30.0, max_batch=4)
    with ThreadPoolExecutor(4) as pool:
        futures = {i: pool.submit(batcher.submit, i) for i in (0, 1, 2, 4)}
        with pytest.raises(ZeroDivisionError):
            futures[0].result(10)
        assert [futures[i].result(10) for i in (1, 2, 4)] == [1.0, 0.5, 0.25]
    batcher.window = 0.0  # alone now: do not wait 30 s for company
    assert batcher.submit(2) == 0.5  # the same batcher still answers after the failure


def test_a_query_alone_does_not_wait_out_the_window() -> None:
    """With nobody else in flight the batch runs at once; with company it waits for it."""
    in_flight = InFlight()
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        return items

    # A 30 s window: a submit alone that waited it out would not answer within 10 s.
    batcher = MicroBatcher(run, window=30.0, max_batch=2, company=in_flight)

    def alone() -> int:
        with in_flight:
            return batcher.submit(1)

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(alone).result(timeout=10) == 1
    assert calls == [[1]]
    # Two queries in flight: the first waits for the second, and both share one call.
    arrived = threading.Barrier(2)

    def query(i: int) -> int:
        with in_flight:
            arrived.wait(10)  # both are in flight before either reaches the batcher
            return batcher.submit(i)

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(query, (2, 3))) == [2, 3]
    assert len(calls) == 2 and sorted(calls[1]) == [2, 3]
    assert in_flight() == 0


def test_a_result_count_mismatch_is_an_error_not_a_wrong_answer() -> None:
    batcher = MicroBatcher(lambda items: items[:1], window=0.0, max_batch=1)
    assert batcher.submit(7) == 7
    broken = MicroBatcher(lambda items: [], window=0.0, max_batch=1)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        broken.submit(7)


def test_lru_cache_evicts_the_least_recently_used() -> None:
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2 and (cache.hits, cache.misses) == (3, 1)
    off: LruCache[str, int] = LruCache(0)
    off.put("a", 1)
    assert off.get("a") is None and len(off) == 0
