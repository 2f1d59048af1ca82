"""Vector index benchmark: build time, peak memory, single-query latency and recall@10.

    .venv/bin/python -m bench.index                  # 1,000,000 x 512, clustered and uniform
    .venv/bin/python -m bench.index --n 100000       # quick mode

Data, per kind, generated in chunks (seed 0) into a float32 ``.npy`` in a temporary directory:

* clustered (shaped like real embeddings): 4,096 random unit centres; each vector is
  ``normalise(centre + 0.8 * noise)``, noise ~ N(0, I/dim).
* uniform: random unit vectors (the worst case; no target).

Queries are database vectors perturbed: ``normalise(vector + 0.3 * noise)``; the ground truth
is an exact, chunked inner-product scan of the file (in this process, not measured).

Build and serving run in fresh child processes, so their memory figures are their own:

* build: reads the file with plain ``read`` calls (no memory map, so the input never sits in
  the process's RSS; a DB cursor would stream the same way), builds, saves.
* serve: loads the saved index, then answers the queries one at a time.

Memory is VmHWM from /proc/self/status (peak resident set: anonymous + file-backed pages),
not ``ru_maxrss``, which Linux carries over from the parent across fork and exec. The Python
interpreter, numpy and FAISS themselves account for ~55 MiB of it.

Targets at 1M clustered: build <= 120 s, p50 <= 2 ms, recall@10 >= 0.95, peak <= 600 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

CENTRES = 4096
SPREAD = 0.8
QUERY_NOISE = 0.3
GEN_CHUNK = 50_000
READ_CHUNK = 2048  # 4 MiB of float32 per read: the input adds little to the peak
K = 10
TARGETS = {"build_s": 120.0, "p50_ms": 2.0, "recall": 0.95, "peak_mb": 600.0}


# --- the machine -------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.machine()
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM; "
        f"faiss {faiss.__version__} ({faiss.get_compile_options().strip()}), "
        f"numpy {np.__version__}, Python {platform.python_version()}"
    )


def memory() -> dict[str, float]:
    """VmHWM (peak), VmRSS, RssAnon, RssFile of this process, in MiB."""
    wanted = {"VmHWM", "VmRSS", "RssAnon", "RssFile"}
    out: dict[str, float] = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0]) / 1024
    return out


# --- data --------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(path: Path, n: int, dim: int, kind: str, seed: int = 0) -> None:
    """n unit vectors into a float32 .npy, in chunks (never all in memory)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((CENTRES, dim), dtype=np.float32))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, GEN_CHUNK):
        m = min(GEN_CHUNK, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        if kind == "clustered":
            x = centres[rng.integers(0, CENTRES, m)] + np.float32(SPREAD) * noise
        else:
            x = noise
        out[start : start + m] = _unit(x)
    out.flush()
    del out


def make_queries(data: Path, nq: int, seed: int = 1) -> np.ndarray:
    base = np.load(data, mmap_mode="r")
    dim = base.shape[1]
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(base.shape[0], nq, replace=False))
    noise = rng.standard_normal((nq, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    return _unit(base[picks] + np.float32(QUERY_NOISE) * noise).astype(np.float32)


def ground_truth(data: Path, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k positions by inner product, one chunk of the file at a time."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, chunk in read_chunks(data, 100_000):
        scores, local = faiss.knn(queries, chunk, k, faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, local + start)
    heap.finalize()
    return heap.I


def read_chunks(path: Path, rows: int = READ_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 rows) read with plain reads: pages are not mapped into this process."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(handle)
        n, dim = shape
        for start in range(0, n, rows):
            m = min(rows, n - start)
            yield start, np.fromfile(handle, dtype=np.float32, count=m * dim).reshape(m, dim)


# --- the child phases --------------------------------------------------------------------------
def phase_build(data: Path, out: Path, target: float) -> dict[str, object]:
    from models.index import VectorIndex

    n, dim = np.load(data, mmap_mode="r").shape  # the header only

    def source() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, chunk in read_chunks(data):
            yield np.arange(start, start + len(chunk), dtype=np.int64), chunk

    started = time.perf_counter()
    index = VectorIndex.build(source, dim, n_total=n, recall_target=target)
    build_s = time.perf_counter() - started
    after_build = memory()
    index.save(out)
    return {"build_s": build_s, "memory_build": after_build, "describe": index.describe()}


def phase_serve(index_path: Path, queries_path: Path, truth_path: Path, threads: int) -> dict:
    from models.index import VectorIndex

    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    index = VectorIndex.load(index_path)
    load_s = time.perf_counter() - started
    after_load = memory()
    queries = np.load(queries_path)
    truth = np.load(truth_path)
    for q in queries[:20]:  # warm caches and code paths
        index.search(q[None], K)
    times = np.empty(len(queries))
    found = np.empty((len(queries), K), np.int64)
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        _, ids = index.search(q[None], K)
        times[i] = time.perf_counter() - t0
        found[i] = ids[0]
    recall = np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth, strict=True)])
    return {
        "load_s": load_s,
        "memory_load": after_load,
        "memory_end": memory(),
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
        "recall": float(recall),
        "threads": threads,
    }


