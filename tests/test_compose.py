"""docker-compose.yml: its structure (commands, health checks, start order, scaling, GPU, secrets),
and a smoke test that runs its services' commands as local processes against the local Postgres
and Redis (there is no Docker engine here): migrate, two download workers, a GPU worker with the
tiny offline models, Flower, the metrics exporter and the API; a feed goes through them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from flickd.cli import main
from flickd.core.settings import Settings
from synthetic.catalog import write_feed
from synthetic.procs import ROOT, launch, settings_env, stop_together, wait_for_log
from synthetic.server import CatalogServer
from tests.conftest import catalog_fixture
from tests.models_fixtures import tiny_models
from tests.test_flower import flower_get
from tests.test_metrics import by_label, free_port, scrape

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# Services run from the flickd image (ENTRYPOINT flickd): their command is a flickd subcommand.
FLICKD = {name: s for name, s in SERVICES.items() if "build" in s}
REQUIRED_VAR = re.compile(r"^\$\{(\w+):\?[^}]*\}$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH", re.I)


def _subcommand(args: Sequence[str]) -> tuple[click.Command, list[str], list[str]]:
    """The click command that ``flickd ARGS`` runs, its name path, and the remaining args."""
    command: click.Command = main
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    return command, path, rest


# --- structure ---------------------------------------------------------------------------------
def test_compose_defines_the_whole_system():
    assert set(FLICKD) >= {
        "migrate",
        "download-worker",
        "gpu-worker",
        "scheduler",
        "api",
        "flower",
        "metrics",
    }
    assert {"redis", "postgres"} <= set(SERVICES) - set(FLICKD)


@pytest.mark.parametrize("service", sorted(FLICKD))
def test_service_command_is_a_flickd_subcommand(service):
    args = FLICKD[service]["command"]
    command, path, rest = _subcommand(args)
    assert path and not isinstance(command, click.Group), f"{service}: {args} names no command"
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    command.make_context(path[-1], list(rest))  # raises on an unknown option or bad value


def test_subcommands_run_through_the_console_script():
    """The image's ENTRYPOINT is the `flickd` console script: `flickd <sub> --help` for each."""
    script = Path(sys.executable).with_name("flickd")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "flickd.cli"]
    paths = {tuple(_subcommand(s["command"])[1]) for s in FLICKD.values()}
    procs = {
        path: subprocess.Popen([*base, *path, "--help"], stdout=subprocess.PIPE, cwd=ROOT)
        for path in paths
    }
    for path, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and b"Usage:" in out, path


