"""Schema migrations (Alembic), run the same way on Postgres and SQLite."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from db.session import get_engine
from flickd.core.settings import Settings, get_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    """Bring the database to ``revision``. Safe to run concurrently with itself on Postgres:
    an advisory lock makes a second runner wait and then find nothing to do."""
    engine = get_engine(settings or get_settings())
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7734201)")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(settings: Settings | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(settings or get_settings()).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision this flickd's migrations know."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def ensure_schema(settings: Settings) -> None:
    """The embedded default needs no set-up: its SQLite file is created or upgraded on first
    use. (A shared Postgres is migrated explicitly, by `flickd db upgrade`.)"""
    if settings.sqlalchemy_url.startswith("sqlite"):
        upgrade(settings)
