"""Streaming catalog-feed reader: file formats, column mapping, row validation, de-duplication.

``read_feed`` turns a retailer's feed file into a stream of :class:`FeedChunk` objects, each
built from at most about ``chunk_rows`` source rows, so a multi-million-row feed never sits in
memory. It touches no database: the caller records the chunks and enqueues work.

Formats (picked from the file suffix, or ``fmt``): CSV (``.csv``, ``.txt``), TSV (``.tsv``,
``.tab``), JSON Lines (``.jsonl``, ``.ndjson``), Parquet (``.parquet``, ``.pq``) and XLSX
(``.xlsx``, ``.xlsm``). Delimited text and JSON Lines may also be compressed (``.gz``,
``.bz2``, ``.zst``). Every value is read as text.

URL normalisation — what ``FeedChunk.images.url`` holds and what de-duplication compares:

* surrounding whitespace is trimmed;
* scheme and host are lower-cased (both are case-insensitive; path and query are not, and are
  kept byte-for-byte: no percent-encoding changes, no query sorting, no trailing-slash games);
* a protocol-relative ``//host/…`` becomes ``https://host/…``;
* a default port (``:80`` for http, ``:443`` for https) and the ``#fragment`` are dropped:
  neither changes the request a downloader sends.

Only http and https URLs with a host are accepted. Rows a retailer got wrong are *rejected*
(reported with a :class:`RejectReason`, never raised); only a feed that cannot be read at all
raises :class:`FeedError`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import re
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, Final
from xml.etree.ElementTree import ParseError

import numpy as np
import openpyxl
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from openpyxl.utils.exceptions import InvalidFileException

__all__ = [
    "FORMATS",
    "IMAGE_COLUMNS",
    "FeedChunk",
    "FeedColumns",
    "FeedError",
    "InvalidURL",
    "RejectReason",
    "RejectedRow",
    "detect_format",
    "estimate_rows",
    "normalize_url",
    "read_feed",
    "url_hash",
]

FORMATS: Final = ("csv", "tsv", "jsonl", "parquet", "xlsx")

# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


class FeedError(Exception):
    """The feed as a whole cannot be read: missing, empty, unknown format, corrupt, or without
    a product-id or image-URL column. Bad *rows* are never raised; they are rejected."""


class RejectReason(StrEnum):
    MISSING_ID = "missing_id"
    MISSING_URL = "missing_url"
    MALFORMED_URL = "malformed_url"  # no scheme/host, whitespace or control chars, unparsable
    UNSUPPORTED_SCHEME = "unsupported_scheme"  # anything but http/https
    URL_TOO_LONG = "url_too_long"
    MALFORMED_ROW = "malformed_row"  # more fields than the header, or a line that is not JSON


@dataclass(frozen=True)
class FeedColumns:
    """Which feed columns hold what. Matching ignores case, surrounding whitespace and the
    difference between spaces, ``_`` and ``-``; ``id`` and ``url`` also fall back to a few
    common aliases. Optional columns set to None (or absent from the feed) come out as None."""

    id: str = "product_id"
    url: str = "image_url"
    title: str | None = "title"
    brand: str | None = "brand"
    category: str | None = "category"
    price: str | None = "price"
    # A URL cell may list several images separated by this; None: one URL per cell.
    url_separator: str | None = "|"

    def __post_init__(self) -> None:
        if not self.id or not self.url:
            raise ValueError("FeedColumns.id and FeedColumns.url must be non-empty")
        if self.url_separator == "":
            raise ValueError("FeedColumns.url_separator must be None or non-empty")


@dataclass(frozen=True)
class RejectedRow:
    """A source row (or one URL of it) that was not accepted.

    A row with several URLs can be rejected once per bad URL; ``raw`` holds the row's fields
    as read (header name -> text)."""

    row_number: int
    reason: RejectReason
    detail: str
    raw: dict[str, str]


@dataclass
class FeedChunk:
    """What one slice of the feed produced.

    ``images`` has one row per accepted, first-seen (product, URL) pair, in file order:
    ``row_number`` (int64: 1-based data row, header excluded; the line number for JSON Lines),
    ``product_id`` and ``url`` (pandas ``str``; ``url`` normalised as the module doc says),
    ``title``/``brand``/``category`` (object: str or None), ``price`` (float64, NaN when absent
    or not a number >= 0) and ``extra`` (object: dict of the other non-empty columns, or None;
    the images of one row share one dict).
    """

    images: pd.DataFrame
    rejected: list[RejectedRow]
    rows_read: int  # source rows in this slice: blank, rejected and accepted alike
    duplicates: int  # (product, URL) pairs dropped because an earlier row had them
    blank: int  # rows whose fields were all empty: skipped, not rejected


class InvalidURL(ValueError):
    """Raised by :func:`normalize_url`; ``reason`` is the :class:`RejectReason`."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


IMAGE_COLUMNS: Final = (
    "row_number",
    "product_id",
    "url",
    "title",
    "brand",
    "category",
    "price",
    "extra",
)

# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def read_feed(
    path: str | Path,
    columns: FeedColumns = FeedColumns(),
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
    fmt, compression = _format_and_compression(path, fmt)
    _check_file(path)
    source = _OPENERS[fmt](path, compression, chunk_rows)
    roles = None
    if source.names is not None:
        try:
            roles = _resolve_roles(source.names, columns, strict=True)
        except FeedError:
            source.close()
            raise
    processor = _ChunkProcessor(columns, max_url_length, roles)
    return (processor.process(raw) for raw in source.chunks)


