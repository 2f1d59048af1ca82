"""XLSX reader: the active sheet of a workbook, streamed by openpyxl in read-only mode."""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final
from xml.etree.ElementTree import ParseError

import numpy as np
import openpyxl
import pyarrow as pa
from openpyxl.utils.exceptions import InvalidFileException

from producer.feeds.encoding import python_text
from producer.feeds.errors import FeedError
from producer.feeds.raw import RawChunk, Source, unique_names

# What a damaged workbook raises from openpyxl, zipfile and the XML parser.
_XLSX_ERRORS: Final = (
    zipfile.BadZipFile,
    zlib.error,
    InvalidFileException,
    ParseError,
    KeyError,
    EOFError,
    OSError,
    ValueError,
)


def open_xlsx(path: Path, compression: str | None, chunk_rows: int) -> Source:
    handle = path.open("rb")  # a file object: openpyxl rejects paths with other suffixes
    try:
        book = openpyxl.load_workbook(handle, read_only=True, data_only=True)
        sheet = book.active or book.worksheets[0]
        # The stored dimension can be wrong (some writers never update it) and read-only
        # mode would stop at it; forget it and read every row there is.
        sheet.reset_dimensions()
        rows = enumerate(sheet.iter_rows(values_only=True), start=1)
        header_row, header = _xlsx_header(rows)
    except _XLSX_ERRORS as exc:
        handle.close()
        raise FeedError(f"unreadable or truncated XLSX file {path.name}: {exc}") from exc
    if header is None:
        handle.close()
        raise FeedError(f"feed has no header row: {path}")

    def close() -> None:
        book.close()
        handle.close()

    names = unique_names(header)
    chunks = _xlsx_chunks(rows, header_row, names, chunk_rows, path, close)
    return Source(names, chunks, close)


def _xlsx_header(rows: Iterator[tuple[int, tuple[Any, ...]]]) -> tuple[int, list[Any] | None]:
    for number, values in rows:
        cells = list(values)
        while cells and _cell_text(cells[-1]) is None:
            cells.pop()  # formatted but empty cells at the right edge
        if cells:
            return number, cells
    return 0, None


def _xlsx_chunks(
    rows: Iterator[tuple[int, tuple[Any, ...]]],
    header_row: int,
    names: list[str],
    chunk_rows: int,
    path: Path,
    close: Callable[[], None],
) -> Iterator[RawChunk]:
    width = len(names)
    values: list[tuple[Any, ...]] = []
    numbers: list[int] = []
    try:
        for sheet_row, cells in rows:
            values.append(cells)
            numbers.append(sheet_row - header_row)
            if len(values) >= chunk_rows:
                yield _xlsx_chunk(values, numbers, names, width)
                values, numbers = [], []
        if values:
            yield _xlsx_chunk(values, numbers, names, width)
    except _XLSX_ERRORS as exc:
        raise FeedError(f"unreadable or truncated XLSX file {path.name}: {exc}") from exc
    finally:
        close()


def _xlsx_chunk(
    rows: list[tuple[Any, ...]], numbers: list[int], names: list[str], width: int
) -> RawChunk:
    # Cells right of the header have no column name; they are ignored.
    columns = [
        pa.array([_cell_text(r[j]) if j < len(r) else None for r in rows], pa.string())
        for j in range(width)
    ]
    return RawChunk(list(names), columns, np.array(numbers, np.int64))


def _cell_text(value: Any) -> str | None:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # 12345.0 from a numeric id cell reads back as "12345"
    return python_text(value)


def estimate_xlsx_rows(path: Path) -> int | None:
    with path.open("rb") as handle:
        book = openpyxl.load_workbook(handle, read_only=True, data_only=True)
        try:
            sheet = book.active or book.worksheets[0]
            return None if sheet.max_row is None else max(sheet.max_row - 1, 0)
        finally:
            book.close()
