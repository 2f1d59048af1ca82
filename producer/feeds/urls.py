"""URL checks and normalisation (vectorised), and the stable URL key.

URL normalisation — what ``FeedChunk.images.url`` holds and what de-duplication compares:

* surrounding whitespace is trimmed;
* scheme and host are lower-cased (both are case-insensitive; path and query are not, and are
  kept byte-for-byte: no percent-encoding changes, no query sorting, no trailing-slash games);
* a protocol-relative ``//host/…`` becomes ``https://host/…``;
* a default port (``:80`` for http, ``:443`` for https) and the ``#fragment`` are dropped:
  neither changes the request a downloader sends.

This form is what is stored (``images.url``, shown to people) and hashed (``url_hash``, the
key that makes a second ingest of the same feed a no-op). It is *not* what is requested: raw
spaces and non-ASCII characters stay as the feed wrote them (``/robe rouge été.jpg``,
``https://bücher.de/``), and the download encodes them as a browser would, with
:func:`flickd.fetching.urls.fetchable_url`.

Only http and https URLs with a host are accepted, and only those ``fetchable_url`` can encode:
control and invisible characters anywhere, whitespace in the host, and a host that is not
valid IDNA are rejected. A space or any other character the path or query may hold once
percent-encoded is accepted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flickd.fetching.urls import UnfetchableURL, UrlFault, fetchable_url
from producer.feeds.arrays import true_mask
from producer.feeds.errors import RejectReason


class InvalidURL(ValueError):
    """Raised by :func:`normalize_url`; ``reason`` is the :class:`RejectReason`."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def normalize_url(url: str, *, max_length: int = 2048) -> str:
    """The normalised form of one URL (see the module doc), or :class:`InvalidURL`.

    Same rules as :func:`read_feed` (it runs the same vectorised code), so use it for URLs that
    come from anywhere else before comparing them with, or hashing them like, feed URLs."""
    text = url.strip()
    if not text:
        raise InvalidURL(RejectReason.MISSING_URL, "empty URL")
    check = check_urls(pa.array([text], pa.string()), max_length)
    problem = UrlProblem(int(check.problems[0]))
    if problem is not UrlProblem.OK:
        detail = check.details.get(0) or url_detail(problem, text, max_length)
        raise InvalidURL(problem.reason, detail)
    return str(check.normalized[0].as_py())


def url_hash(url: str) -> str:
    """Stable key for an already-normalised URL: 32 hex chars (BLAKE2b, 128 bits).

    128 bits because it is a database key: at 64 bits a few billion URLs would risk a silent
    collision, and a hex string fits any SQL text column (unsigned 64-bit ints do not fit a
    signed BIGINT). Hashes exactly the text given: pass ``url`` as read_feed emits it, or the
    result of :func:`normalize_url`. (De-duplication inside a feed uses a separate, faster,
    per-process 64-bit hash, in :mod:`producer.feeds.dedupe`; nothing outside this package
    should rely on that one.)"""
    return hashlib.blake2b(url.encode("utf-8"), digest_size=16).hexdigest()


class UrlProblem(IntEnum):
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
        if self is UrlProblem.BAD_SCHEME:
            return RejectReason.UNSUPPORTED_SCHEME
        if self is UrlProblem.TOO_LONG:
            return RejectReason.URL_TOO_LONG
        return RejectReason.MALFORMED_URL


