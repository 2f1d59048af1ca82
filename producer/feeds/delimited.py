"""CSV and TSV reader: delimiter sniffing, pyarrow's fast streaming parser, and Python's csv
module for files pyarrow cannot take.

The delimiter is sniffed from the header line, so ``.csv`` and ``.tsv`` differ only in which
delimiter wins a tie; the text is UTF-8 with a cp1252 fallback, or UTF-16 when it has a BOM.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from producer.feeds.encoding import PREFIX_BYTES, SAFE_UTF8, UTF16, open_input, read_prefix
from producer.feeds.errors import FeedError, RejectedRow, RejectReason
from producer.feeds.raw import RawChunk, Source, unique_names

# pyarrow's streaming reader does the work (> 2M rows/s). It drops lines whose field count is
# not the header's and reports them to a handler, numbered; _ArrowRowNumbers turns that back
# into exact row numbers. Lines with too few fields (trailing fields left out) or only empty
# surplus fields (a trailing delimiter) are recovered rather than lost. A file where such lines
# are the rule, or that pyarrow cannot parse, is read by Python's csv module instead: slower,
# but it takes any field count.

_DELIMITERS: Final = (",", "\t", ";", "|")
# Smaller blocks bound pyarrow's read-ahead (~36 blocks in flight); rows may exceed a block.
_CSV_BLOCK_BYTES: Final = 512 << 10
_SAMPLE_RECORDS: Final = 2_000  # records of the first MiB that decide between the two readers
_MAX_MISFITS: Final = 0.1  # share of misfit lines in the sample that picks the csv module
_MIN_SKIPPED_BACKLOG: Final = 10_000


@dataclass(frozen=True)
class _Delimited:
    """How to read one delimited file."""

    path: Path
    compression: str | None
    encoding: str
    delimiter: str
    names: list[str]
    header_lines: int  # physical lines up to the end of the header, blank ones before it too
    chunk_rows: int

    def fit(self, fields: list[str]) -> list[str] | None:
        """``fields`` padded or cut to the header's width; None when non-empty fields would
        be cut (the row does not fit the header)."""
        width = len(self.names)
        if len(fields) > width and any(f.strip() for f in fields[width:]):
            return None
        return (fields + [""] * (width - len(fields)))[:width]

    def malformed(self, number: int, found: int, text: str) -> RejectedRow:
        detail = f"expected {len(self.names)} fields, found {found}"
        return RejectedRow(number, RejectReason.MALFORMED_ROW, detail, {"line": text[:1000]})


def open_delimited(path: Path, compression: str | None, chunk_rows: int, default: str) -> Source:
    prefix = read_prefix(path, compression)
    utf16 = prefix.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    encoding = UTF16 if utf16 else SAFE_UTF8
    whole_file = len(prefix) < PREFIX_BYTES
    text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(prefix, final=whole_file)
    header = _parse_header(text.lstrip("\ufeff"), default)
    if header is None:
        raise FeedError(f"feed has no header row: {path}")
    fields, delimiter, header_lines, rest = header
    names = unique_names(fields)
    if whole_file and not rest:
        # Header without even a newline after it: pyarrow cannot skip past it, and there is
        # nothing to read anyway.
        return Source(names, iter(()))
    spec = _Delimited(path, compression, encoding, delimiter, names, header_lines, chunk_rows)
    if _misfit_share(rest, delimiter, len(names), complete=whole_file) > _MAX_MISFITS:
        return Source(names, _csv_module_chunks(spec, done=0))
    return Source(names, _delimited_chunks(spec))


def _parse_header(text: str, default: str) -> tuple[list[str], str, int, str] | None:
    """(fields, delimiter, lines the header spans incl. leading blank lines, text after it)."""
    first_line = next((line for line in io.StringIO(text, newline="") if line.strip()), None)
    if first_line is None:
        return None
    delimiter = _sniff_delimiter(first_line, default)
    buffer = io.StringIO(text, newline="")
    reader = csv.reader(buffer, delimiter=delimiter)
    for record in reader:
        if any(value.strip() for value in record):
            return record, delimiter, reader.line_num, buffer.read()
    return None


def _sniff_delimiter(line: str, default: str) -> str:
    """The candidate that splits the header line most often, ignoring quoted parts."""
    unquoted = re.sub(r'"[^"]*"', "", line)
    counts = {d: unquoted.count(d) for d in _DELIMITERS}
    # max() keeps the first of equal counts, so the format's own delimiter wins ties.
    order = [default, *(d for d in _DELIMITERS if d != default)]
    best = max(order, key=lambda d: counts[d])
    return best if counts[best] else default


def _misfit_share(text: str, delimiter: str, width: int, *, complete: bool) -> float:
    """Share of the sampled non-blank records whose field count is not ``width``."""
    records = list(
        itertools.islice(
            csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), _SAMPLE_RECORDS
        )
    )
    if not complete and records:
        records.pop()  # the prefix may end inside it
    sample = [r for r in records if any(f.strip() for f in r)]
    return sum(len(r) != width for r in sample) / len(sample) if sample else 0.0


class _SwitchReader(Exception):
    """pyarrow cannot go on with this file; the csv module takes over after ``done`` rows."""

    def __init__(self, done: int) -> None:
        self.done = done


def _delimited_chunks(spec: _Delimited) -> Iterator[RawChunk]:
    numbers = _ArrowRowNumbers(spec)
    try:
        yield from _arrow_chunks(spec, numbers)
    except _SwitchReader as switch:
        yield from _csv_module_chunks(spec, done=switch.done)


def _arrow_chunks(spec: _Delimited, numbers: _ArrowRowNumbers) -> Iterator[RawChunk]:
    keys = [f"c{i}" for i in range(len(spec.names))]  # header names may repeat; these cannot
    # Misfit lines wait in `numbers` for the next good row; a long run of them means this file
    # is better read by the csv module (and keeps memory bounded).
    backlog = max(spec.chunk_rows, _MIN_SKIPPED_BACKLOG)
    stream = open_input(spec.path, spec.compression)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(
                skip_rows=spec.header_lines,
                column_names=keys,
                encoding=spec.encoding,
                block_size=_CSV_BLOCK_BYTES,
                # Serial parsing keeps row numbers known to the invalid-row handler.
                use_threads=False,
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=spec.delimiter,
                newlines_in_values=True,
                ignore_empty_lines=False,  # blank lines stay rows, so row numbers stay true
                invalid_row_handler=numbers.on_invalid_row,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(keys, pa.string()),  # no type inference: "007" stays
                strings_can_be_null=False,
            ),
        )
        pending: list[pa.RecordBatch] = []
        count = 0
        for batch in reader:
            if batch.num_rows:
                pending.append(batch)
                count += batch.num_rows
            while count >= spec.chunk_rows:
                table = pa.Table.from_batches(pending)
                yield numbers.chunk(table.slice(0, spec.chunk_rows))
                rest = table.slice(spec.chunk_rows)
                pending, count = rest.to_batches(), rest.num_rows
            if numbers.backlog > backlog:
                raise _SwitchReader(numbers.done)
        if count:
            yield numbers.chunk(pa.Table.from_batches(pending))
        if numbers.backlog:
            yield numbers.chunk(None)
    except pa.ArrowInvalid as exc:
        raise _SwitchReader(numbers.done) from exc
    except OSError as exc:
        raise FeedError(f"cannot read {spec.path.name}: {exc}") from exc
    finally:
        stream.close()


@dataclass
class _SkippedLine:
    """A line pyarrow could not split into the header's fields."""

    number: int  # data row number
    text: str
    found: int  # fields


