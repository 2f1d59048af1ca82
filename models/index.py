"""The FAISS index over crop embeddings: build, search, save, and swap without a pause.

Scores are cosine similarities: vectors are L2-normalised and compared by inner product
(``METRIC_INNER_PRODUCT``). The prototype used ``IndexFlatL2`` and called ``1 - distance`` a
cosine; FAISS returns *squared* L2, so that was ``2*cos - 1``.

Which index, by size (n vectors of dimension d):

* ``n < FLAT_MAX_VECTORS`` (20,000): exact ``IndexFlatIP``. At d=512 one query costs ~1.6 ms
  single-threaded on the 2-core reference machine, the edge of the 2 ms budget; beyond that an
  exact scan stops fitting, and below it an approximate index buys nothing.
* otherwise an IVF in two stages, ``IVF{nlist},PQ{m}x8`` + ``SQ7r`` re-rank:

  1. ``IndexIVFPQ`` finds candidates: nlist ≈ 4·sqrt(n) lists (a power of two, trained by
     spherical k-means on ~40 points per list), residuals PQ-coded in d/16 bytes
     (32 B at d=512). Cheap to scan, too coarse to rank: it only shortlists k·rerank ids.
  2. The shortlist is re-scored from 7-bit scalar codes of each vector's residual to its IVF
     centroid (d·7/8 bytes, 448 B at d=512), decoded in numpy.

  Why 7-bit residual codes: near neighbours of CLIP-like embeddings sit ~0.001 apart in cosine,
  so ranking them needs ~7 bits per dimension (measured on the benchmark data, recall@10 of a
  perfect top-100 shortlist re-ranked: SQ4 0.72, SQ6 0.92, SQ8 0.98 on raw vectors; SQ6 0.958,
  SQ7 0.976, SQ8 0.986 on residuals, which span a narrower range). Full floats (2 KiB/vector)
  or SQ8 (512 B) do not fit the 600 MB budget at 1M vectors next to the rest; FAISS has no 7-bit
  quantizer, hence the small codec below.

  ``nprobe`` and ``rerank`` are tuned at build time to a recall target: exact top-k of a few
  hundred database vectors is computed during the add pass, then nprobe grows (re-rank at its
  maximum) until the lower confidence bound of recall@k reaches the target, then rerank
  shrinks to the smallest value that still does. The chosen values and the measured recall
  are kept with the index (``describe()``).

Files: ``<name>.faiss`` (``faiss.write_index``), ``<name>.json`` (the sidecar: dim, n, type,
params, model version, creation time) and for the IVF ``<name>.refine.npz`` (the re-rank codes
and the crop ids). ``current.json`` in an index directory names the served file; every file is
written to a temporary name and renamed, the pointer last, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

if TYPE_CHECKING:
    from flickd.settings import Settings

log = logging.getLogger(__name__)

Chunk = tuple[np.ndarray, np.ndarray]  # (int64 ids, (m, dim) float32 vectors)
VectorSource = Iterable[Chunk] | Callable[[], Iterable[Chunk]]

FORMAT_VERSION = 1
CURRENT = "current.json"

FLAT_MAX_VECTORS = 20_000
SUB_CHUNK = 4096  # rows encoded at a time: bounds the build's temporary arrays (~8 MB each)
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39; more buys little and costs k-means time
KMEANS_ITERATIONS = 10  # the lists only have to partition, not be optimal: 10 is plenty
PQ_TRAIN_MAX = 65_536  # FAISS's own cap for PQ training (256 points x 256 centroids)
CALIBRATION_QUERIES = 256
QUERY_NOISE = 0.3  # calibration query = normalise(vector + 0.3·N(0, I/d)): cosine ~0.96 to it
RECALL_K = 10
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RERANK_STEPS = (2, 3, 4, 6, 8, 12, 16, 24, 32)  # shortlist = k x rerank
SQ_BITS = 7
SQ_CLIP_SIGMAS = 3.5  # per-dimension range of the 7-bit codes: mean ± 3.5 sd (best measured)
_SHIFTS = np.arange(8, dtype=np.uint64) * np.uint64(SQ_BITS)


# --- sizes ---------------------------------------------------------------------------------
def nlist_for(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest 4·sqrt(n) (the low end of the FAISS
    guideline, because training and assignment cost grow with nlist and the build has two
    cores), capped so every list gets ``TRAIN_POINTS_PER_LIST`` training points."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(target, n // TRAIN_POINTS_PER_LIST))


def pq_subquantizers(dim: int) -> int:
    """PQ sub-vectors of ~16 dimensions (32 bytes at d=512): enough to shortlist."""
    m = max(1, dim // 16)
    while dim % m:
        m -= 1
    return m


# --- the 7-bit residual codec ----------------------------------------------------------------
def pack7(codes: np.ndarray) -> np.ndarray:
    """(n, 8g) uint8 values below 128 -> (n, 7g) bytes: eight 7-bit values per 7 bytes."""
    n, width = codes.shape
    groups = codes.reshape(n, width // 8, 8).astype(np.uint64)
    words = np.bitwise_or.reduce(groups << _SHIFTS, axis=2)
    return words.astype("<u8").view(np.uint8).reshape(n, width // 8, 8)[:, :, :7].reshape(n, -1)


def unpack7(packed: np.ndarray) -> np.ndarray:
    """Inverse of ``pack7`` over the last axis: (..., 7g) bytes -> (..., 8g) uint8."""
    lead, width = packed.shape[:-1], packed.shape[-1]
    groups = packed.reshape(-1, width // 7, 7)
    wide = np.zeros((groups.shape[0], groups.shape[1], 8), np.uint8)
    wide[:, :, :7] = groups
    words = wide.view("<u8")  # (rows, g, 1)
    values = (words >> _SHIFTS) & np.uint64(0x7F)
    return values.astype(np.uint8).reshape(*lead, width // 7 * 8)


@dataclass(frozen=True)
class ResidualSQ7:
    """Uniform 7-bit scalar quantizer of residuals, per-dimension range mean ± 3.5 sd.

    Dimensions are padded to a multiple of 8 (padding codes are 0 and weigh nothing because
    the padded query coordinates are 0)."""

    lo: np.ndarray  # (padded_dim,) float32
    step: np.ndarray  # (padded_dim,) float32

    @property
    def padded_dim(self) -> int:
        return int(self.lo.shape[0])

    @property
    def code_size(self) -> int:
        return self.padded_dim * SQ_BITS // 8

    @classmethod
    def train(cls, residuals: np.ndarray) -> ResidualSQ7:
        dim = residuals.shape[1]
        padded = -(-dim // 8) * 8
        mean = residuals.mean(axis=0, dtype=np.float64)
        sd = np.maximum(residuals.std(axis=0, dtype=np.float64), 1e-8)  # constant dims
        lo = np.zeros(padded)
        step = np.ones(padded)
        lo[:dim] = mean - SQ_CLIP_SIGMAS * sd
        step[:dim] = 2 * SQ_CLIP_SIGMAS * sd / 2**SQ_BITS
        return cls(lo.astype(np.float32), step.astype(np.float32))

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        padded = self._pad(residuals)
        levels = np.floor((padded - self.lo) / self.step)
        return pack7(np.clip(levels, 0, 2**SQ_BITS - 1).astype(np.uint8))

    def scores(self, queries: np.ndarray, packed: np.ndarray) -> np.ndarray:
        """q · decoded residual for (nq, d) queries and (nq, c, code_size) codes -> (nq, c).

        decoded = lo + (code + 0.5)·step, so q·decoded = q·(lo + step/2) + code·(q∘step)."""
        q = self._pad(queries)
        offset = q @ (self.lo + 0.5 * self.step)
        levels = unpack7(packed).astype(np.float32)
        return np.einsum("qcd,qd->qc", levels, q * self.step) + offset[:, None]

    def _pad(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1] == self.padded_dim:
            return x
        out = np.zeros((x.shape[0], self.padded_dim), np.float32)
        out[:, : x.shape[1]] = x
        return out


# --- the two backends ------------------------------------------------------------------------
class _Backend(Protocol):
    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def write(self, path: Path) -> None: ...
    def memory_bytes(self) -> int: ...


class _Flat:
    """Exact search; FAISS maps its positions back to crop ids."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    @classmethod
    def empty(cls, dim: int) -> _Flat:
        return cls(faiss.IndexIDMap(faiss.IndexFlatIP(dim)))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def write(self, path: Path) -> None:
        _atomic_write(path, lambda tmp: faiss.write_index(self.index, str(tmp)))

    def memory_bytes(self) -> int:
        return self.ntotal * (self.index.d * 4 + 8)


