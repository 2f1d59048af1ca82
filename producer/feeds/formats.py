"""Which format and compression a feed path has, and whether there is a file to read."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from producer.feeds.encoding import COMPRESSIONS
from producer.feeds.errors import FeedError

FORMATS: Final = ("csv", "tsv", "jsonl", "parquet", "xlsx")

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
# Parquet and XLSX need random access (footer, zip directory), so only text streams.
_STREAMABLE_COMPRESSED: Final = frozenset({"csv", "tsv", "jsonl"})


def format_and_compression(path: Path, fmt: str | None) -> tuple[str, str | None]:
    suffixes = [s.lstrip(".").lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
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


def check_file(path: Path) -> None:
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
