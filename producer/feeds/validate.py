"""Validation: one raw chunk in, one :class:`FeedChunk` out.

Per chunk: trim every value, skip blank rows, split URL cells, reject rows without an id or a
URL and URLs that fail the checks, normalise the rest, drop (product, URL) pairs seen earlier
in the feed, and build the images frame. Works on whole Arrow columns rather than row by
row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from producer.feeds.arrays import NULL_TEXT, empty_mask, is_list
from producer.feeds.columns import FeedColumns, Roles, resolve_roles
from producer.feeds.dedupe import SeenHashes, pair_hashes
from producer.feeds.encoding import python_text
from producer.feeds.errors import RejectedRow, RejectReason
from producer.feeds.prices import parse_prices
from producer.feeds.raw import RawChunk
from producer.feeds.stock import read_stock
from producer.feeds.urls import UrlCheck, UrlProblem, check_urls, url_detail

IMAGE_COLUMNS: Final = (
    "row_number",
    "product_id",
    "url",
    "title",
    "brand",
    "category",
    "price",
    "currency",
    "in_stock",
    "delist",
    "extra",
)


@dataclass
class FeedChunk:
    """What one slice of the feed produced.

    ``images`` has one row per accepted, first-seen (product, URL) pair, in file order:
    ``row_number`` (int64: 1-based data row, header excluded; the line number for JSON Lines),
    ``product_id`` and ``url`` (pandas ``str``; ``url`` normalised as :mod:`producer.feeds.urls`
    says), ``title``/``brand``/``category`` (object: str or None), ``price`` (float64, NaN when
    absent or not a number >= 0), ``currency`` (object: ISO 4217 code or None: the price
    text's own, else the ``currency`` column's), ``in_stock`` (object: True, False or None) and
    ``delist`` (bool: the row asks for its product to be delisted; see
    :mod:`producer.feeds.stock`) and ``extra`` (object: dict of the other non-empty columns, or
    None; the images of one row share one dict).

    ``notes`` are rows that were accepted with a value left out (an unreadable price, an
    unknown availability), one per row and reason.
    """

    images: pd.DataFrame
    rejected: list[RejectedRow]
    notes: list[RejectedRow]
    rows_read: int  # source rows in this slice: blank, rejected and accepted alike
    duplicates: int  # (product, URL) pairs dropped because an earlier row had them
    blank: int  # rows whose fields were all empty: skipped, not rejected


class ChunkProcessor:
    def __init__(self, spec: FeedColumns, max_url_length: int, roles: Roles | None) -> None:
        self._spec = spec
        self._max_url_length = max_url_length
        self._roles = roles  # fixed for formats with a header
        self._roles_by_names: dict[tuple[str, ...], Roles] = {}
        self._checked_columns = roles is not None
        self._seen = SeenHashes()

    def _roles_for(self, names: list[str]) -> Roles:
        if self._roles is not None:
            return self._roles
        key = tuple(names)
        if key not in self._roles_by_names:
            # JSON Lines: keys may differ between chunks. The first chunk with records must
            # have id and URL keys (a wrong column mapping, not bad rows); later ones may not.
            strict = not self._checked_columns and bool(names)
            self._roles_by_names[key] = resolve_roles(names, self._spec, strict=strict)
            self._checked_columns = self._checked_columns or bool(names)
        return self._roles_by_names[key]

    def process(self, raw: RawChunk) -> FeedChunk:
        roles = self._roles_for(raw.names)
        n = len(raw.row_numbers)
        columns = [_trim(col) for col in raw.columns]
        blank = _all_empty(columns, n)
        kept = np.flatnonzero(~blank)  # raw positions of the rows that have any value
        rows = _Rows(raw, roles, [col.take(kept) for col in columns], kept)

        rejected = list(raw.malformed)
        ids = rows.text_column(roles.id)
        missing_id = empty_mask(ids)
        urls, parent = _explode_urls(rows.column(roles.url), self._spec.url_separator)
        has_url = np.bincount(parent, minlength=len(kept)) > 0
        missing_url = ~missing_id & ~has_url
        rejected += rows.rejections(missing_id, RejectReason.MISSING_ID, roles.id)
        rejected += rows.rejections(missing_url, RejectReason.MISSING_URL, roles.url)

        with_id = ~missing_id[parent]
        urls, parent = urls.filter(pa.array(with_id)), parent[with_id]
        check = check_urls(urls, self._max_url_length)
        rejected += rows.url_rejections(check, urls, parent, self._max_url_length)

        ok = check.problems == UrlProblem.OK
        urls, parent = check.normalized.filter(pa.array(ok)), parent[ok]
        fresh = self._seen.add(pair_hashes(ids.take(parent), urls))
        urls, parent = urls.filter(pa.array(fresh)), parent[fresh]

        rejected.sort(key=lambda r: r.row_number)
        images, notes = rows.images(urls, parent)
        return FeedChunk(
            images=images,
            rejected=rejected,
            notes=notes,
            rows_read=raw.rows_read,
            duplicates=int(len(fresh) - fresh.sum()),
            blank=int(blank.sum()) + raw.blank_lines,
        )


class _Rows:
    """The non-blank rows of one raw chunk, trimmed, with the helpers that turn them into
    rejections and the images frame."""

    def __init__(self, raw: RawChunk, roles: Roles, columns: list[pa.Array], kept: np.ndarray):
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
        self, check: UrlCheck, urls: pa.Array, parent: np.ndarray, max_length: int
    ) -> list[RejectedRow]:
        bad = np.flatnonzero(check.problems != UrlProblem.OK)
        if not len(bad):
            return []
        texts = urls.take(pa.array(bad)).to_pylist()
        fields = self.raw_fields(parent[bad])
        out = []
        for item, text, raw_fields in zip(bad, texts, fields, strict=True):
            problem = UrlProblem(int(check.problems[item]))
            number = int(self.numbers[parent[item]])
            detail = check.details.get(int(item)) or url_detail(problem, text, max_length)
            out.append(RejectedRow(number, problem.reason, detail, raw_fields))
        return out

    def images(self, urls: pa.Array, parent: np.ndarray) -> tuple[pd.DataFrame, list[RejectedRow]]:
        take = pa.array(parent, pa.int64())
        roles = self.roles
        prices = parse_prices(self.text_column(roles.price))
        stock = read_stock(self.text_column(roles.availability), self.text_column(roles.deleted))
        currency = _currency_codes(self.text_column(roles.currency))
        own = prices.currencies
        currencies = np.where(pd.isna(own), currency, own)
        frame = pd.DataFrame(
            {
                "row_number": self.numbers[parent],
                "product_id": self.text_column(roles.id).take(take).to_pandas(),
                "url": urls.to_pandas(),
                "title": _optional_text(self.text_column(roles.title).take(take)),
                "brand": _optional_text(self.text_column(roles.brand).take(take)),
                "category": _optional_text(self.text_column(roles.category).take(take)),
                "price": prices.values[parent],
                "currency": pd.Series(currencies[parent], dtype=object),
                "in_stock": pd.Series(stock.in_stock[parent], dtype=object),
                "delist": stock.delist[parent],
                "extra": pd.Series(self._extras(parent), dtype=object),
            },
            columns=list(IMAGE_COLUMNS),
        )
        accepted = np.unique(parent)
        notes = [
            *self._notes(accepted, prices.unreadable, RejectReason.UNREADABLE_PRICE, roles.price),
            *self._notes(
                accepted,
                stock.unknown_availability,
                RejectReason.UNKNOWN_AVAILABILITY,
                roles.availability,
            ),
            *self._notes(
                accepted, stock.unknown_deleted, RejectReason.UNKNOWN_AVAILABILITY, roles.deleted
            ),
        ]
        notes.sort(key=lambda r: r.row_number)
        return frame, notes

    def _notes(
        self, accepted: np.ndarray, mask: np.ndarray, reason: RejectReason, pos: int | None
    ) -> list[RejectedRow]:
        """One note per accepted row whose value in column ``pos`` is ``mask``ed."""
        rows = accepted[mask[accepted]]
        if not len(rows) or pos is None:
            return []
        name = self.raw.names[pos]
        what = _NOTE_TEXT[reason]
        return [
            RejectedRow(int(self.numbers[r]), reason, f"{name} {fields[name]!r} {what}", fields)
            for r, fields in zip(rows, self.raw_fields(rows), strict=True)
        ]

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


_NOTE_TEXT: Final = {
    RejectReason.UNREADABLE_PRICE: "is not a price; the row was kept without a price",
    RejectReason.UNKNOWN_AVAILABILITY: "is not a known availability or deleted value; "
    "the row was kept and its product stays listed",
}


def _currency_codes(col: pa.Array) -> np.ndarray:
    """The ``currency`` column as upper-case three-letter codes (None where it is not one)."""
    code = pc.and_(pc.equal(pc.utf8_length(col), 3), pc.utf8_is_alpha(col))
    upper = pc.if_else(code, pc.utf8_upper(col), NULL_TEXT)
    return np.array(upper.to_pylist(), dtype=object)


def _trim(col: pa.Array) -> pa.Array:
    if is_list(col):
        values = pc.utf8_trim_whitespace(col.values)
        return pa.ListArray.from_arrays(col.offsets, values, mask=col.is_null())
    return pc.utf8_trim_whitespace(col)


def _all_empty(columns: list[pa.Array], n: int) -> np.ndarray:
    blank = np.ones(n, dtype=bool)
    for col in columns:
        blank &= empty_mask(col)
    return blank


def _list_as_json(col: pa.Array) -> pa.Array:
    texts = [None if v is None else json.dumps(v, ensure_ascii=False) for v in col.to_pylist()]
    return pa.array(texts, pa.string())


def _fields_as_text(col: pa.Array) -> list[str | None]:
    return (col if pa.types.is_string(col.type) else _list_as_json(col)).to_pylist()


def _optional_text(col: pa.Array) -> pd.Series:
    """str or None, so records go straight into SQL drivers (pandas' NaN would not). The
    explicit object dtype stops pandas 3 from inferring its NaN-based ``str`` dtype."""
    col = pc.if_else(pc.equal(col, ""), NULL_TEXT, col)
    return pd.Series(col.to_numpy(zero_copy_only=False), dtype=object)


def _explode_urls(col: pa.Array, separator: str | None) -> tuple[pa.Array, np.ndarray]:
    """One entry per non-empty URL: (trimmed URLs, index of the row each came from)."""
    lists = col if is_list(col) else _split_urls(col, separator)
    urls = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    parent = np.asarray(pc.list_parent_indices(lists), dtype=np.int64)
    present = ~empty_mask(urls)
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
            return [python_text(v) or "" for v in parsed]
    return value.split(separator) if separator else [value]
