"""Start and stop flickd processes (workers, servers) as local child processes.

Tests, benchmarks and the compose smoke test run the same commands a deployment runs, with the
settings handed over as ``FLICKD_*`` environment variables.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from flickd.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a child process read exactly these settings."""
    env = {k: v for k, v in (base or os.environ).items() if not k.startswith("FLICKD_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        key = f"FLICKD_{name.upper()}"
        env[key] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process_group(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20
) -> None:
    """Stop a process the way an orchestrator does: ``sig`` to the process itself (a Celery
    worker then shuts down warm, letting its pool finish the tasks in hand), SIGKILL to the
    whole group if it has not exited in ``timeout`` seconds, and to whatever it left behind.

    Not ``sig`` to the whole group: a prefork worker's pool processes reset SIGTERM to its
    default, so they would die mid-task, between a batch's commit and its hand-off."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


def wait_for_log(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early ({proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no {needle!r} after {timeout}s:\n{path.read_text()[-3000:]}")


def launch(
    cmd: Sequence[str],
    settings: Settings,
    log_path: Path,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group with ``settings``, its output in ``log_path``;
    the caller waits for it to be ready and stops it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = settings_env(settings)
    env.update(extra_env or {})
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            list(cmd),
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def spawn(
    cmd: Sequence[str],
    settings: Settings,
    log_path: Path,
    ready: str | None,
    timeout: float = 60,
    extra_env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group with ``settings``; stop it at the end."""
    proc = launch(cmd, settings, log_path, extra_env)
    try:
        if ready:
            wait_for_log(log_path, ready, proc, timeout)
        yield proc
    finally:
        stop_process_group(proc)


def stop_together(
    procs: Sequence[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, timeout: float = 20
) -> None:
    """:func:`stop_process_group` for several processes at once: ``sig`` to each, then the
    waits, so that their shutdowns overlap instead of adding up."""
    for proc in procs:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        stop_process_group(proc, sig, timeout=0)


@contextmanager
def started_together(
    commands: Sequence[tuple[Sequence[str], Settings, Path, str]], timeout: float = 60
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start every ``(cmd, settings, log_path, ready)`` at once, wait until each has logged its
    ``ready``, and stop them together at the end: the same processes as one :func:`spawn` each,
    with their start-ups and shutdowns overlapping instead of adding up."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd, settings, log_path, _ in commands:
            procs.append(launch(cmd, settings, log_path))
        for proc, (_, _, log_path, ready) in zip(procs, commands, strict=True):
            wait_for_log(log_path, ready, proc, timeout)
        yield procs
    finally:
        stop_together(procs)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def catalog_server(
    images_dir: Path, settings: Settings, log_path: Path, latency: float = 0.0
) -> Iterator[str]:
    """The synthetic catalog's HTTP server as a process of its own; yields its base URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "synthetic.server",
        str(images_dir),
        "--port",
        str(port),
        "--latency",
        str(latency),
    ]
    with spawn(cmd, settings, log_path, ready="serving"):
        yield f"http://127.0.0.1:{port}"


def worker_command(
    queues: str = "download",
    concurrency: int = 2,
    name: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``flickd worker`` command line for these queues."""
    hostname = name or f"w-{uuid.uuid4().hex[:6]}@%h"
    return [
        sys.executable,
        "-m",
        "flickd.cli",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "-n",
        hostname,
        *extra_args,
    ]


def _worker_log(settings: Settings) -> Path:
    return Path(settings.data_dir) / "logs" / f"worker-{uuid.uuid4().hex[:6]}.log"


@contextmanager
def celery_worker(
    settings: Settings,
    queues: str = "download",
    concurrency: int = 2,
    name: str | None = None,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``flickd worker`` process, ready to consume when the block starts."""
    cmd = worker_command(queues, concurrency, name, extra_args)
    with spawn(cmd, settings, log_path or _worker_log(settings), ready="ready") as proc:
        yield proc


@contextmanager
def celery_workers(
    settings: Settings, *workers: dict[str, Any]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Several real ``flickd worker`` processes, each as :func:`celery_worker` with these
    keyword arguments, started at once and all ready when the block starts."""
    commands = []
    for worker in workers:
        args = dict(worker)
        log_path = args.pop("log_path", None) or _worker_log(settings)
        commands.append((worker_command(**args), settings, log_path, "ready"))
    with started_together(commands) as procs:
        yield procs


class RedisServer:
    """A ``redis-server`` of its own on a free port, for tests that kill and restart the broker.
    Nothing on disk (no RDB, no AOF): a restart comes back empty, as a cache-only Redis or one
    that lost its disk would."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 (child's stdout)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: everything it held (queues, unacknowledged messages) is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class S3Server:
    """An S3-compatible server process of its own (moto's server mode, as s3fs tests itself)
    on a free port. ``env`` is what a client process needs to use it: credentials and the
    endpoint through botocore's own variables, never flickd settings."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "flickd-test",
            "AWS_SECRET_ACCESS_KEY": "flickd-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        log = open(self.workdir / f"s3-{self.port}.log", "ab")  # noqa: SIM115 (child's stdout)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.1)
        raise RuntimeError(f"moto server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
