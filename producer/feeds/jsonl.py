"""JSON Lines reader: one JSON object a line, no header; keys may differ from line to line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from producer.feeds.encoding import decode, json_text, open_input
from producer.feeds.errors import FeedError, RejectedRow, RejectReason
from producer.feeds.raw import RawChunk, Source, unique_names


def open_jsonl(path: Path, compression: str | None, chunk_rows: int) -> Source:
    return Source(None, _jsonl_chunks(path, compression, chunk_rows))


def _jsonl_chunks(path: Path, compression: str | None, chunk_rows: int) -> Iterator[RawChunk]:
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    malformed: list[RejectedRow] = []
    stream = open_input(path, compression)
    try:
        for number, line in enumerate(_iter_lines(stream), start=1):
            text = decode(line).strip().lstrip("\ufeff")
            if not text:
                records.append({})  # all fields empty: counted as blank downstream
                numbers.append(number)
            else:
                record = _parse_json_record(text)
                if isinstance(record, str):
                    raw = {"line": text[:1000]}
                    malformed.append(RejectedRow(number, RejectReason.MALFORMED_ROW, record, raw))
                else:
                    records.append(record)
                    numbers.append(number)
            if len(records) + len(malformed) >= chunk_rows:
                yield _jsonl_chunk(records, numbers, malformed)
                records, numbers, malformed = [], [], []
        if records or malformed:
            yield _jsonl_chunk(records, numbers, malformed)
    except (OSError, pa.ArrowException) as exc:
        raise FeedError(f"cannot read {path.name}: {exc}") from exc
    finally:
        stream.close()


def _iter_lines(stream: pa.NativeFile) -> Iterator[bytes]:
    # Compressed pyarrow streams have no readline(); JSON never holds a raw newline in a value.
    tail = b""
    while block := stream.read(1 << 20):
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def _parse_json_record(text: str) -> dict[str, Any] | str:
    """The record, or why the line is not one."""
    try:
        record = json.loads(text)
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(record, dict):
        return f"not a JSON object: {type(record).__name__}"
    return record


def _jsonl_chunk(
    records: list[dict[str, Any]], numbers: list[int], malformed: list[RejectedRow]
) -> RawChunk:
    keys = list(dict.fromkeys(key for record in records for key in record))
    columns = [pa.array([json_text(r.get(key)) for r in records], pa.string()) for key in keys]
    return RawChunk(unique_names(keys), columns, np.array(numbers, np.int64), malformed)
