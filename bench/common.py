"""Shared bits of the benchmark scripts: the machine they ran on, scratch databases."""

from __future__ import annotations

import os
import platform
import resource
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

PG_ADMIN = os.environ.get("FLICKD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("FLICKD_BENCH_REDIS", "redis://127.0.0.1:6379/15")


def stop_children_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the context managers stop the worker processes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, GPU {gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from a parent through fork
    and exec, so a child of a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by the live process ``pid`` and all its live
    descendants (a Celery worker and its pool children), read from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # After the ")" of the command name: state, ppid, ... utime is field 14, stime 15.
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += used.get(current, 0.0)
        todo += [child for child, parent in parents.items() if parent == current]
    return total


@contextmanager
def scratch_postgres() -> Iterator[str]:
    """A fresh Postgres database migrated to head, dropped afterwards."""
    import psycopg

    from db.migrate import upgrade
    from db.session import dispose_engines
    from flickd.core.settings import Settings

    name = f"flickd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    try:
        upgrade(Settings(database_url=url))
        yield url
    finally:
        dispose_engines()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def broker_prefix() -> str:
    """A key prefix of this benchmark's own: nothing else on the Redis shares its queues."""
    return f"bench-{uuid.uuid4().hex[:8]}:"


def flush_redis(url: str = REDIS) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def truncate(database_url: str) -> None:
    from sqlalchemy import text

    from db.schema import Base
    from db.session import get_engine
    from flickd.core.settings import Settings

    tables = ", ".join(t.name for t in reversed(Base.metadata.sorted_tables))
    with get_engine(Settings(database_url=database_url)).begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