def detect_format(path: str | Path) -> str:
    """The feed format for ``path``'s suffix (one of :data:`FORMATS`), or FeedError."""
    return _format_and_compression(Path(path), None)[0]


def estimate_rows(path: str | Path, fmt: str | None = None) -> int | None:
    """A cheap guess at the number of data rows, for a progress bar; None when there is none.

    Exact for Parquet (footer metadata); the sheet's recorded dimension for XLSX; for
    uncompressed text, the file size over the mean line length of its first MiB."""
    path = Path(path)
    try:
        fmt, compression = _format_and_compression(path, fmt)
        if fmt == "parquet":
            with pq.ParquetFile(path) as parquet:
                return parquet.metadata.num_rows
        if fmt == "xlsx":
            return _estimate_xlsx_rows(path)
        if compression is not None:
            return None  # the compressed size says little about the row count
        return _estimate_text_rows(path, has_header=fmt != "jsonl")
    except (FeedError, OSError, ValueError, pa.ArrowException, zipfile.BadZipFile):
        return None


def normalize_url(url: str, *, max_length: int = 2048) -> str:
    """The normalised form of one URL (see the module doc), or :class:`InvalidURL`.

    Same rules as :func:`read_feed` (it runs the same vectorised code), so use it for URLs that
    come from anywhere else before comparing them with, or hashing them like, feed URLs."""
    text = url.strip()
    if not text:
        raise InvalidURL(RejectReason.MISSING_URL, "empty URL")
    check = _check_urls(pa.array([text], pa.string()), max_length)
    problem = _UrlProblem(int(check.problems[0]))
    if problem is not _UrlProblem.OK:
        raise InvalidURL(problem.reason, _url_detail(problem, text, max_length))
    return str(check.normalized[0].as_py())


