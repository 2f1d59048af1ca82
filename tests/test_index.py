"""The FAISS index: cosine scores, the IVF's recall target, files, the hot swap, the DB build."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.schema import Crop, Embedding, Image, IndexBuild, ModelVersion, Product
from db.session import session_scope
from flickd.core.settings import Settings
from models.index import CURRENT, IndexHolder, VectorIndex, load_current, write_versioned
from models.index.codec import IVFRefined, mmap_npz
from models.index.files import _prune
from workers.indexing import build_from_database


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int = 0, centres: int = 256) -> np.ndarray:
    """Shaped like the benchmark's data: normalise(centre + 0.8 * noise)."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim)))
    noise = rng.standard_normal((n, dim)) / np.sqrt(dim)
    return unit(c[rng.integers(0, centres, n)] + 0.8 * noise)


def near(x: np.ndarray, seed: int) -> np.ndarray:
    """Queries near database vectors, as real queries are: normalise(x + 0.3 * noise)."""
    rng = np.random.default_rng(seed)
    return unit(x + 0.3 * rng.standard_normal(x.shape) / np.sqrt(x.shape[1]))


def exact_top(queries: np.ndarray, data: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ data.T), axis=1)[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


def chunked(ids: np.ndarray, x: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(ids[s : s + size], x[s : s + size]) for s in range(0, len(ids), size)]


def flat_index(n: int, dim: int = 16, seed: int = 0) -> VectorIndex:
    x = clustered(n, dim, seed)
    return VectorIndex.build(chunked(np.arange(n, dtype=np.int64) + 1, x, 100), dim)


# --- exact ---------------------------------------------------------------------------------------
def test_flat_scores_are_cosines_and_ids_are_crop_ids() -> None:
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((800, 24)).astype(np.float32) * 3  # not unit: cosine all the same
    ids = np.arange(800, dtype=np.int64) * 7 + 1000
    index = VectorIndex.build(chunked(ids, raw, 128), 24, model_version_id=5)
    queries = rng.standard_normal((20, 24)).astype(np.float32)

    scores, found = index.search(queries, 10)

    cosines = unit(queries) @ unit(raw).T
    best = np.argsort(-cosines, axis=1)[:, :10]
    assert index.index_type == "Flat" and index.ntotal == 800 and index.model_version_id == 5
    np.testing.assert_array_equal(found, ids[best])
    np.testing.assert_allclose(scores, np.take_along_axis(cosines, best, axis=1), atol=1e-5)


def test_short_results_are_padded_and_a_one_shot_iterator_is_accepted() -> None:
    x = clustered(3, 8)
    index = VectorIndex.build(iter([(np.array([4, 5, 6]), x)]), 8)
    scores, ids = index.search(x[:1], 5)
    assert sorted(ids[0, :3].tolist()) == [4, 5, 6] and ids[0, 3:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 3:]).all() and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_a_wrong_n_total_is_an_error() -> None:
    x = clustered(50, 8)
    with pytest.raises(ValueError, match="changed between passes"):
        VectorIndex.build([(np.arange(50), x)], 8, n_total=60)


# --- approximate ---------------------------------------------------------------------------------
DIM = 32
N_IVF = 60_000


@pytest.fixture(scope="module")
def ivf_data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(N_IVF, DIM)
    ids = np.arange(N_IVF, dtype=np.int64) * 3 + 11  # crop ids are not positions
    return ids, x


@pytest.fixture(scope="module")
def ivf_index(ivf_data: tuple[np.ndarray, np.ndarray]) -> VectorIndex:
    ids, x = ivf_data
    # A callable: each call is one pass over the data, as from the database.
    return VectorIndex.build(lambda: iter(chunked(ids, x, 5000)), DIM, n_total=N_IVF)


