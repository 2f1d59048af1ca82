"""Fixtures for the storage tests: an S3-compatible server process (moto) for the session, and
a fresh storage URL per test on it or on a local directory.

Import the fixtures you use into a test module (``from tests.storage_fixtures import s3``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flickd.core.storage import Storage, forget_storages
from synthetic.procs import S3Server

_servers: list[S3Server] = []


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's moto server; its credentials and endpoint are in this process's
    environment (and so in every child's), the way a deployment configures botocore."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        forget_storages()


def new_bucket(server: S3Server) -> str:
    """A fresh bucket on the server; returns its name."""
    name = f"flickd-{uuid.uuid4().hex[:10]}"
    Storage(f"s3://{name}").fs.mkdir(name)
    return name


def storage_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, empty storage root of ``kind`` ("s3" or "file")."""
    forget_storages()
    if kind == "file":
        return f"file://{tmp_path / 'shared-storage'}"
    server = request.getfixturevalue("s3")
    return f"s3://{new_bucket(server)}/flickd"
