"""De-duplication of (product id, URL) pairs across a whole feed, in bounded memory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def pair_hashes(ids: pa.Array, urls: pa.Array) -> np.ndarray:
    """64-bit hash of each (product id, URL) pair.

    Python's own str hash: SipHash-1-3 with a per-process random key, so well spread, not
    steerable by a hostile feed, and stable for the life of the process — all in-feed
    de-duplication needs. Several times faster than hashlib or pandas' hash_array here."""
    keys = pc.binary_join_element_wise(ids, urls, "\x00").to_numpy(zero_copy_only=False)
    return np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))


class SeenHashes:
    """A set of int64 hashes in sorted numpy runs: 8 bytes an entry (1M pairs: 8 MB; a Python
    set of ints would take ~70 MB). Runs are merged like a binary counter, so there are
    O(log n) of them and each entry is copied O(log n) times in all."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self._runs)

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Remember ``hashes``; True for each that is new (its first time, in file order)."""
        fresh = ~pd.Series(hashes).duplicated().to_numpy()
        order = np.argsort(hashes)  # sorted needles make searchsorted cache-friendly
        needles = hashes[order]
        for run in self._runs:
            slots = np.minimum(np.searchsorted(run, needles), len(run) - 1)
            fresh[order[run[slots] == needles]] = False
        if fresh.any():
            self._push(np.sort(hashes[fresh]))
        return fresh

    def _push(self, run: np.ndarray) -> None:
        self._runs.append(run)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            last, before = self._runs.pop(), self._runs.pop()
            self._runs.append(np.sort(np.concatenate([before, last])))
