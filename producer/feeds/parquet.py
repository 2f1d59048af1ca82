"""Parquet reader: record batches, every column cast to text (list columns stay lists)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from producer.feeds.encoding import decode_array, python_text
from producer.feeds.errors import FeedError
from producer.feeds.raw import RawChunk, Source, unique_names


def open_parquet(path: Path, compression: str | None, chunk_rows: int) -> Source:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise FeedError(f"unreadable or truncated Parquet file {path.name}: {exc}") from exc
    names = unique_names(parquet.schema_arrow.names)
    return Source(names, _parquet_chunks(parquet, path, names, chunk_rows), parquet.close)


def _parquet_chunks(
    parquet: pq.ParquetFile, path: Path, names: list[str], chunk_rows: int
) -> Iterator[RawChunk]:
    next_number = 1
    try:
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            numbers = np.arange(next_number, next_number + batch.num_rows, dtype=np.int64)
            next_number += batch.num_rows
            yield RawChunk(list(names), [_arrow_text(c) for c in batch.columns], numbers)
    except (pa.ArrowException, OSError) as exc:
        raise FeedError(f"unreadable or truncated Parquet file {path.name}: {exc}") from exc
    finally:
        parquet.close()


def _arrow_text(arr: pa.Array) -> pa.Array:
    """A Parquet column as pa.string(), or pa.list_(pa.string()) for list columns."""
    kind = arr.type
    if pa.types.is_dictionary(kind):
        return _arrow_text(arr.dictionary_decode())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return arr.cast(pa.string())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return decode_array(arr.cast(pa.binary()))
    if pa.types.is_null(kind):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        try:
            return arr.cast(pa.list_(pa.string()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # e.g. list<struct>: fall through to JSON text
    else:
        try:
            return arr.cast(pa.string())  # numbers, dates, timestamps, decimals…
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    return pa.array([python_text(v) for v in arr.to_pylist()], pa.string())


def parquet_rows(path: Path) -> int:
    """The row count from the file's footer metadata: exact, and nothing else is read."""
    with pq.ParquetFile(path) as parquet:
        return parquet.metadata.num_rows