def _child(*args: str) -> dict:
    """Run a phase in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "bench.index", "--phase", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    done.check_returncode()
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report --------------------------------------------------------------------------------
def run_kind(kind: str, args: argparse.Namespace, workdir: Path) -> None:
    print(f"\n== {kind}: n={args.n:,} dim={args.dim} queries={args.queries} ==", flush=True)
    data = workdir / f"{kind}.npy"
    t0 = time.perf_counter()
    generate(data, args.n, args.dim, kind)
    queries = make_queries(data, args.queries)
    np.save(workdir / f"{kind}-queries.npy", queries)
    print(f"data: generated in {time.perf_counter() - t0:.1f} s -> {data}", flush=True)
    t0 = time.perf_counter()
    np.save(workdir / f"{kind}-truth.npy", ground_truth(data, queries))
    print(f"ground truth (exact scan): {time.perf_counter() - t0:.1f} s", flush=True)

    index_path = workdir / f"{kind}.faiss"
    built = _child("build", str(data), str(index_path), str(args.recall_target))
    served = _child(
        "serve",
        str(index_path),
        str(workdir / f"{kind}-queries.npy"),
        str(workdir / f"{kind}-truth.npy"),
        str(args.threads),
    )
    report(kind, built, served, args)


def report(kind: str, built: dict, served: dict, args: argparse.Namespace) -> None:
    desc = built["describe"]
    mb = built["memory_build"]
    ml = served["memory_load"]
    peak_mib = max(mb["VmHWM"], served["memory_end"]["VmHWM"])
    peak_mb = peak_mib * 2**20 / 1e6
    print(f"index: {desc['index_type']}  params: {json.dumps(desc['params'])}")
    print(f"index memory (codes, ids, centroids): {desc['memory_bytes'] / 2**20:.0f} MiB")
    print(
        f"build: {built['build_s']:.1f} s; build process peak RSS (VmHWM) {mb['VmHWM']:.0f} "
        f"MiB; at end RSS {mb['VmRSS']:.0f} MiB (anon {mb['RssAnon']:.0f}, "
        f"file {mb['RssFile']:.0f})"
    )
    print(
        f"serve: load {served['load_s']:.1f} s; serving process peak RSS "
        f"{served['memory_end']['VmHWM']:.0f} MiB (after load {ml['VmHWM']:.0f}; at end anon "
        f"{served['memory_end']['RssAnon']:.0f}, file {served['memory_end']['RssFile']:.0f})"
    )
    print(
        f"latency, one query at a time, faiss threads={served['threads']}: "
        f"p50 {served['p50_ms']:.3f} ms, p99 {served['p99_ms']:.3f} ms"
    )
    print(f"recall@{K} over {args.queries} queries: {served['recall']:.4f}")
    if kind == "clustered":
        checks = {
            "build_s": built["build_s"] <= TARGETS["build_s"],
            "p50_ms": served["p50_ms"] <= TARGETS["p50_ms"],
            "recall": served["recall"] >= TARGETS["recall"],
            "peak_mb": peak_mb <= TARGETS["peak_mb"],
        }
        verdict = ", ".join(f"{name} {'ok' if ok else 'MISSED'}" for name, ok in checks.items())
        print(f"targets (peak {peak_mb:.0f} MB = {peak_mib:.0f} MiB): {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kind", choices=["clustered", "uniform", "both"], default="both")
    parser.add_argument("--threads", type=int, default=1, help="faiss threads while querying")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--workdir", type=Path, help="keep the data here (default: a temp dir)")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)  # internal: child phases
    args = parser.parse_args(argv)
    if args.phase:
        name, *rest = args.phase
        if name == "build":
            result = phase_build(Path(rest[0]), Path(rest[1]), float(rest[2]))
        else:
            result = phase_serve(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]))
        print(json.dumps(result))
        return
    print(machine())
    print(f"command: python -m bench.index {' '.join(sys.argv[1:])}")
    kinds = ["clustered", "uniform"] if args.kind == "both" else [args.kind]
    with tempfile.TemporaryDirectory(prefix="flickd-bench-index-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for kind in kinds:
            run_kind(kind, args, workdir)


if __name__ == "__main__":
    main()