def test_infrastructure_services_are_durable_and_health_checked():
    redis_cmd = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert "redis-cli ping" in " ".join(SERVICES["redis"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    named = set(COMPOSE["volumes"])
    for name, target in (("redis", "/data"), ("postgres", "/var/lib/postgresql/data")):
        mounts = dict(v.split(":")[::-1][:2] for v in SERVICES[name]["volumes"])
        assert mounts.get(target) in named, name


def test_start_order_waits_for_health_and_migration():
    migrate = FLICKD["migrate"]
    assert migrate["command"] == ["db", "upgrade"] and migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    one_shot = {"migrate", "object-store-bucket"}
    for name, service in SERVICES.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            expected = (
                "service_completed_successfully" if dependency in one_shot else "service_healthy"
            )
            # A dependency in a profile the service is not in is optional: it may not be there.
            theirs = set(SERVICES[dependency].get("profiles") or [])
            optional = bool(theirs - set(service.get("profiles") or []))
            want = {"condition": expected, **({"required": False} if optional else {})}
            assert rule == want, (name, dependency)
            if expected == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], dependency
    for name in ("download-worker", "gpu-worker", "api", "metrics"):
        assert set(FLICKD[name]["depends_on"]) == {
            "redis",
            "postgres",
            "migrate",
            "object-store-bucket",
        }, name
    assert set(FLICKD["flower"]["depends_on"]) == {"redis"}


def test_object_store_profile_is_optional_and_wired_to_every_service():
    store, bucket = SERVICES["object-store"], SERVICES["object-store-bucket"]
    assert store["profiles"] == bucket["profiles"] == ["object-store"]
    assert "object-data" in COMPOSE["volumes"] and "healthcheck" in store
    assert "minio server /data" in " ".join(store["command"])
    assert "mc mb --ignore-existing" in " ".join(bucket["entrypoint"])
    # Nothing else is in a profile but the operator's cli: `docker compose up` needs no store.
    assert {n for n, s in SERVICES.items() if s.get("profiles")} == {
        "object-store",
        "object-store-bucket",
        "cli",
    }
    for name, service in FLICKD.items():
        env = service["environment"]
        for key in ("FLICKD_STORAGE_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
            assert key in env and env[key] is None, (name, key)  # passed through, never set here
    example = (ROOT / ".env.example").read_text()
    assert "# FLICKD_STORAGE_URL=s3://" in example and "# AWS_ENDPOINT_URL=" in example


def test_workers_scale_and_the_gpu_worker_reserves_a_gpu():
    assert not [n for n, s in SERVICES.items() if "container_name" in s]
    for name in ("download-worker", "gpu-worker"):
        assert "ports" not in FLICKD[name], name  # replicas would fight over a host port
    assert FLICKD["download-worker"]["command"][:3] == ["worker", "-Q", "download"]
    gpu = FLICKD["gpu-worker"]
    assert gpu["command"] == ["worker", "-Q", "gpu"]  # solo pool, one process: see smoke test
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"]  # the CUDA build of torch


def test_every_flickd_service_shares_the_data_volume():
    for name, service in FLICKD.items():
        data_dir = service["environment"]["FLICKD_DATA_DIR"]
        assert f"flickd-data:{data_dir}" in service["volumes"], name
    assert "flickd-data" in COMPOSE["volumes"]


def _secret_values() -> list[tuple[str, str, str]]:
    found = []
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                found.append((name, key, str(value)))
    return found


def test_secrets_come_only_from_the_environment():
    secrets = _secret_values()
    assert {key for _, key, _ in secrets} >= {
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "FLICKD_FLOWER_BASIC_AUTH",
    }
    for name, key, value in secrets:
        # Required from the environment, or passed through from it (no value: set in the
        # container only when the operator's environment has it); never a value in the file.
        assert REQUIRED_VAR.match(value) or value == "None", (
            f"{name}.{key} must be ${{VAR:?…}} or passed through, got {value!r}"
        )
    for name, service in FLICKD.items():
        for key in ("FLICKD_DATABASE_URL", "FLICKD_BROKER_URL"):
            credentials = service["environment"][key].split("://", 1)[1].split("@", 1)[0]
            password = credentials.split(":", 1)[1]
            assert REQUIRED_VAR.match(password), (name, key)

    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(example) == required  # each required secret is asked for …
    assert all(value == "" for value in example.values())  # … and none is shipped

    for instruction in _dockerfile_instructions():
        if instruction.split(" ", 1)[0] in ("ENV", "ARG"):
            assert not SECRET_NAME.search(instruction), instruction
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*" and not [x for x in ignore if x.startswith("!.env")]  # allow-list


def _dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [line.strip() for line in joined.splitlines() if line.strip()]


def test_dockerfile_is_multi_stage_non_root_with_flickd_entrypoint():
    lines = _dockerfile_instructions()
    assert len([line for line in lines if line.startswith("FROM ")]) >= 2
    torch = next(i for i, x in enumerate(lines) if "torch==" in x)
    flickd = next(i for i, x in enumerate(lines) if x.startswith("RUN pip install ."))
    assert torch < flickd  # so `pip install .` finds torch satisfied and keeps that build
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
    assert 'ENTRYPOINT ["flickd"]' in lines


# --- smoke test: the compose commands as local processes ------------------------------------------
catalog = catalog_fixture(6, seed=21)


def _local(service: str, port: int | None = None, name: str | None = None) -> list[str]:
    """The service's compose command for a local process: ports are per container in compose,
    so locally each server gets a free one, and each worker a node name of its own."""
    args = list(FLICKD[service]["command"])
    if port is not None:
        args[args.index("--port") + 1] = str(port)
    if "--address" in args:
        args[args.index("--address") + 1] = "127.0.0.1"
    if "--host" in args:
        args[args.index("--host") + 1] = "127.0.0.1"
    if name:
        args += ["-n", f"{name}@%h"]
    return [sys.executable, "-m", "flickd.cli", *args]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} not answering:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)