def url_hash(url: str) -> str:
    """Stable key for an already-normalised URL: 32 hex chars (BLAKE2b, 128 bits).

    128 bits because it is a database key: at 64 bits a few billion URLs would risk a silent
    collision, and a hex string fits any SQL text column (unsigned 64-bit ints do not fit a
    signed BIGINT). Hashes exactly the text given: pass ``url`` as read_feed emits it, or the
    result of :func:`normalize_url`. (De-duplication inside a feed uses a separate, faster,
    per-process 64-bit hash; nothing outside this module should rely on that one.)"""
    return hashlib.blake2b(url.encode("utf-8"), digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------
# Formats and files
# --------------------------------------------------------------------------------------------

_SUFFIX_FORMATS: Final = {
    "csv": "csv",
    "txt": "csv",  # e.g. Google Merchant "text" feeds; the delimiter is sniffed anyway
    "tsv": "tsv",
    "tab": "tsv",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "parquet": "parquet",
    "pq": "parquet",
    "xlsx": "xlsx",
    "xlsm": "xlsx",
}
_COMPRESSIONS: Final = {"gz": "gzip", "gzip": "gzip", "bz2": "bz2", "zst": "zstd"}
_STREAMABLE_COMPRESSED: Final = frozenset({"csv", "tsv", "jsonl"})
_PREFIX_BYTES: Final = 1 << 20  # enough for any sane header line and delimiter sniffing


def _format_and_compression(path: Path, fmt: str | None) -> tuple[str, str | None]:
    suffixes = [s.lstrip(".").lower() for s in path.suffixes]
    compression = _COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes = suffixes[:-1]
    if fmt is None:
        fmt = suffixes[-1] if suffixes else ""
        if fmt not in _SUFFIX_FORMATS:
            hint = " (JSON arrays cannot be streamed: use JSON Lines)" if fmt == "json" else ""
            raise FeedError(
                f"unknown feed format for {path.name!r}{hint}; expected one of "
                f"{', '.join('.' + s for s in _SUFFIX_FORMATS)} or an explicit format"
            )
    resolved = _SUFFIX_FORMATS.get(fmt.lower().lstrip("."))
    if resolved is None:
        raise FeedError(f"unknown feed format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if compression is not None and resolved not in _STREAMABLE_COMPRESSED:
        raise FeedError(f"a compressed {resolved} feed is not supported: {path.name!r}")
    return resolved, compression


def _check_file(path: Path) -> None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FeedError(f"feed file not found: {path}") from None
    except OSError as exc:
        raise FeedError(f"cannot read feed file {path}: {exc}") from exc
    if not path.is_file():
        raise FeedError(f"feed path is not a file: {path}")
    if stat.st_size == 0:
        raise FeedError(f"feed file is empty (0 bytes): {path}")


def _open_input(path: Path, compression: str | None) -> pa.NativeFile:
    try:
        return pa.input_stream(str(path), compression=compression)
    except (OSError, pa.ArrowException) as exc:
        raise FeedError(f"cannot open feed file {path}: {exc}") from exc


def _read_prefix(path: Path, compression: str | None) -> bytes:
    with _open_input(path, compression) as stream:
        try:
            return stream.read(_PREFIX_BYTES)
        except (OSError, pa.ArrowException) as exc:
            raise FeedError(f"cannot read feed file {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Text decoding: UTF-8 with a per-byte legacy fallback
# --------------------------------------------------------------------------------------------
# Feeds exported from Windows tools are often cp1252 (or a mix: a UTF-8 file with a few pasted
# Latin-1 rows). Decoding every byte sequence that is valid UTF-8 as UTF-8 and only the invalid
# bytes as cp1252 (latin-1 for the 5 bytes cp1252 leaves undefined) keeps both kinds of rows
# intact and never fails. pyarrow takes only a codec *name* for transcoding, so the scheme is
# registered as a codec.

_LEGACY_ERRORS: Final = "flickd-cp1252-fallback"
_SAFE_UTF8: Final = "flickd_utf8_cp1252"
_UTF16: Final = "utf-16"  # BOM-detected; Excel's "Unicode text" export


def _legacy_bytes(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    chars = []
    for byte in bad:
        try:
            chars.append(bytes([byte]).decode("cp1252"))
        except UnicodeDecodeError:
            chars.append(chr(byte))  # latin-1
    return "".join(chars), exc.end


class _SafeUtf8Decoder(codecs.BufferedIncrementalDecoder):
    def _buffer_decode(self, input: Any, errors: str, final: bool) -> tuple[str, int]:
        return codecs.utf_8_decode(input, _LEGACY_ERRORS, final)


def _find_codec(name: str) -> codecs.CodecInfo | None:
    if name.replace("-", "_") != _SAFE_UTF8:
        return None
    return codecs.CodecInfo(
        name=_SAFE_UTF8,
        encode=codecs.utf_8_encode,
        decode=lambda data, errors="strict": codecs.utf_8_decode(data, _LEGACY_ERRORS, True),
        incrementaldecoder=_SafeUtf8Decoder,
    )


codecs.register_error(_LEGACY_ERRORS, _legacy_bytes)
codecs.register(_find_codec)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", _LEGACY_ERRORS)


def _decode_array(arr: pa.Array) -> pa.Array:
    """A binary Arrow array as text, with the same fallback."""
    try:
        return arr.cast(pa.string())  # valid UTF-8: no copy through Python
    except pa.ArrowInvalid:
        return pa.array([None if v is None else _decode(v) for v in arr.to_pylist()], pa.string())


# --------------------------------------------------------------------------------------------
# Raw chunks: what every format reader produces
# --------------------------------------------------------------------------------------------


@dataclass
class _RawChunk:
    names: list[str]  # unique, trimmed header names
    # One array per name: pa.string(), or pa.list_(pa.string()) for Parquet list columns.
    columns: list[pa.Array]
    row_numbers: np.ndarray  # int64, one per row of the columns
    malformed: list[RejectedRow] = field(default_factory=list)
    blank_lines: int = 0  # whitespace-only lines the parser dropped

    @property
    def rows_read(self) -> int:
        return len(self.row_numbers) + len(self.malformed) + self.blank_lines


@dataclass
class _Source:
    names: list[str] | None  # the header; None when the format has none (JSON Lines)
    chunks: Iterator[_RawChunk]
    close: Callable[[], None] = lambda: None


def _unique_names(header: Iterable[object]) -> list[str]:
    """Trimmed header names; blanks become ``column_N`` and repeats get ``_2``, ``_3``…"""
    names: list[str] = []
    seen: set[str] = set()
    for i, value in enumerate(header, start=1):
        name = "" if value is None else str(value).strip().lstrip("\ufeff").strip()
        name = name or f"column_{i}"
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate)
        names.append(candidate)
    return names


# --------------------------------------------------------------------------------------------
# CSV / TSV
# --------------------------------------------------------------------------------------------
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


def _open_delimited(path: Path, compression: str | None, chunk_rows: int, default: str) -> _Source:
    prefix = _read_prefix(path, compression)
    utf16 = prefix.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    encoding = _UTF16 if utf16 else _SAFE_UTF8
    whole_file = len(prefix) < _PREFIX_BYTES
    text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(prefix, final=whole_file)
    header = _parse_header(text.lstrip("\ufeff"), default)
    if header is None:
        raise FeedError(f"feed has no header row: {path}")
    fields, delimiter, header_lines, rest = header
    names = _unique_names(fields)
    if whole_file and not rest:
        # Header without even a newline after it: pyarrow cannot skip past it, and there is
        # nothing to read anyway.
        return _Source(names, iter(()))
    spec = _Delimited(path, compression, encoding, delimiter, names, header_lines, chunk_rows)
    if _misfit_share(rest, delimiter, len(names), complete=whole_file) > _MAX_MISFITS:
        return _Source(names, _csv_module_chunks(spec, done=0))
    return _Source(names, _delimited_chunks(spec))


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


def _delimited_chunks(spec: _Delimited) -> Iterator[_RawChunk]:
    numbers = _ArrowRowNumbers(spec)
    try:
        yield from _arrow_chunks(spec, numbers)
    except _SwitchReader as switch:
        yield from _csv_module_chunks(spec, done=switch.done)


def _arrow_chunks(spec: _Delimited, numbers: _ArrowRowNumbers) -> Iterator[_RawChunk]:
    keys = [f"c{i}" for i in range(len(spec.names))]  # header names may repeat; these cannot
    # Misfit lines wait in `numbers` for the next good row; a long run of them means this file
    # is better read by the csv module (and keeps memory bounded).
    backlog = max(spec.chunk_rows, _MIN_SKIPPED_BACKLOG)
    stream = _open_input(spec.path, spec.compression)
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

    def chunk(self, table: pa.Table | None) -> _RawChunk:
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
        raw = _RawChunk(list(self._spec.names), columns, numbers)
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


def _append_rows(raw: _RawChunk, rows: list[tuple[int, list[str]]]) -> None:
    """Add recovered rows to ``raw``, keeping row-number order."""
    numbers = np.concatenate([raw.row_numbers, np.array([n for n, _ in rows], np.int64)])
    order = pa.array(np.argsort(numbers, kind="stable"))
    for i, column in enumerate(raw.columns):
        more = pa.array([values[i] for _, values in rows], pa.string())
        raw.columns[i] = pa.concat_arrays([column, more]).take(order)
    raw.row_numbers = numbers[np.asarray(order)]


def _csv_module_chunks(spec: _Delimited, *, done: int) -> Iterator[_RawChunk]:
    """The slow, forgiving reader: Python's csv module, from data row ``done + 1`` on."""
    stream = _open_input(spec.path, spec.compression)
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
) -> _RawChunk:
    columns = zip(*rows, strict=True) if rows else ([] for _ in spec.names)
    arrays = [pa.array(list(column), pa.string()) for column in columns]
    return _RawChunk(list(spec.names), arrays, np.array(numbers, np.int64), malformed)


# --------------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------------


def _open_jsonl(path: Path, compression: str | None, chunk_rows: int) -> _Source:
    return _Source(None, _jsonl_chunks(path, compression, chunk_rows))


def _jsonl_chunks(path: Path, compression: str | None, chunk_rows: int) -> Iterator[_RawChunk]:
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    malformed: list[RejectedRow] = []
    stream = _open_input(path, compression)
    try:
        for number, line in enumerate(_iter_lines(stream), start=1):
            text = _decode(line).strip().lstrip("\ufeff")
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
) -> _RawChunk:
    keys = list(dict.fromkeys(key for record in records for key in record))
    columns = [pa.array([_json_text(r.get(key)) for r in records], pa.string()) for key in keys]
    return _RawChunk(_unique_names(keys), columns, np.array(numbers, np.int64), malformed)


def _json_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    # Lists (e.g. several image URLs) and objects stay JSON text; the URL column parses lists.
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


def _open_parquet(path: Path, compression: str | None, chunk_rows: int) -> _Source:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise FeedError(f"unreadable or truncated Parquet file {path.name}: {exc}") from exc
    names = _unique_names(parquet.schema_arrow.names)
    return _Source(names, _parquet_chunks(parquet, path, names, chunk_rows), parquet.close)


def _parquet_chunks(
    parquet: pq.ParquetFile, path: Path, names: list[str], chunk_rows: int
) -> Iterator[_RawChunk]:
    next_number = 1
    try:
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            numbers = np.arange(next_number, next_number + batch.num_rows, dtype=np.int64)
            next_number += batch.num_rows
            yield _RawChunk(list(names), [_arrow_text(c) for c in batch.columns], numbers)
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
        return _decode_array(arr.cast(pa.binary()))
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
    return pa.array([_python_text(v) for v in arr.to_pylist()], pa.string())


def _python_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return _decode(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list | dict | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return _json_text(value)


# --------------------------------------------------------------------------------------------
# XLSX
# --------------------------------------------------------------------------------------------

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


def _open_xlsx(path: Path, compression: str | None, chunk_rows: int) -> _Source:
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

    names = _unique_names(header)
    chunks = _xlsx_chunks(rows, header_row, names, chunk_rows, path, close)
    return _Source(names, chunks, close)


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
) -> Iterator[_RawChunk]:
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
) -> _RawChunk:
    # Cells right of the header have no column name; they are ignored.
    columns = [
        pa.array([_cell_text(r[j]) if j < len(r) else None for r in rows], pa.string())
        for j in range(width)
    ]
    return _RawChunk(list(names), columns, np.array(numbers, np.int64))


