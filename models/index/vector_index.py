"""``VectorIndex``: cosine search over crop embeddings, its build entry point and its files
(``<name>.faiss``, the ``<name>.json`` sidecar, the IVF's ``<name>.refine.npz``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from models.index.atomic import atomic_write
from models.index.build import (
    FLAT_MAX_VECTORS,
    VectorSource,
    build_flat,
    build_ivf,
    chunks,
    normalised,
    reiterable,
)
from models.index.codec import Backend, IVFRefined, read_flat

FORMAT_VERSION = 1


class VectorIndex:
    """Cosine-similarity search over crop embeddings; ids are crop ids (-1 pads)."""

    def __init__(
        self,
        backend: Backend,
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

    @property
    def backend(self) -> Backend:
        """How the vectors are stored (``Flat`` or ``IVFRefined``): filtered search and the
        live layer (``models.index.live``) use it directly."""
        return self._backend

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
        passes = reiterable(vectors)
        n = n_total if n_total is not None else sum(len(ids) for ids, _ in chunks(passes, dim))
        if n < flat_max:
            flat = build_flat(passes, dim, n)
            return cls(flat, dim, "Flat", {"metric": "inner_product"}, model_version_id)
        backend, index_type, params = build_ivf(passes, dim, n, recall_target, seed)
        return cls(backend, dim, index_type, params, model_version_id)

    # --- use ---------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, crop ids), each (nq, k), best first; scores are cosines (queries are
        normalised here). Missing results have id -1 and score -inf."""
        q = normalised(np.atleast_2d(queries), self.dim)
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
        atomic_write(sidecar_path(path), lambda tmp: tmp.write_bytes(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:
        path = Path(path)
        meta = json.loads(sidecar_path(path).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unknown index format {meta.get('format')!r}")
        params = meta.get("params") or {}
        flat = meta["index_type"] == "Flat"
        backend: Backend = read_flat(path) if flat else IVFRefined.read(path, params)
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


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")