_PROBLEM_TEXT: Final = {
    UrlProblem.NO_SCHEME: "no scheme",
    UrlProblem.BAD_SCHEME: "scheme is not http or https",
    UrlProblem.BAD_CHARACTERS: "contains whitespace or control characters",
    UrlProblem.UNPARSABLE: "cannot be parsed",
    UrlProblem.NO_HOST: "no host",
    UrlProblem.BAD_HOST: "invalid host",
    UrlProblem.BAD_PORT: "invalid port",
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
# Anywhere: controls, zero-width/format chars, line and paragraph separators. In the host, any
# whitespace too; in the path and query a space is encoded when the image is fetched.
_BAD_CHARACTERS: Final = r"[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]"
_BAD_HOST_CHARACTERS: Final = r"\p{Z}"
# How fetchable_url's refusals are reported.
_FAULT_PROBLEMS: Final = {
    UrlFault.CHARACTERS: UrlProblem.BAD_CHARACTERS,
    UrlFault.SYNTAX: UrlProblem.UNPARSABLE,
    UrlFault.SCHEME: UrlProblem.BAD_SCHEME,
    UrlFault.HOST: UrlProblem.BAD_HOST,
}


@dataclass
class UrlCheck:
    normalized: pa.Array  # meaningful where problems == OK
    problems: np.ndarray  # uint8 UrlProblem per URL
    # Position -> why, for URLs fetchable_url refused (its words beat the generic ones).
    details: dict[int, str] = field(default_factory=dict)


def check_urls(urls: pa.Array, max_length: int) -> UrlCheck:
    """Validate and normalise trimmed, non-empty URLs."""
    problems = np.zeros(len(urls), dtype=np.uint8)
    fast = true_mask(pc.match_substring_regex(urls, _FAST_URL))
    slow = np.flatnonzero(~fast)
    normalized = urls
    details: dict[int, str] = {}
    if len(slow):
        slow_normalized, slow_problems = _check_slow_urls(urls.take(pa.array(slow)))
        slow_details = _check_fetchable(slow_normalized, slow_problems)
        problems[slow] = slow_problems
        details = {int(slow[i]): detail for i, detail in slow_details.items()}
        normalized = pc.replace_with_mask(urls, pa.array(~fast), slow_normalized)
    lengths = np.asarray(pc.fill_null(pc.utf8_length(normalized), 0))
    problems[(problems == UrlProblem.OK) & (lengths > max_length)] = UrlProblem.TOO_LONG
    return UrlCheck(normalized, problems, details)


def _check_fetchable(normalized: pa.Array, problems: np.ndarray) -> dict[int, str]:
    """Ask :func:`fetchable_url` about every URL the checks passed; mark in ``problems`` the
    ones it cannot encode and return why, by position. Only URLs off the fast path come here
    (the fast pattern admits nothing fetchable_url would refuse: printable ASCII, plain
    host), and among those only the few with spaces, non-ASCII text or other oddities."""
    details: dict[int, str] = {}
    for i in np.flatnonzero(problems == UrlProblem.OK):
        try:
            fetchable_url(normalized[int(i)].as_py())
        except UnfetchableURL as exc:
            problems[i] = _FAULT_PROBLEMS[exc.fault]
            details[int(i)] = str(exc)
    return details


def _check_slow_urls(urls: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Everything the fast pattern did not vouch for: full parse, checks, normalisation."""
    relative = true_mask(pc.starts_with(urls, "//"))
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
        (UrlProblem.NO_SCHEME, ~np.asarray(scheme_match.is_valid())),
        (UrlProblem.BAD_SCHEME, ~true_mask(pc.is_in(scheme, pa.array(["http", "https"])))),
        (
            UrlProblem.BAD_CHARACTERS,
            true_mask(pc.match_substring_regex(urls, _BAD_CHARACTERS))
            | true_mask(pc.match_substring_regex(host, _BAD_HOST_CHARACTERS)),
        ),
        (UrlProblem.UNPARSABLE, ~parsed),
        (UrlProblem.NO_HOST, true_mask(pc.equal(host, ""))),
        (UrlProblem.BAD_HOST, ~true_mask(pc.match_substring_regex(host, _HOST))),
        (UrlProblem.BAD_PORT, port_numbers > 65535),
    ]
    problems = np.select(
        [mask for _, mask in conditions], [int(p) for p, _ in conditions], UrlProblem.OK
    ).astype(np.uint8)

    default_port = true_mask(
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


def url_detail(problem: UrlProblem, url: str, max_length: int) -> str:
    if problem is UrlProblem.TOO_LONG:
        return f"{len(url)} characters, limit {max_length}: {url[:200]}…"
    return f"{_PROBLEM_TEXT[problem]}: {url[:200]}"