def _cell_text(value: Any) -> str | None:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # 12345.0 from a numeric id cell reads back as "12345"
    return _python_text(value)


# --------------------------------------------------------------------------------------------
# Column roles
# --------------------------------------------------------------------------------------------

_ID_ALIASES: Final = ("id", "sku", "product id")
_URL_ALIASES: Final = ("image_link", "image", "url", "image url")


@dataclass(frozen=True)
class _Roles:
    """Column positions for each role (None: not in the feed) and the rest, as extras."""

    id: int | None
    url: int | None
    title: int | None
    brand: int | None
    category: int | None
    price: int | None
    extras: tuple[int, ...]


def _name_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


def _resolve_roles(names: list[str], spec: FeedColumns, *, strict: bool) -> _Roles:
    positions: dict[str, int] = {}
    for i, name in enumerate(names):
        positions.setdefault(_name_key(name), i)

    def find(wanted: str | None, aliases: tuple[str, ...] = ()) -> int | None:
        if wanted is None:
            return None
        for candidate in (wanted, *aliases):
            if (i := positions.get(_name_key(candidate))) is not None:
                return i
        return None

    id_pos, url_pos = find(spec.id, _ID_ALIASES), find(spec.url, _URL_ALIASES)
    if strict:
        for label, pos, wanted, aliases in (
            ("product-id", id_pos, spec.id, _ID_ALIASES),
            ("image-URL", url_pos, spec.url, _URL_ALIASES),
        ):
            if pos is None:
                raise FeedError(
                    f"feed has no {label} column: looked for {wanted!r} (or "
                    f"{', '.join(map(repr, aliases))}); columns found: "
                    f"{', '.join(map(repr, names)) or 'none'}"
                )
    if id_pos is not None and id_pos == url_pos:
        raise FeedError(f"the same column {names[id_pos]!r} cannot be both product id and URL")
    taken = {id_pos, url_pos}

    def optional(wanted: str | None) -> int | None:
        pos = find(wanted)
        if pos in taken:
            return None
        taken.add(pos)
        return pos

    title, brand = optional(spec.title), optional(spec.brand)
    category, price = optional(spec.category), optional(spec.price)
    extras = tuple(i for i in range(len(names)) if i not in taken)
    return _Roles(id_pos, url_pos, title, brand, category, price, extras)


