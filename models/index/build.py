"""Building the index: validated passes over (crop ids, vectors) chunks, the IVF's lists and
codes, and the tuning of ``nprobe`` and ``rerank`` to a recall target (see ``models.index``)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned

from models.index.codec import RERANK_STEPS, Flat, IVFRefined, extra_bits, sq_range

log = logging.getLogger(__name__)

Chunk = tuple[np.ndarray, np.ndarray]  # (int64 ids, (m, dim) float32 vectors)
VectorSource = Iterable[Chunk] | Callable[[], Iterable[Chunk]]

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
SQ_RANGE_SIGMAS = 3.5  # each dimension's range: mean ± 3.5 sd of the residuals (best measured)


# --- sizes ---------------------------------------------------------------------------------
def nlist_for(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest 4·sqrt(n) (the low end of the FAISS
    guideline, because training and assignment cost grow with nlist and the build has two
    cores), capped so every list gets ``TRAIN_POINTS_PER_LIST`` training points."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(target, n // TRAIN_POINTS_PER_LIST))


# --- the two builds ----------------------------------------------------------------------------
def build_flat(passes: Callable[[], Iterable[Chunk]], dim: int, n: int) -> Flat:
    """The exact index: one pass."""
    flat = Flat.empty(dim)
    for ids, x in chunks(passes, dim):
        flat.add(ids, x)
    _check_count(flat.ntotal, n)
    return flat


def build_ivf(
    passes: Callable[[], Iterable[Chunk]], dim: int, n: int, target: float, seed: int
) -> tuple[IVFRefined, str, dict[str, Any]]:
    """The IVF with its refinement bits, tuned to ``target``: ``(backend, index type, params)``.
    Three passes: sample, assign, add."""
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
    backend = IVFRefined(ivf, bits, ids)
    found = _tune(backend, queries, truth, target)
    params = {
        "metric": "inner_product",
        "nlist": nlist,
        "refine_bits": 1,
        **found,
        "recall_target": target,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    return backend, f"IVF{nlist},SQ6+1", params


# --- build steps -------------------------------------------------------------------------------
def reiterable(vectors: VectorSource) -> Callable[[], Iterable[Chunk]]:
    if callable(vectors):
        return vectors
    if isinstance(vectors, Iterator):  # one pass only: keep it for the later passes
        kept = list(vectors)
        return lambda: kept
    return lambda: vectors


def chunks(passes: Callable[[], Iterable[Chunk]], dim: int) -> Iterator[Chunk]:
    """One pass: validated, normalised chunks of at most ``SUB_CHUNK`` rows."""
    for ids, vectors in passes():
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(ids), dim):
            raise ValueError(f"chunk of {vectors.shape} vectors for {len(ids)} ids, dim {dim}")
        for s in range(0, len(ids), SUB_CHUNK):
            yield ids[s : s + SUB_CHUNK], normalised(vectors[s : s + SUB_CHUNK], dim)


def normalised(x: np.ndarray, dim: int) -> np.ndarray:
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
    for _, x in chunks(passes, dim):
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
    for chunk_ids, x in chunks(passes, dim):
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
    assert ivf.invlists is not None  # an IVF index owns its inverted lists from construction
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
    vmin, vdiff = sq_range(ivf)
    # The IndexFlatIP of _kmeans; get_xb is its (flat) centroid table.
    quantizer = cast(faiss.IndexFlatIP, faiss.downcast_index(ivf.quantizer))
    centroids = faiss.rev_swig_ptr(quantizer.get_xb(), ivf.nlist * dim).reshape(ivf.nlist, dim)
    bits = np.empty((n, -(-dim // 8)), np.uint8)
    start = 0
    for chunk_ids, x in chunks(passes, dim):
        end = start + len(x)
        if end > n or not np.array_equal(ids[start:end], chunk_ids):
            raise ValueError("the vectors changed between passes (other ids or order)")
        lists = assign[start:end].astype(np.int64)
        positions = np.arange(start, end, dtype=np.int64)  # named: add_preassigned drops
        add_preassigned(ivf, x, lists, positions)  # its own reference before using it
        x -= centroids[lists]  # x is our copy and FAISS is done with it: the residuals
        bits[start:end] = extra_bits(x, vmin, vdiff)
        start = end
    _check_count(start, n)
    return bits


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f, t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def _tune(
    backend: IVFRefined, queries: np.ndarray, truth: np.ndarray, target: float
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