class _IVFRerank:
    """IVF-PQ shortlist, re-ranked from 7-bit residual codes. FAISS ids are positions into
    ``codes``/``lists``/``ids``; ``ids`` maps a position to its crop id."""

    def __init__(
        self,
        ivf: faiss.IndexIVFPQ,
        codec: ResidualSQ7,
        codes: np.ndarray,
        lists: np.ndarray,
        ids: np.ndarray,
        nprobe: int = 1,
        rerank: int = RERANK_STEPS[-1],
    ) -> None:
        self.ivf, self.codec = ivf, codec
        self.codes, self.lists, self.ids = codes, lists, ids
        self.nprobe, self.rerank = nprobe, rerank

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        shortlist = k * self.rerank
        nprobe = min(self.nprobe, self.ivf.nlist)
        coarse, probed = self.ivf.quantizer.search(queries, nprobe)
        self.ivf.nprobe = nprobe  # search_preassigned checks the probe count against it
        _, pos = self.ivf.search_preassigned(queries, shortlist, probed, coarse)
        scores = np.empty(pos.shape, np.float32)
        block = max(1, 8192 // shortlist)  # bounds the decoded (block, shortlist, d) floats
        for s in range(0, len(queries), block):
            e = s + block
            scores[s:e] = self._rescore(queries[s:e], pos[s:e], probed[s:e], coarse[s:e])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(pos, order, axis=1)
        ids = np.where(best >= 0, self.ids[np.maximum(best, 0)], -1)
        return np.take_along_axis(scores, order, axis=1), ids

    def _rescore(
        self, queries: np.ndarray, pos: np.ndarray, probed: np.ndarray, coarse: np.ndarray
    ) -> np.ndarray:
        valid = pos >= 0
        safe = np.where(valid, pos, 0)
        # q·x = q·centroid + q·residual; q·centroid is the coarse score of the candidate's list
        centroid = _lookup(self.lists[safe], probed, coarse, self.ivf.nlist)
        scores = centroid + self.codec.scores(queries, self.codes[safe])
        scores[~valid] = -np.inf
        return scores

    def write(self, path: Path) -> None:
        def arrays(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    codes=self.codes,
                    lists=self.lists,
                    ids=self.ids,
                    lo=self.codec.lo,
                    step=self.codec.step,
                )

        _atomic_write(_refine_path(path), arrays)
        _atomic_write(path, lambda tmp: faiss.write_index(self.ivf, str(tmp)))

    @classmethod
    def read(cls, path: Path, params: dict[str, Any]) -> _IVFRerank:
        ivf = faiss.read_index(str(path))  # already the IndexIVFPQ proxy, owning the index
        with np.load(_refine_path(path)) as data:
            codec = ResidualSQ7(data["lo"], data["step"])
            return cls(
                ivf,
                codec,
                data["codes"],
                data["lists"],
                data["ids"],
                int(params["nprobe"]),
                int(params["rerank"]),
            )

    def memory_bytes(self) -> int:
        pq = self.ntotal * (self.ivf.code_size + 8)  # codes + int64 ids in the lists
        centroids = self.ivf.nlist * self.ivf.d * 4
        return pq + centroids + self.codes.nbytes + self.lists.nbytes + self.ids.nbytes


def _lookup(lists: np.ndarray, probed: np.ndarray, coarse: np.ndarray, nlist: int) -> np.ndarray:
    """For each candidate's list (nq, c), its coarse score among the probed (nq, nprobe)."""
    order = np.argsort(probed, axis=1)
    row = np.arange(len(probed))[:, None] * (nlist + 1)  # rows never interleave
    keys = (np.take_along_axis(probed, order, axis=1) + row).ravel()
    values = np.take_along_axis(coarse, order, axis=1).ravel()
    at = np.searchsorted(keys, (lists + row).ravel()).clip(0, len(keys) - 1)
    return values[at].reshape(lists.shape)


# --- the index ---------------------------------------------------------------------------------
class VectorIndex:
    """Cosine-similarity search over crop embeddings; ids are crop ids (-1 pads)."""

    def __init__(
        self,
        backend: _Backend,
        dim: int,
        index_type: str,
        params: dict[str, Any] | None = None,
        model_version_id: int | None = None,
        created_at: str | None = None,
    ) -> None:
        self._backend = backend
        self.dim = dim
        self.index_type = index_type
        self.params = dict(params or {})
        self.model_version_id = model_version_id
        self.created_at = created_at or datetime.now(UTC).isoformat()

    @property
    def ntotal(self) -> int:
        return self._backend.ntotal

    @classmethod
    def build(
        cls,
        vectors: VectorSource,
        dim: int,
        *,
        n_total: int | None = None,
        recall_target: float = 0.95,
        seed: int = 0,
        model_version_id: int | None = None,
        flat_max: int = FLAT_MAX_VECTORS,
    ) -> VectorIndex:
        """Build from chunks of (crop ids, vectors).

        ``vectors`` is a callable returning a fresh iterable of chunks (each call one pass
        over the data), or a re-iterable such as a list; a one-shot iterator is read into
        memory first. Small inputs take one pass; the IVF takes a sampling pass (training
        vectors at random positions) and an add pass, plus a counting pass if ``n_total``
        is not given. A pass that yields another count than ``n_total`` is an error."""
        passes = _reiterable(vectors)
        n = n_total if n_total is not None else sum(len(ids) for ids, _ in _chunks(passes, dim))
        if n < flat_max:
            return cls._build_flat(passes, dim, n, model_version_id)
        return cls._build_ivf(passes, dim, n, recall_target, seed, model_version_id)

    @classmethod
    def _build_flat(
        cls, passes: Callable[[], Iterable[Chunk]], dim: int, n: int, mv: int | None
    ) -> VectorIndex:
        flat = _Flat.empty(dim)
        for ids, x in _chunks(passes, dim):
            flat.add(ids, x)
        _check_count(flat.ntotal, n)
        return cls(flat, dim, "Flat", {"metric": "inner_product"}, mv)

    @classmethod
    def _build_ivf(
        cls,
        passes: Callable[[], Iterable[Chunk]],
        dim: int,
        n: int,
        target: float,
        seed: int,
        mv: int | None,
    ) -> VectorIndex:
        started = time.monotonic()
        nlist = nlist_for(n)
        rng = np.random.default_rng(seed)
        n_queries = min(CALIBRATION_QUERIES, n // 10)
        n_train = min(n - n_queries, TRAIN_POINTS_PER_LIST * nlist)
        picks = rng.choice(n, n_train + n_queries, replace=False)  # in random order
        rows = _collect(passes, dim, n, picks)
        # Calibration queries are never training points: k-means fits the lists around those,
        # which would flatter the measured recall (0.97 vs 0.95 at 100k).
        queries = _query_like(rows[n_train:], rng)
        ivf = _train_ivf(rows[:n_train], dim, nlist, seed)
        subset = rows[: min(n_train, PQ_TRAIN_MAX)].copy()  # rows are in random order
        del rows  # the subset is all the later steps need
        ivf.train(subset)  # the coarse quantizer is trained already: this trains the PQ
        centroids = ivf.quantizer.reconstruct_n(0, nlist)
        codec = ResidualSQ7.train(_residuals(ivf, centroids, subset))
        del subset
        backend, truth = _add_all(passes, dim, n, ivf, centroids, codec, queries)
        found = _tune(backend, queries, truth, target)
        params = {
            "metric": "inner_product",
            "nlist": nlist,
            "pq_m": ivf.pq.M,
            "refine": f"SQ{SQ_BITS}r",
            **found,
            "recall_target": target,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        index_type = f"IVF{nlist},PQ{ivf.pq.M}x8,RerankSQ{SQ_BITS}r"
        return cls(backend, dim, index_type, params, mv)

    # --- use ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, crop ids), each (nq, k), best first; scores are cosines (queries are
        normalised here). Missing results have id -1 and score -inf."""
        q = _normalised(np.atleast_2d(queries), self.dim)
        if k <= 0 or self.ntotal == 0:
            return np.full((len(q), max(k, 0)), -np.inf, np.float32), np.full(
                (len(q), max(k, 0)), -1, np.int64
            )
        scores, ids = self._backend.search(q, k)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "dim": self.dim,
            "n": self.ntotal,
            "index_type": self.index_type,
            "params": self.params,
            "model_version_id": self.model_version_id,
            "created_at": self.created_at,
            "memory_bytes": self._backend.memory_bytes(),
        }

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (FAISS), its sidecar ``.json`` and, for the IVF, ``.refine.npz``;
        each through a temporary file, the sidecar last."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._backend.write(path)
        meta = json.dumps(self.describe(), indent=2).encode()
        _atomic_write(_sidecar_path(path), lambda tmp: tmp.write_bytes(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        path = Path(path)
        meta = json.loads(_sidecar_path(path).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unknown index format {meta.get('format')!r}")
        params = meta.get("params") or {}
        backend: _Backend
        if meta["index_type"] == "Flat":
            backend = _Flat(faiss.read_index(str(path)))
        else:
            backend = _IVFRerank.read(path, params)
        if backend.ntotal != meta["n"]:
            raise ValueError(f"{path}: holds {backend.ntotal} vectors, sidecar says {meta['n']}")
        return cls(
            backend,
            int(meta["dim"]),
            meta["index_type"],
            params,
            meta.get("model_version_id"),
            meta.get("created_at"),
        )


# --- build steps -------------------------------------------------------------------------------
def _reiterable(vectors: VectorSource) -> Callable[[], Iterable[Chunk]]:
    if callable(vectors):
        return vectors
    if isinstance(vectors, Iterator):  # one pass only: keep it for the later passes
        kept = list(vectors)
        return lambda: kept
    return lambda: vectors


def _chunks(passes: Callable[[], Iterable[Chunk]], dim: int) -> Iterator[Chunk]:
    """One pass: validated, normalised chunks of at most ``SUB_CHUNK`` rows."""
    for ids, vectors in passes():
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(ids), dim):
            raise ValueError(f"chunk of {vectors.shape} vectors for {len(ids)} ids, dim {dim}")
        for s in range(0, len(ids), SUB_CHUNK):
            yield ids[s : s + SUB_CHUNK], _normalised(vectors[s : s + SUB_CHUNK], dim)


def _normalised(x: np.ndarray, dim: int) -> np.ndarray:
    if x.shape[-1] != dim:
        raise ValueError(f"vectors of dimension {x.shape[-1]}, index dimension {dim}")
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)  # the caller's vectors should be unit already; cosine needs it
    return out


def _check_count(seen: int, n: int) -> None:
    if seen != n:
        raise ValueError(f"the vectors changed between passes: {seen} seen, {n} expected")


def _collect(
    passes: Callable[[], Iterable[Chunk]], dim: int, n: int, picks: np.ndarray
) -> np.ndarray:
    """The vectors at positions ``picks`` of a pass, in ``picks`` order."""
    out = np.empty((len(picks), dim), np.float32)
    order = np.argsort(picks)
    wanted = picks[order]
    start = 0
    for _, x in _chunks(passes, dim):
        lo, hi = np.searchsorted(wanted, [start, start + len(x)])
        out[order[lo:hi]] = x[wanted[lo:hi] - start]
        start += len(x)
    _check_count(start, n)
    return out


def _train_ivf(sample: np.ndarray, dim: int, nlist: int, seed: int) -> faiss.IndexIVFPQ:
    """Spherical k-means for the lists (unit centroids: the coarse inner product is a cosine),
    then an untrained IVF-PQ around them."""
    clustering = faiss.Clustering(dim, nlist)
    clustering.niter = KMEANS_ITERATIONS
    clustering.spherical = True
    clustering.seed = seed
    clustering.max_points_per_centroid = TRAIN_POINTS_PER_LIST + 1  # we sampled already
    quantizer = faiss.IndexFlatIP(dim)
    clustering.train(sample, quantizer)
    ivf = faiss.IndexIVFPQ(
        quantizer, dim, nlist, pq_subquantizers(dim), 8, faiss.METRIC_INNER_PRODUCT
    )
    ivf.pq.cp.niter = KMEANS_ITERATIONS
    ivf.pq.cp.seed = seed
    return ivf


def _query_like(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Calibration queries: database vectors moved off the data by isotropic noise.

    A database vector itself is too easy a query: the lists are cut around the data, so its
    neighbours sit in its own list, while a real query (another photo of a product, a text)
    lies off the data and nearer list borders."""
    noise = rng.standard_normal(x.shape, dtype=np.float32) / np.float32(math.sqrt(x.shape[1]))
    out = x + np.float32(QUERY_NOISE) * noise
    faiss.normalize_L2(out)
    return out


def _residuals(ivf: faiss.IndexIVFPQ, centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    _, assign = ivf.quantizer.search(x, 1)
    return x - centroids[assign[:, 0]]


def _add_all(
    passes: Callable[[], Iterable[Chunk]],
    dim: int,
    n: int,
    ivf: faiss.IndexIVFPQ,
    centroids: np.ndarray,
    codec: ResidualSQ7,
    queries: np.ndarray,
) -> tuple[_IVFRerank, np.ndarray]:
    """The add pass. It also computes the exact top-k of the calibration queries, so recall
    can be measured without another pass over the data."""
    codes = np.empty((n, codec.code_size), np.uint8)  # pages become resident as they fill
    lists = np.empty(n, np.int32)
    ids = np.empty(n, np.int64)
    heap = faiss.ResultHeap(len(queries), RECALL_K, keep_max=True)
    start = 0
    for chunk_ids, x in _chunks(passes, dim):
        end = start + len(x)
        if end > n:
            break
        _, assign = ivf.quantizer.search(x, 1)
        assign = assign[:, 0]
        positions = np.arange(start, end, dtype=np.int64)  # named: add_preassigned drops
        add_preassigned(ivf, x, assign, positions)  # its own reference before using the pointer
        codes[start:end] = codec.encode(x - centroids[assign])
        lists[start:end] = assign
        ids[start:end] = chunk_ids
        scores, local = faiss.knn(queries, x, min(heap.k, len(x)), faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(local >= 0, chunk_ids[np.maximum(local, 0)], -1))
        start = end
    _check_count(start, n)
    heap.finalize()
    return _IVFRerank(ivf, codec, codes, lists, ids), heap.I


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f, t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def _tune(
    backend: _IVFRerank, queries: np.ndarray, truth: np.ndarray, target: float
) -> dict[str, Any]:
    """Smallest nprobe, then smallest rerank, whose recall@k meets ``target`` with margin:
    the sample recall minus two standard errors, so the target holds beyond these queries."""
    trials = truth.shape[0] * truth.shape[1]

    def confident(nprobe: int, rerank: int) -> tuple[bool, float]:
        backend.nprobe, backend.rerank = nprobe, rerank
        recall = _recall(backend.search(queries, RECALL_K)[1], truth)
        margin = 2 * math.sqrt(recall * (1 - recall) / trials)
        return recall - margin >= target, recall

    probes = [p for p in NPROBE_STEPS if p <= backend.ivf.nlist]
    nprobe = next((p for p in probes if confident(p, RERANK_STEPS[-1])[0]), probes[-1])
    rerank = next((r for r in RERANK_STEPS if confident(nprobe, r)[0]), RERANK_STEPS[-1])
    met, recall = confident(nprobe, rerank)
    if not met:
        log.warning(
            "recall@%d %.3f is below the target %.3f at the largest settings",
            RECALL_K,
            recall,
            target,
        )
    return {
        "nprobe": nprobe,
        "rerank": rerank,
        "calibration_recall": round(recall, 4),
        "calibration_queries": len(queries),
        "recall_met": met,
    }


# --- files and the served version --------------------------------------------------------------
def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _refine_path(path: Path) -> Path:
    return path.with_suffix(".refine.npz")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, flush it to disk, rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def write_versioned(index: VectorIndex, directory: str | Path) -> Path:
    """Save as ``index-<UTC timestamp>-<n>.faiss`` in ``directory``, then repoint
    ``current.json`` at it: readers switch only to a completely written index."""
    directory = Path(directory)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = index.save(directory / f"index-{stamp}-{index.ntotal}.faiss")
    pointer = {
        "index": path.name,
        "n": index.ntotal,
        "model_version_id": index.model_version_id,
        "switched_at": datetime.now(UTC).isoformat(),
    }
    _atomic_write(directory / CURRENT, lambda tmp: tmp.write_text(json.dumps(pointer)))
    return path


def current_path(directory: str | Path) -> Path:
    """The index file ``current.json`` names; FileNotFoundError when there is none."""
    directory = Path(directory)
    name = json.loads((directory / CURRENT).read_text())["index"]
    return directory / Path(name).name  # a bare name: the pointer cannot leave the directory


def load_current(directory: str | Path) -> VectorIndex:
    return VectorIndex.load(current_path(directory))


class IndexHolder:
    """The served index of a long-running process.

    ``get()`` is cheap: at most every ``check_interval`` seconds it stats ``current.json``, and
    only when that changed does one caller load the new index, while every other thread keeps
    getting the old one until the new one is fully loaded; then the reference is swapped.
    A query holding the old index finishes on it. A failed load is logged and the old index
    kept (retried at the next check). Two indexes are in memory during a swap."""

    def __init__(self, directory: str | Path, check_interval: float = 2.0) -> None:
        self.directory = Path(directory)
        self.check_interval = check_interval
        self._index: VectorIndex | None = None
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the pointer
        self._loaded: Path | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()

    def get(self) -> VectorIndex | None:
        """The current index, or None while no index has been written."""
        if time.monotonic() >= self._next_check:
            self._refresh()
        return self._index

    def _refresh(self) -> None:
        # With nothing to serve yet, wait for a loading thread rather than answer None.
        if not self._lock.acquire(blocking=self._index is None):
            return
        try:
            if time.monotonic() < self._next_check:
                return  # another thread just checked
            self._next_check = time.monotonic() + self.check_interval
            self._reload_if_changed()
        except Exception:
            log.exception(
                "cannot load the index named by %s; serving the previous one",
                self.directory / CURRENT,
            )
        finally:
            self._lock.release()

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self.directory / CURRENT)
        except FileNotFoundError:
            return
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        path = current_path(self.directory)
        if path != self._loaded:
            index = VectorIndex.load(path)
            log.info("serving index %s (%d vectors)", path.name, index.ntotal)
            self._index, self._loaded = index, path
        self._seen = seen


# --- from the database -------------------------------------------------------------------------
def build_from_database(
    settings: Settings, model_version_id: int, directory: str | Path, *, chunk_rows: int = 20_000
) -> Path:
    """Index every embedding of ``model_version_id``, switch ``directory`` to it and record
    the build as the active one. Rows added during the build wait for the next build: the
    passes read embeddings up to the id that was highest when the build started."""
    from sqlalchemy import func, select, update

    from db.schema import Embedding, IndexBuild
    from db.session import session_scope

    of_version = Embedding.model_version_id == model_version_id
    with session_scope(settings) as session:
        n, top, dims = session.execute(
            select(
                func.count(), func.max(Embedding.id), func.count(func.distinct(Embedding.dim))
            ).where(of_version)
        ).one()
        dim = session.scalar(select(Embedding.dim).where(of_version).limit(1))
    if not n or dims != 1:
        raise ValueError(f"model version {model_version_id}: {n} embeddings of {dims} dims")

    def chunks() -> Iterator[Chunk]:
        query = (
            select(Embedding.crop_id, Embedding.vector)
            .where(of_version, Embedding.id <= top)
            .order_by(Embedding.id)
            .execution_options(yield_per=chunk_rows)
        )
        with session_scope(settings) as session:
            for rows in session.execute(query).partitions():
                ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
                blob = b"".join(r[1] for r in rows)
                yield ids, np.frombuffer(blob, dtype="<f4").reshape(len(rows), dim)

    index = VectorIndex.build(chunks, dim, n_total=n, model_version_id=model_version_id)
    path = write_versioned(index, directory)
    with session_scope(settings) as session:
        session.execute(update(IndexBuild).values(active=False))
        # The finalize task claims a build row ("building") before calling us: fill it in.
        claimed = session.scalars(
            select(IndexBuild).where(
                IndexBuild.model_version_id == model_version_id, IndexBuild.status == "building"
            )
        ).first()
        build = claimed or IndexBuild(model_version_id=model_version_id)
        build.path, build.index_type = str(path), index.index_type
        build.n_vectors, build.params, build.active = index.ntotal, index.params, True
        build.status = "ready"
        session.add(build)
    return path
