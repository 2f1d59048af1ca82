"""How a feed fails: as a whole (:class:`FeedError`, raised) or row by row (:class:`RejectedRow`
with a :class:`RejectReason`, reported in the chunk, never raised).

Every other module of the package reports through these, so this one imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FeedError(Exception):
    """The feed as a whole cannot be read: missing, empty, unknown format, corrupt, or without
    a product-id or image-URL column. Bad *rows* are never raised; they are rejected."""


class RejectReason(StrEnum):
    MISSING_ID = "missing_id"
    MISSING_URL = "missing_url"
    MALFORMED_URL = "malformed_url"  # no scheme/host, control chars, bad host, unparsable
    UNSUPPORTED_SCHEME = "unsupported_scheme"  # anything but http/https
    URL_TOO_LONG = "url_too_long"
    MALFORMED_ROW = "malformed_row"  # more fields than the header, or a line that is not JSON
    # Notes on rows that were accepted all the same (FeedChunk.notes):
    UNREADABLE_PRICE = "unreadable_price"  # a price text that is not a price: kept without one
    UNKNOWN_AVAILABILITY = "unknown_availability"  # an availability/deleted value not known


@dataclass(frozen=True)
class RejectedRow:
    """A source row (or one URL of it) that was not accepted, or (a note) a row that was
    accepted with one of its values left out.

    A row with several URLs can be rejected once per bad URL; ``raw`` holds the row's fields
    as read (header name -> text)."""

    row_number: int
    reason: RejectReason
    detail: str
    raw: dict[str, str]
