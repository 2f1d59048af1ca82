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
A loaded index is memory-mapped (FAISS's ``IO_FLAG_MMAP``/``IO_FLAG_MMAP_IFC`` for the lists or
the flat vectors, ``codec.mmap_npz`` for the extra bits and ids): its pages belong to the file,
so N API processes on one machine serving one index hold one copy in the page cache.

The package, by job: ``codec`` (the two backends: how vectors are stored and scored),
``build`` (the passes, the IVF's lists and codes, the tuning), ``vector_index`` (``VectorIndex``
and its files), ``files`` (versioned files and the ``current.json`` pointer), ``holder`` (the
served index of a long-running process), ``live`` (the served index as the catalog is now: a
delta of newer vectors, tombstones, per-crop filter facts, filtered search with FAISS id
selectors), ``atomic`` (write-then-rename). Reading embeddings from
the database and recording the build is the caller's part (workers/indexing.py).
"""

from __future__ import annotations

from models.index.build import FLAT_MAX_VECTORS, Chunk, VectorSource, nlist_for
from models.index.files import CURRENT, current_path, load_current, write_versioned
from models.index.holder import IndexHolder
from models.index.vector_index import FORMAT_VERSION, VectorIndex

__all__ = [
    "CURRENT",
    "FLAT_MAX_VECTORS",
    "FORMAT_VERSION",
    "Chunk",
    "IndexHolder",
    "VectorIndex",
    "VectorSource",
    "current_path",
    "load_current",
    "nlist_for",
    "write_versioned",
]
