"""The feed reader: picks the format reader for a path, then validates what it yields.

This is the top of the package; it alone knows every format reader and the validator.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pyarrow as pa

from producer.feeds.columns import FeedColumns, resolve_roles
from producer.feeds.delimited import open_delimited
from producer.feeds.encoding import PREFIX_BYTES
from producer.feeds.errors import FeedError
from producer.feeds.formats import check_file, format_and_compression
from producer.feeds.jsonl import open_jsonl
from producer.feeds.parquet import open_parquet, parquet_rows
from producer.feeds.raw import Source
from producer.feeds.validate import ChunkProcessor, FeedChunk
from producer.feeds.xlsx import estimate_xlsx_rows, open_xlsx

_OPENERS: Final[dict[str, Callable[[Path, str | None, int], Source]]] = {
    "csv": lambda path, compression, rows: open_delimited(path, compression, rows, ","),
    "tsv": lambda path, compression, rows: open_delimited(path, compression, rows, "\t"),
    "jsonl": open_jsonl,
    "parquet": open_parquet,
    "xlsx": open_xlsx,
}


def read_feed(
    path: str | Path,
    columns: FeedColumns = FeedColumns(),  # noqa: B008 (frozen: one shared default is safe)
    *,
    chunk_rows: int = 50_000,
    fmt: str | None = None,
    max_url_length: int = 2048,
) -> Iterator[FeedChunk]:
    """Stream ``path`` as validated, de-duplicated chunks.

    File-level problems (missing or empty file, unknown format, unreadable header, no id or URL
    column) raise :class:`FeedError` here, before anything is yielded. Corruption found further
    into the file (a damaged Parquet page or XLSX sheet, a broken gzip stream …) raises
    :class:`FeedError` from the iteration, after the chunks before it were yielded. JSON Lines
    have no header, so their id/URL columns are checked on the first chunk with records.

    Chunks hold about ``chunk_rows`` source rows each; the de-duplication state spans the
    whole feed (8 bytes per distinct (product, URL) pair).
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    path = Path(path)
    fmt, compression = format_and_compression(path, fmt)
    check_file(path)
    source = _OPENERS[fmt](path, compression, chunk_rows)
    roles = None
    if source.names is not None:
        try:
            roles = resolve_roles(source.names, columns, strict=True)
        except FeedError:
            source.close()
            raise
    processor = ChunkProcessor(columns, max_url_length, roles)
    return (processor.process(raw) for raw in source.chunks)


def detect_format(path: str | Path) -> str:
    """The feed format for ``path``'s suffix (one of :data:`FORMATS`), or FeedError."""
    return format_and_compression(Path(path), None)[0]


def estimate_rows(path: str | Path, fmt: str | None = None) -> int | None:
    """A cheap guess at the number of data rows, for a progress bar; None when there is none.

    Exact for Parquet (footer metadata); the sheet's recorded dimension for XLSX; for
    uncompressed text, the file size over the mean line length of its first MiB."""
    path = Path(path)
    try:
        fmt, compression = format_and_compression(path, fmt)
        if fmt == "parquet":
            return parquet_rows(path)
        if fmt == "xlsx":
            return estimate_xlsx_rows(path)
        if compression is not None:
            return None  # the compressed size says little about the row count
        return _estimate_text_rows(path, has_header=fmt != "jsonl")
    except (FeedError, OSError, ValueError, pa.ArrowException, zipfile.BadZipFile):
        return None


def _estimate_text_rows(path: Path, *, has_header: bool) -> int | None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        sample = handle.read(PREFIX_BYTES)
    lines = sample.count(b"\n") + (not sample.endswith(b"\n") and bool(sample))
    if not lines:
        return None
    if len(sample) < size:
        lines = round(size * lines / len(sample))
    return max(lines - has_header, 0)
