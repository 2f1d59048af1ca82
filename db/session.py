"""Engines and session scopes. One engine per database URL and process.

Celery's prefork pool forks worker processes; a connection pool inherited across a fork would
share sockets between processes, so the engine is keyed by process id and built lazily.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from flickd.core.settings import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_lock = threading.Lock()
_engines: dict[tuple[str, int], Engine] = {}


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (status, --wait) run beside the writer; busy_timeout makes concurrent
    # writers wait instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    url = settings.sqlalchemy_url
    key = (url, os.getpid())
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(url)
            _engines[key] = engine
        return engine


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(bind=get_engine(settings), expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def retrying(step: Callable[[], T], attempts: int = 4, delay: float = 0.5) -> T:
    """Run an idempotent database step again when its connection broke (a restarted server, a
    terminated backend, a fail-over): the pool drops the broken connection and pre-pings the
    next, so the retry runs on a fresh one. Only for steps that are safe to repeat."""
    for attempt in range(attempts):
        try:
            return step()
        except OperationalError as error:
            if attempt == attempts - 1:
                raise
            log.warning("database step failed, retrying attempt=%d error=%s", attempt + 1, error)
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")
