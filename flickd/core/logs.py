"""Logging with key=value (or JSON) lines carrying the run, task and image ids."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_EMPTY: dict[str, Any] = {}  # never mutated: log_context sets a new dict each time
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "flickd_log", default=_EMPTY
)


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Add ``values`` to every log line emitted inside the block (thread- and task-local)."""
    token = _context.set({**_context.get(), **{k: v for k, v in values.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ctx = {**_context.get(), **getattr(record, "extra_ctx", {})}
        return True


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = getattr(record, "ctx", {})
        pairs = " ".join(f"{k}={v}" for k, v in ctx.items())
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        line = f"{line} {pairs}" if pairs else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "ctx", {}),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text", *, embedded: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_flickd", False):
            root.removeHandler(existing)
    handler._flickd = True  # type: ignore[attr-defined]  # marks flickd's own handler, replaced on the next setup
    root.addHandler(handler)
    root.setLevel(level.upper())
    debug = level.upper() == "DEBUG"
    # Library chatter (migration steps, the faiss loader's AVX2 probe, hub retries) only at DEBUG.
    noisy = ("urllib3", "PIL", "filelock", "httpx", "huggingface_hub", "alembic", "faiss")
    noisy_storage = ("botocore", "aiobotocore", "s3fs", "fsspec")  # "found credentials in …"
    for name in noisy_storage:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    for name in noisy:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    # In-process runs have no broker: kombu's "No hostname was supplied" is noise there.
    logging.getLogger("kombu").setLevel(logging.ERROR if embedded and not debug else logging.NOTSET)