# --------------------------------------------------------------------------------------------
# Chunk processing: validation, explosion, de-duplication
# --------------------------------------------------------------------------------------------

_NULL_TEXT: Final = pa.scalar(None, pa.string())


class _ChunkProcessor:
    def __init__(self, spec: FeedColumns, max_url_length: int, roles: _Roles | None) -> None:
        self._spec = spec
        self._max_url_length = max_url_length
        self._roles = roles  # fixed for formats with a header
        self._roles_by_names: dict[tuple[str, ...], _Roles] = {}
        self._checked_columns = roles is not None
        self._seen = _SeenHashes()

    def _roles_for(self, names: list[str]) -> _Roles:
        if self._roles is not None:
            return self._roles
        key = tuple(names)
        if key not in self._roles_by_names:
            # JSON Lines: keys may differ between chunks. The first chunk with records must
            # have id and URL keys (a wrong column mapping, not bad rows); later ones may not.
            strict = not self._checked_columns and bool(names)
            self._roles_by_names[key] = _resolve_roles(names, self._spec, strict=strict)
            self._checked_columns = self._checked_columns or bool(names)
        return self._roles_by_names[key]

    def process(self, raw: _RawChunk) -> FeedChunk:
        roles = self._roles_for(raw.names)
        n = len(raw.row_numbers)
        columns = [_trim(col) for col in raw.columns]
        blank = _all_empty(columns, n)
        kept = np.flatnonzero(~blank)  # raw positions of the rows that have any value
        rows = _Rows(raw, roles, [col.take(kept) for col in columns], kept)

        rejected = list(raw.malformed)
        ids = rows.text_column(roles.id)
        missing_id = _empty_mask(ids)
        urls, parent = _explode_urls(rows.column(roles.url), self._spec.url_separator)
        has_url = np.bincount(parent, minlength=len(kept)) > 0
        missing_url = ~missing_id & ~has_url
        rejected += rows.rejections(missing_id, RejectReason.MISSING_ID, roles.id)
        rejected += rows.rejections(missing_url, RejectReason.MISSING_URL, roles.url)

        with_id = ~missing_id[parent]
        urls, parent = urls.filter(pa.array(with_id)), parent[with_id]
        check = _check_urls(urls, self._max_url_length)
        rejected += rows.url_rejections(check, urls, parent, self._max_url_length)

        ok = check.problems == _UrlProblem.OK
        urls, parent = check.normalized.filter(pa.array(ok)), parent[ok]
        fresh = self._seen.add(_pair_hashes(ids.take(parent), urls))
        urls, parent = urls.filter(pa.array(fresh)), parent[fresh]

        rejected.sort(key=lambda r: r.row_number)
        return FeedChunk(
            images=rows.images(urls, parent),
            rejected=rejected,
            rows_read=raw.rows_read,
            duplicates=int(len(fresh) - fresh.sum()),
            blank=int(blank.sum()) + raw.blank_lines,
        )


