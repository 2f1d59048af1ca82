"""Streaming catalog-feed reader: file formats, column mapping, row validation, de-duplication.

``read_feed`` turns a retailer's feed file into a stream of :class:`FeedChunk` objects, each
built from at most about ``chunk_rows`` source rows, so a multi-million-row feed never sits in
memory. It touches no database: the caller records the chunks and enqueues work.

Formats (picked from the file suffix, or ``fmt``): CSV (``.csv``, ``.txt``), TSV (``.tsv``,
``.tab``), JSON Lines (``.jsonl``, ``.ndjson``), Parquet (``.parquet``, ``.pq``) and XLSX
(``.xlsx``, ``.xlsm``). Delimited text and JSON Lines may also be compressed (``.gz``,
``.bz2``, ``.zst``). Every value is read as text. URLs are normalised as
:mod:`producer.feeds.urls` describes; only http and https URLs with a host are accepted.

Rows a retailer got wrong are *rejected* (reported with a :class:`RejectReason`, never raised);
only a feed that cannot be read at all raises :class:`FeedError`.

Shape (read → validate → hand over), each module importing only from those listed before it:

* ``errors`` — FeedError, RejectReason, RejectedRow;
* ``encoding`` — compressed input streams, UTF-8 with a cp1252 fallback, values as text;
  ``arrays`` — Arrow mask helpers;
* ``raw`` — RawChunk, what every format reader yields;
* ``columns`` (column roles), ``urls`` (URL checks, normalize_url, url_hash), ``prices``,
  ``dedupe`` — the validation rules, each on whole Arrow columns;
* ``delimited`` (CSV/TSV), ``jsonl``, ``parquet``, ``xlsx`` — the format readers;
  ``formats`` — format and compression from a path;
* ``validate`` — one RawChunk to one FeedChunk;
* ``reader`` — read_feed, detect_format, estimate_rows: a reader, then validation.
"""

from __future__ import annotations

from producer.feeds.columns import FeedColumns
from producer.feeds.errors import FeedError, RejectedRow, RejectReason
from producer.feeds.formats import FORMATS
from producer.feeds.reader import detect_format, estimate_rows, read_feed
from producer.feeds.urls import InvalidURL, normalize_url, url_hash
from producer.feeds.validate import IMAGE_COLUMNS, FeedChunk

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
