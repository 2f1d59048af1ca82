"""SQL building blocks shared by the queries of several stages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger, Connection, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement


def id_in(conn: Connection, column: Any, ids: Iterable[int]) -> ColumnElement[bool]:
    """``column IN ids``. On Postgres one array parameter (``column = ANY(:ids)``): a batch's
    ``IN`` list of hundreds of placeholders gives every batch size its own statement text,
    which SQLAlchemy and psycopg compile and parse afresh each time (a fifth of a download
    worker's CPU went there); the array form is one cached statement whatever the size."""
    values = list(ids)
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=ARRAY(BigInteger)))
    return column.in_(values)