def _api_import_error() -> str | None:
    """Why the API cannot start yet (it is being written beside this), or None."""
    try:
        import flickd.services.api
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def _smoke_settings(pg_settings: Settings, tiny_models: dict[str, Path]) -> Settings:
    return pg_settings.model_copy(
        update={
            "last_stage": "analyze",
            "detector_model": str(tiny_models["detector"]),
            "embedding_model": str(tiny_models["clip"]),
            "device": "cpu",
            "analyze_batch_size": 4,
            "flower_basic_auth": "ops:smoke",
        }
    )


def test_compose_smoke(pg_settings, tiny_models, catalog, tmp_path):
    settings = _smoke_settings(pg_settings, tiny_models)
    logs = tmp_path / "logs"
    logs.mkdir()
    migrate = subprocess.run(
        _local("migrate"), env=settings_env(settings), cwd=ROOT, capture_output=True, timeout=120
    )
    assert migrate.returncode == 0, migrate.stderr
    assert b"database at revision" in migrate.stdout

    flower_port, metrics_port, api_port = free_port(), free_port(), free_port()
    servers = [
        ("flower", flower_port, "/healthcheck"),
        ("metrics", metrics_port, "/metrics"),
        ("api", api_port, "/openapi.json"),
    ]
    api_error = _api_import_error()
    if api_error:
        warnings.warn(f"API service not exercised: {api_error}", stacklevel=1)
        servers.pop()
    ready: list[Callable[[], None]] = []
    with ExitStack() as stack, CatalogServer(catalog.root / "images") as server:
        # Start everything first and only then wait: the processes boot in parallel (and at
        # the end they are stopped together, each as stop_process_group stops it).
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_together, procs)
        for name, cmd in {
            # One download worker and the gpu worker keep their default node names
            # (download@%h, gpu@%h): on one host they must still be two nodes.
            "download-1": _local("download-worker"),
            "download-2": _local("download-worker", name="download-2"),
            "gpu": _local("gpu-worker"),
            "scheduler": _local("scheduler"),
        }.items():
            log = logs / f"{name}.log"
            proc = launch(cmd, settings, log)
            procs.append(proc)
            ready.append(lambda log=log, proc=proc: wait_for_log(log, " ready.", proc, 90))
        for service, port, path in servers:
            log = logs / f"{service}.log"
            proc = launch(_local(service, port), settings, log)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}{path}"
            ready.append(lambda url=url, proc=proc, log=log: _wait_http(url, proc, log))
        for wait in ready:
            wait()

        feed = tmp_path / "feed.csv"
        write_feed(catalog, feed, server.base_url)
        ingest = subprocess.run(
            [sys.executable, "-m", "flickd.cli", "ingest", str(feed), "--wait", "--json"],
            env=settings_env(settings),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert ingest.returncode == 0, ingest.stderr[-3000:]
        result = json.loads(ingest.stdout)
        assert result["status"] == "done"
        assert result["images_by_state"] == {"analyzed": len(catalog.images)}

        status, workers = flower_get(flower_port, "/api/workers?refresh=1", auth="ops:smoke")
        assert status == 200
        assert {w.split("@")[0] for w in workers} == {
            "download",
            "download-2",
            "gpu",
            "scheduler",
        }
        gpu_pool = next(w for n, w in workers.items() if n.startswith("gpu@"))["stats"]["pool"]
        assert gpu_pool["max-concurrency"] == 1 and "solo" in gpu_pool["implementation"]

        samples = scrape(metrics_port)
        assert by_label(samples, "flickd_images", "state")["analyzed"] == len(catalog.images)
        assert samples["flickd_model_info"]  # the embedder the GPU worker used

        if not api_error:
            # 503 until the final task has built an index; the database must answer either way.
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health").read()
            except urllib.error.HTTPError as error:
                health = error.read()
            assert json.loads(health)["database"]["ok"] is True