class _Rows:
    """The non-blank rows of one raw chunk, trimmed, with the helpers that turn them into
    rejections and the images frame."""

    def __init__(self, raw: _RawChunk, roles: _Roles, columns: list[pa.Array], kept: np.ndarray):
        self.raw = raw
        self.roles = roles
        self.columns = columns
        self.kept = kept
        self.numbers = raw.row_numbers[kept]

    def column(self, pos: int | None) -> pa.Array:
        if pos is None:
            return pa.nulls(len(self.kept), pa.string())
        return self.columns[pos]

    def text_column(self, pos: int | None) -> pa.Array:
        col = self.column(pos)
        return col if pa.types.is_string(col.type) else _list_as_json(col)

    def raw_fields(self, rows: np.ndarray) -> list[dict[str, str]]:
        """The rows' fields as read (untrimmed), for rejection reports."""
        positions = pa.array(self.kept[rows], pa.int64())
        values = [_fields_as_text(col.take(positions)) for col in self.raw.columns]
        records: list[dict[str, str]] = [{} for _ in rows]
        for name, column in zip(self.raw.names, values, strict=True):
            for record, value in zip(records, column, strict=True):
                record[name] = "" if value is None else value
        return records

    def rejections(
        self, mask: np.ndarray, reason: RejectReason, pos: int | None
    ) -> list[RejectedRow]:
        rows = np.flatnonzero(mask)
        if not len(rows):
            return []
        detail = f"{self.raw.names[pos]!r} is empty" if pos is not None else "no such column"
        return [
            RejectedRow(int(self.numbers[r]), reason, detail, fields)
            for r, fields in zip(rows, self.raw_fields(rows), strict=True)
        ]

    def url_rejections(
        self, check: _UrlCheck, urls: pa.Array, parent: np.ndarray, max_length: int
    ) -> list[RejectedRow]:
        bad = np.flatnonzero(check.problems != _UrlProblem.OK)
        if not len(bad):
            return []
        texts = urls.take(pa.array(bad)).to_pylist()
        fields = self.raw_fields(parent[bad])
        out = []
        for item, text, raw_fields in zip(bad, texts, fields, strict=True):
            problem = _UrlProblem(int(check.problems[item]))
            number = int(self.numbers[parent[item]])
            out.append(
                RejectedRow(
                    number, problem.reason, _url_detail(problem, text, max_length), raw_fields
                )
            )
        return out

    def images(self, urls: pa.Array, parent: np.ndarray) -> pd.DataFrame:
        take = pa.array(parent, pa.int64())
        roles = self.roles
        return pd.DataFrame(
            {
                "row_number": self.numbers[parent],
                "product_id": self.text_column(roles.id).take(take).to_pandas(),
                "url": urls.to_pandas(),
                "title": _optional_text(self.text_column(roles.title).take(take)),
                "brand": _optional_text(self.text_column(roles.brand).take(take)),
                "category": _optional_text(self.text_column(roles.category).take(take)),
                "price": _parse_prices(self.text_column(roles.price))[parent],
                "extra": pd.Series(self._extras(parent), dtype=object),
            },
            columns=list(IMAGE_COLUMNS),
        )

    def _extras(self, parent: np.ndarray) -> np.ndarray:
        out = np.full(len(parent), None, dtype=object)
        if not self.roles.extras or not len(parent):
            return out
        rows, index = np.unique(parent, return_inverse=True)
        take = pa.array(rows)
        names = [self.raw.names[i] for i in self.roles.extras]
        values = [self.text_column(i).take(take).to_pylist() for i in self.roles.extras]
        dicts = np.empty(len(rows), dtype=object)
        dicts[:] = [
            {k: v for k, v in zip(names, row, strict=True) if v} or None
            for row in zip(*values, strict=True)
        ]
        return dicts[index]


def _is_list(arr: pa.Array) -> bool:
    return pa.types.is_list(arr.type)


def _trim(col: pa.Array) -> pa.Array:
    if _is_list(col):
        values = pc.utf8_trim_whitespace(col.values)
        return pa.ListArray.from_arrays(col.offsets, values, mask=col.is_null())
    return pc.utf8_trim_whitespace(col)


def _empty_mask(col: pa.Array) -> np.ndarray:
    """True where a (trimmed) value is null, "" or an empty list."""
    if _is_list(col):
        lengths = pc.list_value_length(col)
        return np.asarray(pc.fill_null(pc.equal(lengths, 0), True))
    return np.asarray(pc.fill_null(pc.equal(col, ""), True))


def _all_empty(columns: list[pa.Array], n: int) -> np.ndarray:
    blank = np.ones(n, dtype=bool)
    for col in columns:
        blank &= _empty_mask(col)
    return blank


def _list_as_json(col: pa.Array) -> pa.Array:
    texts = [None if v is None else json.dumps(v, ensure_ascii=False) for v in col.to_pylist()]
    return pa.array(texts, pa.string())


def _fields_as_text(col: pa.Array) -> list[str | None]:
    return (col if pa.types.is_string(col.type) else _list_as_json(col)).to_pylist()


def _optional_text(col: pa.Array) -> pd.Series:
    """str or None, so records go straight into SQL drivers (pandas' NaN would not). The
    explicit object dtype stops pandas 3 from inferring its NaN-based ``str`` dtype."""
    col = pc.if_else(pc.equal(col, ""), _NULL_TEXT, col)
    return pd.Series(col.to_numpy(zero_copy_only=False), dtype=object)


def _explode_urls(col: pa.Array, separator: str | None) -> tuple[pa.Array, np.ndarray]:
    """One entry per non-empty URL: (trimmed URLs, index of the row each came from)."""
    lists = col if _is_list(col) else _split_urls(col, separator)
    urls = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    parent = np.asarray(pc.list_parent_indices(lists), dtype=np.int64)
    present = ~_empty_mask(urls)
    return urls.filter(pa.array(present)), parent[present]


def _split_urls(col: pa.Array, separator: str | None) -> pa.Array:
    json_lists = np.asarray(pc.fill_null(pc.starts_with(col, "["), False))
    if json_lists.any():
        # A JSON array of URLs (JSON Lines lists arrive like this too). Rare: plain Python.
        values = [_url_list(v, separator) for v in col.to_pylist()]
        return pa.array(values, pa.list_(pa.string()))
    if separator:
        return pc.split_pattern(col, separator)
    return pa.ListArray.from_arrays(pa.array(np.arange(len(col) + 1, dtype=np.int32)), col)


def _url_list(value: str | None, separator: str | None) -> list[str] | None:
    if value is None:
        return None
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            return [_python_text(v) or "" for v in parsed]
    return value.split(separator) if separator else [value]


# --------------------------------------------------------------------------------------------
# URL validation and normalisation (vectorised)
# --------------------------------------------------------------------------------------------