def test_ivf_above_the_threshold_meets_the_recall_target(
    ivf_index: VectorIndex, ivf_data: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, x = ivf_data
    queries = near(x[np.random.default_rng(7).choice(N_IVF, 500, replace=False)], seed=8)

    scores, found = ivf_index.search(queries, 10)

    assert ivf_index.index_type.startswith("IVF")
    params = ivf_index.params
    assert params["recall_met"] and params["calibration_recall"] >= 0.95
    assert recall(found, exact_top(queries, x, ids, 10)) >= 0.95
    # Scores are cosines up to the 7-bit quantization, and ids map back to the vectors.
    position = (found - 11) // 3
    exact = np.einsum("qd,qkd->qk", queries, x[position])
    error = np.abs(scores - exact)
    assert error.mean() < 0.003 and np.percentile(error, 99) < 0.01  # clipped tails aside
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_the_extra_bit_halves_the_score_error(
    ivf_index: VectorIndex, ivf_data: tuple[np.ndarray, np.ndarray]
) -> None:
    _, x = ivf_data
    backend = ivf_index._backend  # the two stages, to compare their scores
    queries = near(x[:200], seed=9)
    coarse, positions = backend.ivf.search(queries, 10)
    refined = backend._refine(queries, coarse, positions)
    exact = np.einsum("qd,qkd->qk", queries, x[positions])
    ratio = np.abs(refined - exact).mean() / np.abs(coarse - exact).mean()
    assert ratio < 0.6  # 7 bits instead of 6: half the error in theory


def test_save_and_load_round_trip(ivf_index: VectorIndex, tmp_path: Path) -> None:
    queries = near(clustered(50, DIM, seed=3), seed=4)
    for index in (ivf_index, flat_index(300, DIM)):
        path = index.save(tmp_path / f"{index.index_type[:3]}.faiss")
        loaded = VectorIndex.load(path)
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["dim"] == DIM and sidecar["n"] == index.ntotal
        assert sidecar["index_type"] == index.index_type and sidecar["created_at"]
        assert loaded.describe() == index.describe()
        for got, want in zip(loaded.search(queries, 10), index.search(queries, 10), strict=True):
            np.testing.assert_array_equal(got, want)
    assert "nprobe" in ivf_index.params and not list(tmp_path.glob(".*.tmp"))


def _mapped_files() -> set[str]:
    """Files this process has memory-mapped (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split()) == 6}


def test_loaded_indexes_are_memory_mapped_not_copied(
    ivf_index: VectorIndex, tmp_path: Path
) -> None:
    # Mapped pages belong to the file, so every API process serving it shares one copy.
    queries = near(clustered(20, DIM, seed=5), seed=6)
    for index in (ivf_index, flat_index(300, DIM)):
        path = index.save(tmp_path / f"{index.index_type[:3]}.faiss")
        loaded = VectorIndex.load(path)
        mapped = _mapped_files()
        assert str(path) in mapped, f"{path.name} is read into memory, not mapped"
        if index.index_type != "Flat":
            assert str(path.with_suffix(".refine.npz")) in mapped
            backend = loaded._backend
            assert isinstance(backend, IVFRefined)
            assert isinstance(backend.bits, np.memmap) and isinstance(backend.ids, np.memmap)
        for got, want in zip(loaded.search(queries, 10), index.search(queries, 10), strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_compressed_refine_file_is_refused_not_half_read(tmp_path: Path) -> None:
    path = tmp_path / "x.refine.npz"
    np.savez_compressed(path, bits=np.zeros((4, 2), np.uint8), ids=np.arange(4))
    with pytest.raises(ValueError, match="compressed"):
        mmap_npz(path)
    plain = tmp_path / "y.refine.npz"
    np.savez(plain, bits=np.arange(6, dtype=np.uint8).reshape(3, 2), ids=np.arange(3) + 7)
    arrays = mmap_npz(plain)
    np.testing.assert_array_equal(arrays["bits"], np.arange(6).reshape(3, 2))
    np.testing.assert_array_equal(arrays["ids"], [7, 8, 9])


# --- switching ---------------------------------------------------------------------------------
def test_holder_serves_nothing_until_an_index_is_written(tmp_path: Path) -> None:
    holder = IndexHolder(tmp_path / "none-yet", check_interval=0)
    assert holder.get() is None
    write_versioned(flat_index(40), tmp_path / "none-yet")
    index = holder.get()
    assert index is not None and index.ntotal == 40
    assert holder.get() is index  # unchanged pointer: no reload


def test_a_caller_waits_for_the_first_index_another_thread_is_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API's warm-up thread loads the first index while /health asks for it: /health must
    # get that index, not None (the check time moves before the load finishes).
    directory = tmp_path / "index"
    write_versioned(flat_index(40), directory)
    holder = IndexHolder(directory, check_interval=60)
    loading, release = threading.Event(), threading.Event()
    real_load = VectorIndex.load

    def slow_load(path: Path) -> VectorIndex:
        loading.set()
        assert release.wait(10)
        return real_load(path)

    monkeypatch.setattr(VectorIndex, "load", staticmethod(slow_load))
    warm_up = threading.Thread(target=holder.get)
    warm_up.start()
    assert loading.wait(10)
    answers: list[VectorIndex | None] = []
    health = threading.Thread(target=lambda: answers.append(holder.get()))
    health.start()
    health.join(0.2)
    assert health.is_alive()  # waiting for the load, not answering None
    release.set()
    warm_up.join(10)
    health.join(10)
    assert answers and answers[0] is not None and answers[0].ntotal == 40


def test_swap_under_load_never_fails_and_switches(tmp_path: Path) -> None:
    directory = tmp_path / "index"
    first = write_versioned(flat_index(300), directory)
    holder = IndexHolder(directory, check_interval=0)
    query = clustered(1, 16, seed=9)
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                index = holder.get()
                assert index is not None
                _, ids = index.search(query, 5)
                assert (ids >= 1).all()
                seen.append(index.ntotal)
            except BaseException as exc:  # any failure at all is what this test is about
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        # The reader must be serving the first index before the noise below: a holder that
        # starts while the pointer names a missing file rightly has nothing to serve. (Under
        # load the thread can start late; waiting here keeps the test about the swap.)
        deadline = time.monotonic() + 10
        while not seen and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        # Noise the holder must not serve: a pointer to a missing file, a stray partial file.
        (directory / "index-partial.faiss").write_bytes(b"\0" * 100)
        (directory / CURRENT).write_text(json.dumps({"index": "index-missing.faiss"}))
        time.sleep(0.2)
        second = write_versioned(flat_index(500), directory)
        deadline = time.monotonic() + 10
        while (not seen or seen[-1] != 500) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=10)

    assert not errors, errors[:3]
    assert seen[0] == 300 and seen[-1] == 500 and set(seen) == {300, 500}
    assert seen.index(500) > seen.index(300) and 300 not in seen[seen.index(500) :]
    assert json.loads((directory / CURRENT).read_text())["index"] == second.name != first.name
    assert load_current(directory).ntotal == 500
    assert not list(directory.glob(".*.tmp"))


def test_old_versions_are_pruned_but_never_the_served_one(tmp_path: Path) -> None:
    directory = tmp_path / "index"
    paths = [write_versioned(flat_index(10 + i), directory, keep=2) for i in range(3)]
    assert sorted(directory.glob("*.faiss")) == paths[1:]
    assert len(list(directory.glob("index-*.json"))) == 2
    # Rolled back by hand to an older version: pruning keeps it while it is served.
    (directory / CURRENT).write_text(json.dumps({"index": paths[1].name}))
    _prune(directory, keep=1)
    assert sorted(directory.glob("*.faiss")) == paths[1:]
    assert load_current(directory).ntotal == 11


# --- from the database -------------------------------------------------------------------------
def _insert_embeddings(
    settings: Settings, dim: int, n: int
) -> tuple[int, int, dict[int, np.ndarray]]:
    """A product, an image, n crops and their embeddings under two model versions."""
    vectors = clustered(n, dim, seed=5)
    with session_scope(settings) as session:
        current = ModelVersion(kind="embedder", name="clip", version="v1", active=True)
        other = ModelVersion(kind="embedder", name="clip", version="v0")
        product = Product(external_id="p1", title="A dress")
        session.add_all([current, other, product])
        session.flush()
        image = Image(product_id=product.id, url="http://x/1.jpg", url_hash="h1")
        session.add(image)
        session.flush()
        crops = [
            Crop(
                image_id=image.id, crop_index=i, x0=0, y0=0, x1=1, y1=1, nx0=0, ny0=0, nx1=1, ny1=1
            )
            for i in range(n)
        ]
        session.add_all(crops)
        session.flush()
        for crop, vector in zip(crops, vectors, strict=True):
            blob = vector.astype("<f4").tobytes()
            session.add(
                Embedding(crop_id=crop.id, model_version_id=current.id, dim=dim, vector=blob)
            )
            session.add(Embedding(crop_id=crop.id, model_version_id=other.id, dim=dim, vector=blob))
        session.add(
            IndexBuild(
                model_version_id=other.id, path="old", index_type="Flat", n_vectors=n, active=True
            )
        )
        return current.id, other.id, {c.id: v for c, v in zip(crops, vectors, strict=True)}


def test_build_from_database(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    version, other, by_crop = _insert_embeddings(settings, dim=16, n=37)

    path = build_from_database(settings, version, tmp_path / "index", chunk_rows=10)

    assert json.loads((tmp_path / "index" / CURRENT).read_text())["index"] == path.name
    index = load_current(tmp_path / "index")
    assert index.ntotal == 37 and index.model_version_id == version
    crop_id, vector = next(iter(by_crop.items()))
    scores, ids = index.search(vector, 1)
    assert ids[0, 0] == crop_id and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with session_scope(settings) as session:
        builds = session.scalars(select(IndexBuild).order_by(IndexBuild.id)).all()
    assert [(b.model_version_id, b.active) for b in builds] == [(other, False), (version, True)]
    assert builds[1].path == str(path) and builds[1].n_vectors == 37
    assert builds[1].index_type == "Flat" and builds[1].status == "ready"


def test_build_from_database_fills_the_claimed_build_row(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    version, _, _ = _insert_embeddings(settings, dim=8, n=5)
    with session_scope(settings) as session:
        session.add(IndexBuild(model_version_id=version, status="building", n_vectors=0))

    build_from_database(settings, version, tmp_path / "index")

    with session_scope(settings) as session:
        mine = session.scalars(select(IndexBuild).where(IndexBuild.model_version_id == version))
        (build,) = mine.all()
    assert build.active and build.n_vectors == 5 and build.path


def test_build_from_database_refuses_a_version_without_embeddings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    with pytest.raises(ValueError, match="0 embeddings"):
        build_from_database(settings, 12345, tmp_path / "index")
