"""The Alembic migrations build exactly the schema the ORM declares, on Postgres and SQLite:
a column or index added to ``db/schema.py`` without its migration (or the other way round)
fails here, not on a user's `flickd db upgrade`."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from db.migrate import upgrade
from db.schema import Base
from db.session import get_engine
from flickd.core.settings import Settings


def _differences(settings: Settings) -> list[object]:
    with get_engine(settings).connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def test_postgres_migrations_match_the_schema(pg_url: str) -> None:
    assert _differences(Settings(database_url=pg_url)) == []


def test_sqlite_migrations_match_the_schema(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings)
    assert _differences(settings) == []


def test_a_column_missing_from_the_migrations_is_found(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings, "0005")  # before the catalog-sync columns
    found = _differences(settings)
    assert any("listed" in repr(diff) for diff in found), found