class _UrlProblem(IntEnum):
    OK = 0
    NO_SCHEME = 1
    BAD_SCHEME = 2
    BAD_CHARACTERS = 3
    UNPARSABLE = 4
    NO_HOST = 5
    BAD_HOST = 6
    BAD_PORT = 7
    TOO_LONG = 8

    @property
    def reason(self) -> RejectReason:
        if self is _UrlProblem.BAD_SCHEME:
            return RejectReason.UNSUPPORTED_SCHEME
        if self is _UrlProblem.TOO_LONG:
            return RejectReason.URL_TOO_LONG
        return RejectReason.MALFORMED_URL


_PROBLEM_TEXT: Final = {
    _UrlProblem.NO_SCHEME: "no scheme",
    _UrlProblem.BAD_SCHEME: "scheme is not http or https",
    _UrlProblem.BAD_CHARACTERS: "contains whitespace or control characters",
    _UrlProblem.UNPARSABLE: "cannot be parsed",
    _UrlProblem.NO_HOST: "no host",
    _UrlProblem.BAD_HOST: "invalid host",
    _UrlProblem.BAD_PORT: "invalid port",
}

# Already valid *and* already normalised: lower-case http(s), plain ASCII host, no port, no
# userinfo, no fragment, printable ASCII path. Nearly every feed URL; one cheap regex match.
_FAST_URL: Final = r"^https?://(?:[a-z0-9_-]+\.)*[a-z0-9_-]+(?:[/?][\x21\x22\x24-\x7e]*)?$"
_SCHEME: Final = r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):"
_PARTS: Final = (
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<userinfo>[^/?#@]*@)?"
    r"(?P<host>\[[^\]/?#@]*\]|[^/?#:@\[\]]*)(?::(?P<port>[0-9]*))?(?P<rest>[/?#].*)?$"
)
# Labels of letters, digits, marks, "_" or "-" (IDN hosts stay Unicode), or a bracketed IPv6.
_HOST: Final = r"^(?:[\p{L}\p{M}\p{N}_-]+\.)*[\p{L}\p{M}\p{N}_-]+\.?$|^\[[0-9a-f:.]+\]$"
_BAD_CHARACTERS: Final = r"[\p{Z}\p{Cc}\p{Cf}]"  # spaces, controls, zero-width/format chars


@dataclass
class _UrlCheck:
    normalized: pa.Array  # meaningful where problems == OK
    problems: np.ndarray  # uint8 _UrlProblem per URL


def _check_urls(urls: pa.Array, max_length: int) -> _UrlCheck:
    """Validate and normalise trimmed, non-empty URLs."""
    problems = np.zeros(len(urls), dtype=np.uint8)
    fast = _true(pc.match_substring_regex(urls, _FAST_URL))
    slow = np.flatnonzero(~fast)
    normalized = urls
    if len(slow):
        slow_normalized, problems[slow] = _check_slow_urls(urls.take(pa.array(slow)))
        normalized = pc.replace_with_mask(urls, pa.array(~fast), slow_normalized)
    lengths = np.asarray(pc.fill_null(pc.utf8_length(normalized), 0))
    problems[(problems == _UrlProblem.OK) & (lengths > max_length)] = _UrlProblem.TOO_LONG
    return _UrlCheck(normalized, problems)


def _check_slow_urls(urls: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Everything the fast pattern did not vouch for: full parse, checks, normalisation."""
    relative = _true(pc.starts_with(urls, "//"))
    urls = pc.if_else(pa.array(relative), pc.binary_join_element_wise("https:", urls, ""), urls)
    scheme_match = pc.extract_regex(urls, _SCHEME)
    scheme = pc.utf8_lower(pc.struct_field(scheme_match, "scheme"))
    parts = pc.extract_regex(urls, _PARTS)
    parsed = np.asarray(parts.is_valid())
    host = pc.utf8_lower(pc.struct_field(parts, "host"))
    port = pc.fill_null(pc.struct_field(parts, "port"), "")
    # The pattern admits digits only; more than 5 of them is out of range whatever they say.
    port_text = pc.if_else(pc.greater(pc.utf8_length(port), 5), "999999", port)
    port_text = pc.if_else(pc.equal(port_text, ""), "0", port_text)
    port_numbers = np.asarray(pc.cast(port_text, pa.int64()))

    conditions = [
        (_UrlProblem.NO_SCHEME, ~np.asarray(scheme_match.is_valid())),
        (_UrlProblem.BAD_SCHEME, ~_true(pc.is_in(scheme, pa.array(["http", "https"])))),
        (_UrlProblem.BAD_CHARACTERS, _true(pc.match_substring_regex(urls, _BAD_CHARACTERS))),
        (_UrlProblem.UNPARSABLE, ~parsed),
        (_UrlProblem.NO_HOST, _true(pc.equal(host, ""))),
        (_UrlProblem.BAD_HOST, ~_true(pc.match_substring_regex(host, _HOST))),
        (_UrlProblem.BAD_PORT, port_numbers > 65535),
    ]
    problems = np.select(
        [mask for _, mask in conditions], [int(p) for p, _ in conditions], _UrlProblem.OK
    ).astype(np.uint8)

    default_port = _true(
        pc.or_(
            pc.equal(port, ""),
            pc.or_(
                pc.and_(pc.equal(scheme, "http"), pc.equal(port, "80")),
                pc.and_(pc.equal(scheme, "https"), pc.equal(port, "443")),
            ),
        )
    )
    port_part = pc.if_else(pa.array(default_port), "", pc.binary_join_element_wise(":", port, ""))
    rest = pc.replace_substring_regex(pc.struct_field(parts, "rest"), r"#.*", "")
    normalized = pc.binary_join_element_wise(
        scheme, "://", pc.struct_field(parts, "userinfo"), host, port_part, rest, ""
    )
    return normalized, problems


def _true(mask: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, null counting as False."""
    return np.asarray(pc.fill_null(mask, False), dtype=bool)


def _url_detail(problem: _UrlProblem, url: str, max_length: int) -> str:
    if problem is _UrlProblem.TOO_LONG:
        return f"{len(url)} characters, limit {max_length}: {url[:200]}…"
    return f"{_PROBLEM_TEXT[problem]}: {url[:200]}"


# --------------------------------------------------------------------------------------------
# Prices
# --------------------------------------------------------------------------------------------

_PLAIN_NUMBER: Final = r"^\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_CURRENCY: Final = r"^(?:[A-Za-z]{3}|\p{Sc})\s*|\s*(?:[A-Za-z]{3}|\p{Sc})$"
_THOUSANDS_COMMA: Final = r"^[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?$"  # 1,299.00
_DECIMAL_COMMA: Final = r"^[0-9]{1,3}(?:\.[0-9]{3})+(?:,[0-9]+)?$|^[0-9]+,[0-9]+$"  # 1.299,00


def _parse_prices(col: pa.Array) -> np.ndarray:
    """float64 per row; NaN where empty or not a finite number >= 0."""
    plain = _true(pc.match_substring_regex(col, _PLAIN_NUMBER))
    prices = _to_float(col, plain)
    odd = np.flatnonzero(~plain & ~_empty_mask(col))
    if len(odd):
        # "19.99 USD", "$1,299.00", "12,50 €": strip the currency, settle the separators.
        text = pc.replace_substring_regex(col.take(pa.array(odd)), _CURRENCY, "")
        thousands = pc.fill_null(pc.match_substring_regex(text, _THOUSANDS_COMMA), False)
        decimal = pc.fill_null(pc.match_substring_regex(text, _DECIMAL_COMMA), False)
        text = pc.if_else(thousands, pc.replace_substring(text, ",", ""), text)
        european = pc.replace_substring(pc.replace_substring(text, ".", ""), ",", ".")
        text = pc.if_else(decimal, european, text)
        prices[odd] = _to_float(text, _true(pc.match_substring_regex(text, _PLAIN_NUMBER)))
    prices[~np.isfinite(prices)] = np.nan
    return prices


def _to_float(col: pa.Array, valid: np.ndarray) -> np.ndarray:
    text = pc.if_else(pa.array(valid), col, _NULL_TEXT)
    values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.float64)  # a writable copy; nulls arrive as NaN


# --------------------------------------------------------------------------------------------
# De-duplication
# --------------------------------------------------------------------------------------------


def _pair_hashes(ids: pa.Array, urls: pa.Array) -> np.ndarray:
    """64-bit hash of each (product id, URL) pair.

    Python's own str hash: SipHash-1-3 with a per-process random key, so well spread, not
    steerable by a hostile feed, and stable for the life of the process — all in-feed
    de-duplication needs. Several times faster than hashlib or pandas' hash_array here."""
    keys = pc.binary_join_element_wise(ids, urls, "\x00").to_numpy(zero_copy_only=False)
    return np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))