class _ArrowRowNumbers:
    """Gives parsed rows their data-row numbers and turns the lines pyarrow skipped into blank
    rows (whitespace only), recovered rows or malformed-row rejections."""

    def __init__(self, spec: _Delimited) -> None:
        self._spec = spec
        self._skipped: deque[_SkippedLine] = deque()
        self.done = 0  # rows (good and skipped) handed out in chunks so far

    @property
    def backlog(self) -> int:
        return len(self._skipped)

    def on_invalid_row(self, row: Any) -> str:
        # pyarrow counts the skipped header lines as rows, so this is the 1-based data row.
        number = row.number - self._spec.header_lines
        self._skipped.append(_SkippedLine(number, row.text, row.actual_columns))
        return "skip"

    def chunk(self, table: pa.Table | None) -> RawChunk:
        """Number ``table``'s rows; None at the end of the file, for lines skipped after the
        last good row."""
        start = end = self.done
        consumed: list[_SkippedLine] = []
        if table is None:
            consumed, end = list(self._skipped), self.done + len(self._skipped)
            self._skipped.clear()
            columns = [pa.array([], pa.string()) for _ in self._spec.names]
        else:
            # The good rows are the first n numbers from here that pyarrow did not skip. It
            # parses a block ahead of the batch it returns, so the handler has already seen
            # every line up to this table's end; the queue may hold later ones too.
            end = self.done + table.num_rows
            while self._skipped and self._skipped[0].number <= end:
                consumed.append(self._skipped.popleft())
                end += 1
            columns = [c.combine_chunks() for c in table.columns]
        self.done = end
        numbers = np.arange(start + 1, end + 1, dtype=np.int64)
        if consumed:
            numbers = numbers[~np.isin(numbers, [line.number for line in consumed])]
        raw = RawChunk(list(self._spec.names), columns, numbers)
        recovered: list[tuple[int, list[str]]] = []
        for line in consumed:
            fields = self._fields(line.text)
            if not any(f.strip() for f in fields):
                raw.blank_lines += 1
            elif (fitted := self._spec.fit(fields)) is not None:
                recovered.append((line.number, fitted))
            else:
                raw.malformed.append(self._spec.malformed(line.number, line.found, line.text))
        if recovered:
            _append_rows(raw, recovered)
        return raw

    def _fields(self, text: str) -> list[str]:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self._spec.delimiter)
        return next(reader, [])


