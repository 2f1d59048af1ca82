"""Helpers shared by the download tests (netguard, fetch, imaging). Plain functions, no fixtures:
tests/conftest.py belongs to the whole suite."""

from __future__ import annotations

from typing import Any

from flickd.core.settings import Settings

# Short limits so every failure path finishes in well under a second or two.
FAST: dict[str, Any] = {
    "allowed_networks": ["127.0.0.0/8"],  # the test server lives on loopback
    "connect_timeout": 0.5,
    "read_timeout": 0.5,
    "download_deadline": 1.5,
    "max_attempts": 3,
    "backoff_base": 0.01,
    "backoff_max": 0.05,
    "max_retry_after": 2.0,
    "max_redirects": 3,
    "max_download_bytes": 256 * 1024,
    "download_threads": 4,
}


def make_settings(**overrides: Any) -> Settings:
    return Settings(**{**FAST, **overrides})


class SleepRecorder:
    """Stands in for time.sleep: records the delays and does not wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