class _SeenHashes:
    """A set of int64 hashes in sorted numpy runs: 8 bytes an entry (1M pairs: 8 MB; a Python
    set of ints would take ~70 MB). Runs are merged like a binary counter, so there are
    O(log n) of them and each entry is copied O(log n) times in all."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self._runs)

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Remember ``hashes``; True for each that is new (its first time, in file order)."""
        fresh = ~pd.Series(hashes).duplicated().to_numpy()
        order = np.argsort(hashes)  # sorted needles make searchsorted cache-friendly
        needles = hashes[order]
        for run in self._runs:
            slots = np.minimum(np.searchsorted(run, needles), len(run) - 1)
            fresh[order[run[slots] == needles]] = False
        if fresh.any():
            self._push(np.sort(hashes[fresh]))
        return fresh

    def _push(self, run: np.ndarray) -> None:
        self._runs.append(run)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            last, before = self._runs.pop(), self._runs.pop()
            self._runs.append(np.sort(np.concatenate([before, last])))


# --------------------------------------------------------------------------------------------
# Row estimates
# --------------------------------------------------------------------------------------------


def _estimate_text_rows(path: Path, *, has_header: bool) -> int | None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        sample = handle.read(_PREFIX_BYTES)
    lines = sample.count(b"\n") + (not sample.endswith(b"\n") and bool(sample))
    if not lines:
        return None
    if len(sample) < size:
        lines = round(size * lines / len(sample))
    return max(lines - has_header, 0)


def _estimate_xlsx_rows(path: Path) -> int | None:
    with path.open("rb") as handle:
        book = openpyxl.load_workbook(handle, read_only=True, data_only=True)
        try:
            sheet = book.active or book.worksheets[0]
            return None if sheet.max_row is None else max(sheet.max_row - 1, 0)
        finally:
            book.close()


_OPENERS: Final[dict[str, Callable[[Path, str | None, int], _Source]]] = {
    "csv": lambda path, compression, rows: _open_delimited(path, compression, rows, ","),
    "tsv": lambda path, compression, rows: _open_delimited(path, compression, rows, "\t"),
    "jsonl": _open_jsonl,
    "parquet": _open_parquet,
    "xlsx": _open_xlsx,
}