def _append_rows(raw: RawChunk, rows: list[tuple[int, list[str]]]) -> None:
    """Add recovered rows to ``raw``, keeping row-number order."""
    numbers = np.concatenate([raw.row_numbers, np.array([n for n, _ in rows], np.int64)])
    order = pa.array(np.argsort(numbers, kind="stable"))
    for i, column in enumerate(raw.columns):
        more = pa.array([values[i] for _, values in rows], pa.string())
        raw.columns[i] = pa.concat_arrays([column, more]).take(order)
    raw.row_numbers = numbers[np.asarray(order)]


def _csv_module_chunks(spec: _Delimited, *, done: int) -> Iterator[RawChunk]:
    """The slow, forgiving reader: Python's csv module, from data row ``done + 1`` on."""
    stream = open_input(spec.path, spec.compression)
    text = io.TextIOWrapper(stream, encoding=spec.encoding, errors="replace", newline="")
    reader = csv.reader(text, delimiter=spec.delimiter)
    rows: list[list[str]] = []
    numbers: list[int] = []
    malformed: list[RejectedRow] = []
    number = 0
    try:
        while reader.line_num < spec.header_lines and next(reader, None) is not None:
            pass
        for fields in reader:
            number += 1
            if number <= done:
                continue
            if (fitted := spec.fit(fields)) is None:
                line = spec.delimiter.join(fields)
                malformed.append(spec.malformed(number, len(fields), line))
            else:
                rows.append(fitted)
                numbers.append(number)
            if len(rows) + len(malformed) >= spec.chunk_rows:
                yield _csv_module_chunk(spec, rows, numbers, malformed)
                rows, numbers, malformed = [], [], []
        if rows or malformed:
            yield _csv_module_chunk(spec, rows, numbers, malformed)
    except (csv.Error, OSError, pa.ArrowException) as exc:
        raise FeedError(f"cannot parse {spec.path.name} near data row {number}: {exc}") from exc
    finally:
        text.close()


def _csv_module_chunk(
    spec: _Delimited, rows: list[list[str]], numbers: list[int], malformed: list[RejectedRow]
) -> RawChunk:
    columns = zip(*rows, strict=True) if rows else ([] for _ in spec.names)
    arrays = [pa.array(list(column), pa.string()) for column in columns]
    return RawChunk(list(spec.names), arrays, np.array(numbers, np.int64), malformed)
