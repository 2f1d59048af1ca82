"""Chaos: an ingest of N images (about 15% of them faulty) through real download and gpu workers
and the scheduler, while a worker is SIGKILLed every few seconds and the broker, a Redis with
no persistence, is killed and restarted empty once. Nothing is repaired by hand.

    .venv/bin/python -m bench.chaos --images 5000

Prints the machine, then: images, terminal, lost, duplicated, wrong reasons; final tasks run
and indexes built; kills; and the time from the last fault to everything settled, against the
target of two leases.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from bench.common import machine, scratch_postgres, stop_children_on_sigterm
from flickd.core.settings import Settings
from synthetic.catalog import Catalog, generate_catalog
from synthetic.procs import RedisServer, catalog_server, celery_worker, spawn

# path on the catalog server -> (state, reason) it must end in
FAULTS = {
    "/fault/404": ("failed", "http_error"),
    "/fault/500": ("failed", "http_error"),
    "/fault/truncated": ("failed", "corrupt_image"),
    "/fault/html-as-jpeg": ("failed", "not_an_image"),
    "/fault/empty": ("failed", "not_an_image"),
    "/fault/slow?seconds=4": ("failed", "timeout"),
}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _feed(path: Path, base_url: str, catalog: Catalog, n: int, faulty: float, seed: int):
    """``n`` distinct URLs, ``faulty`` of them bad; returns url -> expected (state, reason)."""
    rng = random.Random(seed)
    names = [img.filename for img in catalog.images]
    refused = f"http://127.0.0.1:{_closed_port()}"
    expected: dict[str, tuple[str, str]] = {}
    lines = ["product_id,image_url"]
    for i in range(n):
        if rng.random() < faulty:
            kind = rng.choice([*FAULTS, "refused"])
            if kind == "refused":
                url, outcome = f"{refused}/x{i}.jpg", ("failed", "connection_error")
            else:
                sep = "&" if "?" in kind else "?"
                url, outcome = f"{base_url}{kind}{sep}n={i}", FAULTS[kind]
        else:
            url, outcome = f"{base_url}/images/{names[i % len(names)]}?n={i}", ("analyzed", "")
        lines.append(f"p{i},{url}")
        expected[url] = outcome
    path.write_text("\n".join(lines) + "\n")
    return expected


class Pipeline:
    def __init__(self, settings: Settings, work: Path, stack: ExitStack, downloads: int) -> None:
        self.settings, self.work, self.stack = settings, work, stack
        self.procs: dict[str, object] = {}
        self.generation = 0
        self.names = [f"download{i}" for i in range(downloads)] + ["gpu"]

    def start(self, name: str) -> None:
        self.generation += 1
        log = self.work / "logs" / f"{name}-{self.generation}.log"
        if name == "scheduler":
            cmd = [
                sys.executable,
                "-m",
                "flickd.cli",
                "scheduler",
                "-n",
                f"sched{self.generation}@%h",
            ]
            ctx = spawn(cmd, self.settings, log, ready="ready", timeout=120)
        else:
            queue = "gpu" if name == "gpu" else "download"
            ctx = celery_worker(
                self.settings, queue, concurrency=2 if queue == "download" else 1,
                name=f"{name}-{self.generation}@%h", log_path=log,
            )  # fmt: skip
        self.procs[name] = self.stack.enter_context(ctx)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        proc.wait(timeout=10)  # type: ignore[attr-defined]
        self.start(name)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.work / "logs").glob("*.log"))


def _snapshot(settings: Settings, run_id: int):
    from sqlalchemy import func, select

    from db.schema import Crop, Embedding, Image, IndexBuild, IngestRun
    from db.session import session_scope

    with session_scope(settings) as session:
        run = session.get(IngestRun, run_id)
        images = session.execute(select(Image.url, Image.state, Image.failure_reason)).all()
        crops_per_image = Counter(session.scalars(select(Crop.image_id)))
        embeddings = session.execute(select(Embedding.crop_id, Embedding.model_version_id)).all()
        builds = session.scalar(select(func.count()).select_from(IndexBuild))
        pending_builds = session.scalar(
            select(func.count())
            .select_from(IndexBuild)
            .where(IndexBuild.status.in_(["pending", "building"]))
        )
        return run, images, crops_per_image, embeddings, builds, pending_builds


def _terminal_share(settings: Settings) -> float:
    from sqlalchemy import func, select

    from db.schema import Image
    from db.session import session_scope

    with session_scope(settings) as session:
        total = session.scalar(select(func.count()).select_from(Image)) or 1
        done = session.scalar(
            select(func.count()).select_from(Image).where(Image.state.in_(["analyzed", "failed"]))
        )
    return (done or 0) / total


def _settled(settings: Settings, run_id: int) -> bool:
    run, _, _, _, _, pending_builds = _snapshot(settings, run_id)
    return (
        run.status == "done"
        and run.finalize_status not in (None, "queued", "running")
        and not pending_builds
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--faulty", type=float, default=0.15)
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument(
        "--chaos-seconds", type=float, default=900.0, help="longest time faults go on"
    )
    parser.add_argument(
        "--until",
        type=float,
        default=0.95,
        help="faults go on until this share of the images is terminal",
    )
    parser.add_argument("--lease", type=int, default=20)
    parser.add_argument(
        "--broker-restart-at", type=int, default=3, help="the fault that restarts the broker"
    )
    parser.add_argument("--download-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    stop_children_on_sigterm()
    print(machine())
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="flickd-bench-chaos-"))
    catalog = generate_catalog(work / "catalog", 60, seed=args.seed, size="small")
    from models.build import build_offline_models
    from producer.ingest import ingest

    models = build_offline_models(work / "models", "tiny", 0)
    with ExitStack() as stack, scratch_postgres() as db_url:
        broker = stack.enter_context(RedisServer(work / "redis"))
        settings = Settings(
            database_url=db_url,
            broker_url=broker.url,
            data_dir=work / "data",
            allowed_networks=["127.0.0.0/8"],
            last_stage="analyze",
            detector_model="none",
            embedding_model=str(models["clip"]),
            device="cpu",
            finalize="index",
            download_threads=16,
            download_batch_size=50,
            analyze_batch_size=16,
            connect_timeout=1.0,
            read_timeout=2.0,
            download_deadline=3.0,
            max_attempts=2,
            backoff_base=0.05,
            backoff_max=0.2,
            # The chaos settings, and a lease well below the visibility timeout.
            visibility_timeout=60,
            task_soft_time_limit=45,
            task_time_limit=50,
            lease_seconds=args.lease,
            reconcile_interval=max(1, args.lease // 5),
            redelivery_sweep_seconds=5,
            publish_retries=3,
        )
        base_url = stack.enter_context(
            catalog_server(catalog.images_dir, settings, work / "server.log")
        )
        expected = _feed(work / "feed.csv", base_url, catalog, args.images, args.faulty, args.seed)
        faulty = sum(1 for state, _ in expected.values() if state == "failed")
        print(
            f"images: {args.images} ({faulty} faulty), lease {args.lease}s, kill every "
            f"{args.kill_every:.0f}s until {args.until:.0%} of the images are terminal, the "
            f"broker restarted empty at fault {args.broker_restart_at}"
        )
        pipeline = Pipeline(settings, work, stack, args.download_workers)
        for name in ["scheduler", *pipeline.names]:
            pipeline.start(name)
        started = time.monotonic()
        run_id = ingest(work / "feed.csv", settings).run_id
        kills: Counter[str] = Counter()
        broker_restarted = False
        last_fault = time.monotonic()
        while time.monotonic() - started < args.chaos_seconds:
            time.sleep(args.kill_every)
            if _terminal_share(settings) >= args.until:
                break
            if not broker_restarted and sum(kills.values()) == args.broker_restart_at - 1:
                broker.kill()
                time.sleep(1.0)
                broker.start()
                broker_restarted = True
                kills["redis"] += 1
            else:
                victim = rng.choice(pipeline.names)
                pipeline.kill(victim)
                kills[victim.rstrip("0123456789")] += 1
            last_fault = time.monotonic()
        deadline = time.monotonic() + args.timeout
        while not _settled(settings, run_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        settled_after = time.monotonic() - last_fault
        run, images, crops_per_image, embeddings, builds, _ = _snapshot(settings, run_id)
        logs = pipeline.logs()

    terminal = sum(1 for _, state, _ in images if state in ("analyzed", "failed"))
    wrong = sum(
        1
        for url, state, reason in images
        if expected.get(url) != (state, reason or "") and state in ("analyzed", "failed")
    )
    duplicated = sum(1 for n in crops_per_image.values() if n != 1) + (
        len(embeddings) - len(set(embeddings))
    )
    finals = logs.count(f"finalize run_id={run_id} action=")
    print(f"images {len(images)}, terminal {terminal}, lost {len(images) - terminal}, "
          f"duplicated {duplicated}, wrong reasons {wrong}")  # fmt: skip
    print(f"run {run.status}, final task {run.finalize_status}: final tasks run {finals}, "
          f"indexes built {builds}")  # fmt: skip
    print("kills: " + ", ".join(f"{k} {v}" for k, v in sorted(kills.items())))
    print(
        f"settled {settled_after:.1f}s after the last fault "
        f"({settled_after / args.lease:.2f} leases; target <= 2 leases)"
    )
    print(f"total {time.monotonic() - started:.0f}s; work dir {work}")


if __name__ == "__main__":
    main()
