"""The FAISS index over crop embeddings: build, search, save, and swap without a pause.

Scores are cosine similarities: vectors are L2-normalised and compared by inner product
(``METRIC_INNER_PRODUCT``). The prototype used ``IndexFlatL2`` and called ``1 - distance`` a
cosine; FAISS returns *squared* L2, so that was ``2*cos - 1``.

Which index, by size (n vectors of dimension d):

* ``n < FLAT_MAX_VECTORS`` (20,000): exact ``IndexFlatIP``. At d=512 one query costs ~1.6 ms
  single-threaded on the 2-core reference machine, the edge of the 2 ms budget, and memory is
  no concern (40 MB); above that, an exact scan no longer fits the latency.
* otherwise ``IVF{nlist},SQ6+1``: an ``IndexIVFScalarQuantizer`` with nlist ≈ 4·sqrt(n) lists
  (a power of two; spherical k-means on 24 sampled points per list) storing 6-bit codes of each
  vector's residual to its list centroid, plus one refinement bit per dimension kept beside it.
  FAISS scans the probed lists and shortlists k·rerank candidates by their 6-bit scores; the
  extra bit then halves each coordinate's quantization error and the shortlist is re-sorted.

  Why 7 bits per dimension: near neighbours of embeddings shaped like CLIP's sit ~0.001 apart in
  cosine, so ranking them takes precise codes. Measured on the benchmark data (recall@10 of a
  perfect top-100 shortlist re-ranked): raw vectors SQ4 0.72, SQ6 0.92, SQ8 0.98; residuals
  SQ6 0.958, 7 bits 0.976, SQ8 0.986 (residuals span a narrower range, so the same bits resolve
  finer). PQ at 4 bits/dim gets 0.80. At 1M vectors float32 (2 GiB), fp16 (1 GiB) and SQ8
  (512 MiB) leave no room in a 600 MB process; 7 bits are 448 MiB. FAISS has no 7-bit codec:
  6 bits in FAISS (fast SIMD scanning) + 1 bit re-scored in numpy over the shortlist only.

  ``nprobe`` and ``rerank`` are tuned at build time to a recall target. 256 sampled vectors,
  moved off the data by noise (``_query_like``) and never used for training, serve as queries;
  their exact top-k is computed during a pass over the data. nprobe grows (rerank at its
  maximum) until the recall's lower confidence bound (recall − 2 standard errors) reaches the
  target, then rerank shrinks to the smallest value that still does. The chosen values and the
  measured recall are kept with the index (``params``, ``describe()``).

  The build streams the data three times (sample; assign; add) and holds at most the sample,
  the index and one small chunk: at 1M x 512, ~47 s and ~550 MiB peak on 2 cores.

Files: ``<name>.faiss`` (``faiss.write_index``), ``<name>.json`` (the sidecar: dim, n, type,
params, model version, creation time) and for the IVF ``<name>.refine.npz`` (the extra bits
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
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

if TYPE_CHECKING:
    from flickd.core.settings import Settings

log = logging.getLogger(__name__)

Chunk = tuple[np.ndarray, np.ndarray]  # (int64 ids, (m, dim) float32 vectors)
VectorSource = Iterable[Chunk] | Callable[[], Iterable[Chunk]]

FORMAT_VERSION = 1
CURRENT = "current.json"

FLAT_MAX_VECTORS = 20_000
SUB_CHUNK = 2048  # rows encoded at a time: bounds the build's temporary arrays (~4 MB each)
# k-means points per list: fewer than FAISS's advice (39) because k-means is the largest build
# cost on two cores. Measured at 1M: k-means 15 s and recall@10 0.964 (40 per list: 52 s, 0.968).
TRAIN_POINTS_PER_LIST = 24
KMEANS_ITERATIONS = 10  # the lists only have to partition, not be optimal: 10 is plenty
SQ_TRAIN_MAX = 32_768  # plenty for per-dimension mean/sd; FAISS copies it twice while training
CALIBRATION_QUERIES = 256
QUERY_NOISE = 0.3  # calibration query = normalise(vector + 0.3·N(0, I/d)): cosine ~0.96 to it
RECALL_K = 10
NPROBE_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RERANK_STEPS = (1, 2, 3, 4, 6, 8, 12, 16)  # shortlist = k x rerank
SQ_LEVELS = 63  # FAISS's 6-bit codec: code = floor(63·t) for t in [0, 1], decoded at +0.5
SQ_RANGE_SIGMAS = 3.5  # each dimension's range: mean ± 3.5 sd of the residuals (best measured)


# --- sizes ---------------------------------------------------------------------------------
def nlist_for(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest 4·sqrt(n) (the low end of the FAISS
    guideline, because training and assignment cost grow with nlist and the build has two
    cores), capped so every list gets ``TRAIN_POINTS_PER_LIST`` training points."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(target, n // TRAIN_POINTS_PER_LIST))


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


class _IVFRefined:
    """IVF-SQ6 shortlist (FAISS) re-scored with one more bit per dimension.

    FAISS's 6-bit codec cuts each dimension's range into 63 cells and decodes a value at its
    cell's centre. The extra bit says which half of its cell the value lies in, which moves
    the decoded value a quarter cell: q·x ≈ (FAISS's score) + Σ q_d·(vdiff_d/252)·(2·bit_d − 1).
    FAISS ids are positions into ``bits`` and ``ids``; ``ids`` maps a position to a crop id."""

    def __init__(
        self,
        ivf: faiss.IndexIVFScalarQuantizer,
        bits: np.ndarray,
        ids: np.ndarray,
        nprobe: int = 1,
        rerank: int = RERANK_STEPS[-1],
    ) -> None:
        self.ivf, self.bits, self.ids = ivf, bits, ids
        self.nprobe, self.rerank = nprobe, rerank
        _, vdiff = _sq_range(ivf)
        self._quarter = (vdiff / (4 * SQ_LEVELS)).astype(np.float32)

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        shortlist = k * self.rerank
        # Per-call parameters, not ``ivf.nprobe``: searches may run in several threads at once.
        params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.ivf.nlist))
        coarse, pos = self.ivf.search(queries, shortlist, params=params)
        scores = np.empty(pos.shape, np.float32)
        block = max(1, 8192 // shortlist)  # bounds the unpacked (block, shortlist, d) bits
        for s in range(0, len(queries), block):
            e = s + block
            scores[s:e] = self._refine(queries[s:e], coarse[s:e], pos[s:e])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(pos, order, axis=1)
        ids = np.where(best >= 0, self.ids[np.maximum(best, 0)], -1)
        return np.take_along_axis(scores, order, axis=1), ids

    def _refine(self, queries: np.ndarray, coarse: np.ndarray, pos: np.ndarray) -> np.ndarray:
        valid = pos >= 0
        packed = self.bits[np.where(valid, pos, 0)]
        bits = np.unpackbits(packed, axis=-1, count=self.ivf.d).astype(np.float32)
        weights = queries * self._quarter
        scores = coarse + 2 * np.einsum("qcd,qd->qc", bits, weights)
        scores -= weights.sum(axis=1, keepdims=True)
        scores[~valid] = -np.inf
        return scores

    def write(self, path: Path) -> None:
        def arrays(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, bits=self.bits, ids=self.ids)

        _atomic_write(_refine_path(path), arrays)
        _atomic_write(path, lambda tmp: faiss.write_index(self.ivf, str(tmp)))

    @classmethod
    def read(cls, path: Path, params: dict[str, Any]) -> _IVFRefined:
        ivf = faiss.read_index(str(path))  # already the IndexIVFScalarQuantizer proxy
        with np.load(_refine_path(path)) as data:
            bits, ids = data["bits"], data["ids"]
        return cls(ivf, bits, ids, int(params["nprobe"]), int(params["rerank"]))

    def memory_bytes(self) -> int:
        lists = self.ntotal * (self.ivf.code_size + 8)  # SQ6 codes + int64 ids
        centroids = self.ivf.nlist * self.ivf.d * 4
        return lists + centroids + self.bits.nbytes + self.ids.nbytes


def _sq_range(ivf: faiss.IndexIVFScalarQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (vmin, vdiff) of the trained 6-bit quantizer."""
    trained = faiss.vector_to_array(ivf.sq.trained)
    return trained[: ivf.d], trained[ivf.d : 2 * ivf.d]


def _extra_bits(residuals: np.ndarray, vmin: np.ndarray, vdiff: np.ndarray) -> np.ndarray:
    """The refinement bit of each residual coordinate, packed 8 per byte. FAISS encodes
    t = clip((r − vmin)/vdiff, 0, 1) as floor(63·t); the bit is the upper half of that cell."""
    cells = np.clip((residuals - vmin) / vdiff, 0.0, 1.0)
    cells *= np.float32(SQ_LEVELS)
    return np.packbits(cells % 1.0 >= 0.5, axis=1)


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
        memory first. Small inputs take one pass; the IVF takes three (sample, assign, add),
        plus a counting pass if ``n_total`` is not given. Passes must yield the same ids in
        the same order; anything else (another count than ``n_total``) is an error."""
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
        # which flattered the measured recall (0.97 measured vs 0.95 true at 100k).
        queries = _query_like(rows[n_train:], rng)
        ivf = _new_ivf(_kmeans(rows[:n_train], dim, nlist, seed), dim, nlist)
        ivf.train(rows[: min(n_train, SQ_TRAIN_MAX)])  # lists are trained: this fits the SQ
        del rows
        ids, assign, truth = _assign_all(passes, dim, n, ivf.quantizer, queries)
        _reserve(ivf, assign)
        bits = _add_all(passes, dim, n, ivf, ids, assign)
        del assign
        backend = _IVFRefined(ivf, bits, ids)
        found = _tune(backend, queries, truth, target)
        params = {
            "metric": "inner_product",
            "nlist": nlist,
            "refine_bits": 1,
            **found,
            "recall_target": target,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        index_type = f"IVF{nlist},SQ6+1"
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
            backend = _IVFRefined.read(path, params)
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


def _kmeans(sample: np.ndarray, dim: int, nlist: int, seed: int) -> faiss.IndexFlatIP:
    """The coarse quantizer: spherical k-means, so centroids are unit vectors and the coarse
    inner product is a cosine like every other score."""
    clustering = faiss.Clustering(dim, nlist)
    clustering.niter = KMEANS_ITERATIONS
    clustering.spherical = True
    clustering.seed = seed
    clustering.min_points_per_centroid = TRAIN_POINTS_PER_LIST  # we chose it: no warning
    clustering.max_points_per_centroid = TRAIN_POINTS_PER_LIST + 1  # sampled already
    quantizer = faiss.IndexFlatIP(dim)
    clustering.train(sample, quantizer)
    return quantizer


def _new_ivf(quantizer: faiss.IndexFlatIP, dim: int, nlist: int) -> faiss.IndexIVFScalarQuantizer:
    """IVF over ``quantizer`` storing 6-bit codes of each vector's residual to its centroid:
    residuals span a narrower range than the vectors, so the same bits resolve finer."""
    ivf = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_6bit, faiss.METRIC_INNER_PRODUCT, True
    )
    ivf.sq.rangestat = faiss.ScalarQuantizer.RS_meanstd
    ivf.sq.rangestat_arg = SQ_RANGE_SIGMAS
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


def _assign_all(
    passes: Callable[[], Iterable[Chunk]],
    dim: int,
    n: int,
    quantizer: faiss.Index,
    queries: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First full pass: every vector's list (so the lists can be allocated at their final
    size) and, on the way, the exact top-k of the calibration queries."""
    ids = np.empty(n, np.int64)
    assign = np.empty(n, np.int32)
    heap = faiss.ResultHeap(len(queries), RECALL_K, keep_max=True)
    start = 0
    for chunk_ids, x in _chunks(passes, dim):
        end = start + len(x)
        if end > n:
            raise ValueError(f"the vectors changed between passes: more than {n}")
        ids[start:end] = chunk_ids
        assign[start:end] = quantizer.search(x, 1)[1][:, 0]
        scores, local = faiss.knn(queries, x, min(RECALL_K, len(x)), faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(local >= 0, chunk_ids[np.maximum(local, 0)], -1))
        start = end
    _check_count(start, n)
    heap.finalize()
    return ids, assign, heap.I


def _reserve(ivf: faiss.IndexIVFScalarQuantizer, assign: np.ndarray) -> None:
    """Allocate every inverted list at its final size: lists grown chunk by chunk keep up to
    twice the capacity they need (std::vector doubling), on the largest structure there is."""
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    for list_no, size in enumerate(np.bincount(assign, minlength=ivf.nlist).tolist()):
        if size:
            lists.resize(list_no, size)  # exact capacity...
            lists.resize(list_no, 0)  # ...kept while the list is emptied for the add pass


def _add_all(
    passes: Callable[[], Iterable[Chunk]],
    dim: int,
    n: int,
    ivf: faiss.IndexIVFScalarQuantizer,
    ids: np.ndarray,
    assign: np.ndarray,
) -> np.ndarray:
    """Second full pass: add with the assignment of the first, and keep the extra bits."""
    vmin, vdiff = _sq_range(ivf)
    quantizer = faiss.downcast_index(ivf.quantizer)
    centroids = faiss.rev_swig_ptr(quantizer.get_xb(), ivf.nlist * dim).reshape(ivf.nlist, dim)
    bits = np.empty((n, -(-dim // 8)), np.uint8)
    start = 0
    for chunk_ids, x in _chunks(passes, dim):
        end = start + len(x)
        if end > n or not np.array_equal(ids[start:end], chunk_ids):
            raise ValueError("the vectors changed between passes (other ids or order)")
        lists = assign[start:end].astype(np.int64)
        positions = np.arange(start, end, dtype=np.int64)  # named: add_preassigned drops
        add_preassigned(ivf, x, lists, positions)  # its own reference before using it
        x -= centroids[lists]  # x is our copy and FAISS is done with it: the residuals
        bits[start:end] = _extra_bits(x, vmin, vdiff)
        start = end
    _check_count(start, n)
    return bits


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f, t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def _tune(
    backend: _IVFRefined, queries: np.ndarray, truth: np.ndarray, target: float
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


def write_versioned(index: VectorIndex, directory: str | Path, *, keep: int = 3) -> Path:
    """Save as ``index-<UTC timestamp>-<n>.faiss`` in ``directory``, then repoint
    ``current.json`` at it: readers switch only to a completely written index. The ``keep``
    newest versions stay on disk (a reader may still be loading the previous one)."""
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
    _prune(directory, keep=max(1, keep))
    return path


def _prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete versions (the names sort by time). A version
    counts once its sidecar, written last, exists; files being written are never touched."""
    served = current_path(directory)
    sidecars = sorted(directory.glob("index-*.json"))
    for sidecar in sidecars[:-keep]:
        path = sidecar.with_suffix(".faiss")
        if path == served:  # a rollback may point at an old version
            continue
        for file in (_refine_path(path), path, sidecar):  # the sidecar last, as it came first
            file.unlink(missing_ok=True)


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
    settings: Settings, model_version_id: int, directory: str | Path, *, chunk_rows: int = 5_000
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
