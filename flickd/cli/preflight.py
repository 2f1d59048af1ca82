"""Checks before work starts: the database (reachable, schema at head), the broker, storage,
the models, free disk. ``flickd doctor`` prints them all; ``ingest`` and ``worker`` run the
ones they depend on first, so a broken model path fails before any download and a worker that
could not work refuses to start.

Each check returns a :class:`Check`; a failed one carries the one-line :class:`Problem` (with
its exit code) that says what to fix.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flickd.cli.errors import Failure, Problem, config_error, explain, redact, unreachable
from flickd.core.settings import Settings

MIN_FREE_BYTES = 1 << 30  # below 1 GiB free under the data dir, doctor warns


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    problem: Problem | None = None
    warning: bool = False  # not fatal: said, but no failure

    def line(self) -> str:
        mark = "ok  " if self.ok else ("warn" if self.warning else "FAIL")
        return f"{mark}  {self.name:<9} {self.detail}"


def _run(name: str, check: Callable[[], str]) -> Check:
    try:
        return Check(name, True, check())
    except Exception as error:
        problem = explain(error)
        if problem is None:
            problem = Failure(f"{type(error).__name__}: {error}")
        return Check(name, False, problem.format_message(), problem)


def check_database(settings: Settings) -> Check:
    def probe() -> str:
        from sqlalchemy import text

        from db.migrate import ensure_schema, head_revision
        from db.session import get_engine
        from flickd.cli.context import require_schema_at_head

        ensure_schema(settings)  # the embedded SQLite database creates or upgrades itself
        with get_engine(settings).connect() as conn:
            conn.execute(text("SELECT 1"))
        require_schema_at_head(settings)
        return f"{redact(settings.sqlalchemy_url)} (schema at {head_revision()})"

    return _run("database", probe)


def check_broker(settings: Settings) -> Check:
    if settings.embedded:
        return Check("broker", True, "none: embedded mode, tasks run in-process")

    def probe() -> str:
        import redis

        client = redis.Redis.from_url(
            settings.broker_url or "", socket_connect_timeout=3, socket_timeout=3
        )
        try:
            client.ping()
        finally:
            client.close()
        return redact(settings.broker_url)

    return _run("broker", probe)


def check_storage(settings: Settings, timeout: float = 20.0) -> Check:
    """The local directory is writable, and so is the storage (``FLICKD_STORAGE_URL``): one
    small object written, read back and deleted, within ``timeout`` seconds."""

    def probe() -> str:
        directory = Path(settings.data_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".flickd-check-"):
                pass
        except OSError as error:
            raise config_error(
                f"FLICKD_DATA_DIR={directory} is not writable ({error.strerror}): "
                "point it at a directory this user may write"
            ) from None
        if not settings.storage_url:
            return f"{directory.resolve()} writable"
        return f"{_probe_storage(settings, timeout)} writable; cache {directory.resolve()}"

    return _run("storage", probe)


def _probe_storage(settings: Settings, timeout: float) -> str:
    import threading
    import uuid

    from flickd.core.storage import Storage

    url = settings.storage_root
    outcome: list[BaseException | str] = []

    def attempt() -> None:
        try:
            storage = Storage(url)
            key = f".flickd-check/{uuid.uuid4().hex}"
            storage.put_bytes(key, b"ok")
            if storage.get_bytes(key) != b"ok":
                raise OSError("an object written could not be read back the same")
            storage.delete(key)
            outcome.append(url)
        except BaseException as error:  # reported below, in one line
            outcome.append(error)

    thread = threading.Thread(target=attempt, name="storage-check", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise unreachable(
            f"FLICKD_STORAGE_URL={url}: no answer from the storage in {timeout:.0f} s"
        )
    result = outcome[0]
    if isinstance(result, str):
        return result
    text = f"{result}".split(": cannot ", 1)[-1][:300]
    if "bucket" in text.lower() and ("not exist" in text.lower() or "NoSuchBucket" in text):
        raise config_error(f"FLICKD_STORAGE_URL={url}: the bucket does not exist: create it")
    local = url.startswith("file://") and isinstance(result, OSError)
    if local or isinstance(result.__cause__ or result, PermissionError) or "denied" in text.lower():
        raise config_error(f"FLICKD_STORAGE_URL={url}: not writable by these credentials: {text}")
    raise unreachable(f"FLICKD_STORAGE_URL={url}: cannot reach the storage: {text}")


def check_disk(settings: Settings) -> Check:
    directory = Path(settings.data_dir)
    probe = directory if directory.exists() else directory.resolve().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    detail = f"{free / 2**30:.1f} GiB free under {probe}"
    if free < MIN_FREE_BYTES:
        return Check("disk", False, detail + ": free some space", warning=True)
    return Check("disk", True, detail)


def _models(settings: Settings) -> list[tuple[str, str, str]]:
    """(check name, setting name, value) of each model the pipeline would load."""
    wanted = [("embedder", "FLICKD_EMBEDDING_MODEL", settings.embedding_model)]
    if settings.detector_model.lower() != "none":
        wanted.insert(0, ("detector", "FLICKD_DETECTOR_MODEL", settings.detector_model))
    return wanted


def check_models(settings: Settings, *, load: bool = False) -> list[Check]:
    """Each configured model resolves to something loadable: a model directory, or a hub id
    that can be fetched or is cached. With ``load``, the model is loaded and runs one tiny
    forward pass (``flickd doctor``)."""
    checks = []
    for name, setting, value in _models(settings):

        def probe(name: str = name, setting: str = setting, value: str = value) -> str:
            where = _resolve_model(setting, value)
            if load:
                _forward_pass(name, settings)
                return f"{where}: loads and runs"
            return where

        checks.append(_run(name, probe))
    return checks


def _resolve_model(setting: str, value: str) -> str:
    from models.loading import ModelLoadError, looks_like_path, pretrained_kwargs

    build_hint = (
        "build offline stand-ins with `flickd models build DIR` and set "
        f"{setting}=DIR/{'clip' if 'EMBEDDING' in setting else 'detector'}"
    )
    try:
        source, _ = pretrained_kwargs(value)
    except ModelLoadError as error:
        raise config_error(f"{setting}={value}: {error}; {build_hint}") from None
    if looks_like_path(value):
        if not any((Path(source) / f).is_file() for f in _PROCESSOR_FILES):
            raise config_error(
                f"{setting}={value}: the directory has no preprocessor config; {build_hint}"
            )
        return source
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(value, "config.json")
    if isinstance(cached, str):
        return f"{value} (cached)"
    if constants.HF_HUB_OFFLINE:
        raise config_error(
            f"{setting}={value} is a Hugging Face hub id, not in the local cache, and the hub is "
            f"offline (HF_HUB_OFFLINE): {build_hint}"
        )
    if not _reachable(constants.ENDPOINT):
        raise config_error(
            f"{setting}={value} is a Hugging Face hub id, not in the local cache, and "
            f"{constants.ENDPOINT} cannot be reached from here: {build_hint}"
        )
    return f"{value} (downloaded from the hub on first use)"


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` (no request, no
    retries: the hub client's own retries take half a minute to give up)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _forward_pass(name: str, settings: Settings) -> None:
    from PIL import Image

    from models import registry

    image = Image.new("RGB", (64, 64), (200, 40, 40))
    if name == "detector":
        detector = registry.get_detector(settings)
        if detector is not None:
            detector.detect([image])
        return
    embedder = registry.get_embedder_by_name(settings.embedding_model, settings)
    embedder.embed_images([image])
    embedder.embed_texts(["a red dress"])


def check_chromium() -> Check:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return Check("chromium", True, f"{path} (for the web-page tests)")
    return Check(
        "chromium",
        False,
        "not installed: only the web-page tests need it (apt-get install chromium)",
        warning=True,
    )


def require(checks: Iterable[Check]) -> None:
    """Raise the first failed check's problem (a warning is not a failure)."""
    for check in checks:
        if not check.ok and not check.warning and check.problem is not None:
            raise check.problem


def for_ingest(settings: Settings) -> list[Check]:
    """What ``ingest`` needs before it reads a row: the database, the broker, and (when it runs
    the analysis itself, in the embedded mode) the models. In distributed mode the gpu workers
    check their own models when they start."""
    checks = [check_database(settings), check_broker(settings)]
    if settings.embedded and settings.last_stage == "analyze":
        checks += check_models(settings)
    return checks


def for_worker(settings: Settings, queues: str) -> list[Check]:
    checks = [check_database(settings), check_broker(settings), check_storage(settings)]
    if "gpu" in queues.split(","):
        checks += check_models(settings)
    return checks


def for_api(settings: Settings) -> list[Check]:
    """What ``flickd api`` needs before it serves: the database and the storage."""
    return [check_database(settings), check_storage(settings)]


def everything(settings: Settings) -> list[Check]:
    """``flickd doctor``: every check, models loaded and run."""
    checks = [check_database(settings), check_broker(settings), check_storage(settings)]
    if settings.last_stage == "analyze":
        checks += check_models(settings, load=True)
    return [*checks, check_disk(settings), check_chromium()]
