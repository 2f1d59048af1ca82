"""How the index stores and scores vectors: the exact backend and the IVF-SQ6 backend with its
extra refinement bit (``IVFRefined``), and the bit arithmetic the build shares with them."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any, Protocol, cast

import faiss
import numpy as np

from models.index.atomic import atomic_write

RERANK_STEPS = (1, 2, 3, 4, 6, 8, 12, 16)  # shortlist = k x rerank
SQ_LEVELS = 63  # FAISS's 6-bit codec: code = floor(63·t) for t in [0, 1], decoded at +0.5


class Backend(Protocol):
    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def search_selected(
        self, queries: np.ndarray, k: int, bitmap: np.ndarray, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def position_ids(self) -> np.ndarray: ...
    def write(self, path: Path) -> None: ...
    def memory_bytes(self) -> int: ...


class Flat:
    """Exact search; FAISS maps its positions back to crop ids."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    @classmethod
    def empty(cls, dim: int) -> Flat:
        return cls(faiss.IndexIDMap(faiss.IndexFlatIP(dim)))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def search_selected(
        self, queries: np.ndarray, k: int, bitmap: np.ndarray, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search among the positions set in ``bitmap`` (see ``selector``)."""
        mapped = cast(faiss.IndexIDMap, self.index)
        inner = faiss.downcast_index(mapped.index)  # positions, not the IDMap's ids
        params = faiss.SearchParameters()
        params.sel = selector(bitmap, self.ntotal)
        scores, pos = inner.search(queries, k, params=params)
        ids = self.position_ids()
        return scores, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)

    def position_ids(self) -> np.ndarray:
        """Crop id of each stored position."""
        mapped = cast(faiss.IndexIDMap, self.index)
        return faiss.vector_to_array(mapped.id_map).astype(np.int64, copy=False)

    def write(self, path: Path) -> None:
        atomic_write(path, lambda tmp: faiss.write_index(self.index, str(tmp)))

    def memory_bytes(self) -> int:
        return self.ntotal * (self.index.d * 4 + 8)


class IVFRefined:
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
        _, vdiff = sq_range(ivf)
        self._quarter = (vdiff / (4 * SQ_LEVELS)).astype(np.float32)

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search(queries, k, None, self.nprobe)

    def search_selected(
        self, queries: np.ndarray, k: int, bitmap: np.ndarray, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search among the positions set in ``bitmap`` only, probing ``nprobe`` lists (the
        tuned number by default; ``nlist`` scans every list: complete)."""
        return self._search(queries, k, selector(bitmap, self.ntotal), nprobe or self.nprobe)

    def position_ids(self) -> np.ndarray:
        return self.ids

    def _search(
        self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        shortlist = k * self.rerank
        # Per-call parameters, not ``ivf.nprobe``: searches may run in several threads at once.
        params = faiss.SearchParametersIVF()
        params.nprobe = min(nprobe, self.ivf.nlist)
        if sel is not None:
            params.sel = sel
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

        atomic_write(refine_path(path), arrays)
        atomic_write(path, lambda tmp: faiss.write_index(self.ivf, str(tmp)))

    @classmethod
    def read(cls, path: Path, params: dict[str, Any]) -> IVFRefined:
        """Memory-mapped: the lists' codes (FAISS's ``IO_FLAG_MMAP``) and the bits and ids
        (members of the uncompressed ``.npz``) stay in the file's pages, which the kernel
        shares between every process serving the same file."""
        # already the IndexIVFScalarQuantizer proxy
        ivf = cast(faiss.IndexIVFScalarQuantizer, faiss.read_index(str(path), faiss.IO_FLAG_MMAP))
        arrays = mmap_npz(refine_path(path))
        return cls(ivf, arrays["bits"], arrays["ids"], int(params["nprobe"]), int(params["rerank"]))

    def memory_bytes(self) -> int:
        lists = self.ntotal * (self.ivf.code_size + 8)  # SQ6 codes + int64 ids
        centroids = self.ivf.nlist * self.ivf.d * 4
        return lists + centroids + self.bits.nbytes + self.ids.nbytes


def read_flat(path: Path) -> Flat:
    """An exact index, its vectors memory-mapped (``IO_FLAG_MMAP_IFC``): read-only, shared by
    every process serving the same file."""
    return Flat(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC))


def mmap_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed ``.npz`` (what ``np.savez`` writes), memory-mapped in place.
    ``np.load`` ignores ``mmap_mode`` for archives and reads every array into memory; each
    member of a stored (not deflated) zip is a plain ``.npy`` at a fixed offset, so it maps."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: {info.filename} is compressed and cannot be mapped")
            handle.seek(info.header_offset)
            local = handle.read(30)  # the local file header: its name and extra field follow
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            handle.seek(info.header_offset + 30 + name_len + extra_len)
            major, _minor = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            arrays[info.filename.removesuffix(".npy")] = np.memmap(
                path,
                dtype=dtype,
                mode="r",
                offset=handle.tell(),
                shape=shape,
                order="F" if fortran else "C",
            )
    return arrays


def selector(bitmap: np.ndarray, n: int) -> faiss.IDSelector:
    """A FAISS selector of the positions whose bit is set in ``bitmap`` (``np.packbits`` of a
    boolean mask with ``bitorder="little"``, FAISS's order). The selector keeps a reference to
    the array, which must outlive the search."""
    if bitmap.dtype != np.uint8 or len(bitmap) * 8 < n:
        raise ValueError(f"a bitmap of {len(bitmap)} bytes cannot cover {n} positions")
    bitmap = np.ascontiguousarray(bitmap)
    sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
    sel.referenced_bitmap = bitmap  # type: ignore[attr-defined]  # the C++ side holds a raw pointer: keep the array alive
    return sel


def sq_range(ivf: faiss.IndexIVFScalarQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (vmin, vdiff) of the trained 6-bit quantizer."""
    trained = faiss.vector_to_array(ivf.sq.trained)
    return trained[: ivf.d], trained[ivf.d : 2 * ivf.d]


def extra_bits(residuals: np.ndarray, vmin: np.ndarray, vdiff: np.ndarray) -> np.ndarray:
    """The refinement bit of each residual coordinate, packed 8 per byte. FAISS encodes
    t = clip((r − vmin)/vdiff, 0, 1) as floor(63·t); the bit is the upper half of that cell."""
    cells = np.clip((residuals - vmin) / vdiff, 0.0, 1.0)
    cells *= np.float32(SQ_LEVELS)
    return np.packbits(cells % 1.0 >= 0.5, axis=1)


def refine_path(path: Path) -> Path:
    return path.with_suffix(".refine.npz")
