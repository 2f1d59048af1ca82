"""The URL a downloader actually requests: :func:`fetchable_url`.

Catalog exports are full of URLs as people type them: raw spaces, accents, emoji, IDN hosts
(``http://cdn.example/c/robe rouge été 👗.jpg``, ``https://bücher.example/ä.jpg``). Browsers
and HTTP clients do not refuse these; they encode them, as the WHATWG URL standard says, and so
does this module, with yarl (path, query and userinfo) and idna (host):

* spaces and non-ASCII characters in the path, query and userinfo are percent-encoded as UTF-8
  (a space is ``%20`` everywhere, the query included);
* a valid ``%XX`` escape is kept as it is, never encoded twice (``%20`` stays ``%20``, ``%25``
  stays ``%25``); its hex digits are upper-cased, an escape of an unreserved character is
  decoded (``%7E`` → ``~``, as requests sends it too) and a lone ``%`` becomes ``%25``, so
  mixed spellings of one URL come out the same;
* an IDN host is IDNA-encoded (UTS #46, non-transitional: ``bücher`` → ``xn--bcher-kva``),
  exactly as requests encodes it, so the SSRF guard checks the host that is connected to; an
  ASCII host is lower-cased;
* ``.`` and ``..`` path segments are resolved and the ``#fragment`` is dropped (neither is
  part of the request).

A URL that is already in this form comes back unchanged. One that cannot be encoded raises
:class:`UnfetchableURL`, with a :class:`UrlFault` saying which part is wrong.

Pure: no network, no database. The feed validation (``producer/feeds/urls.py``) uses it to
decide which URLs to accept; the fetch path (``fetch.fetch``) to know what to request.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from enum import StrEnum
from typing import Final

import idna
from yarl import URL

FETCHABLE_SCHEMES: Final = frozenset({"http", "https"})

# Characters no encoding makes right: controls (tab and newline included), format characters
# (zero-width spaces, bidi overrides: invisible, and a spoofing tool) and line/paragraph
# separators. Plain and other Unicode spaces (Zs) are encoded instead, outside the host.
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})
# What WHATWG strips from both ends before parsing: C0 controls and space.
_STRIPPED: Final = "".join(chr(c) for c in range(0x21))


class UrlFault(StrEnum):
    """Which part of a URL keeps it from being fetched."""

    CHARACTERS = "characters"  # control or invisible characters
    SYNTAX = "syntax"  # the URL does not parse
    SCHEME = "scheme"  # not http or https
    HOST = "host"  # missing, or not a valid (IDNA) host name or IP literal


class UnfetchableURL(ValueError):
    """Raised by :func:`fetchable_url`: ``fault`` names the part, ``detail`` says why."""

    def __init__(self, fault: UrlFault, detail: str, url: str) -> None:
        super().__init__(f"{detail}: {url[:200]}")
        self.fault = fault
        self.detail = detail
        self.url = url


def fetchable_url(url: str) -> str:
    """``url`` as a browser would request it (see the module doc), or :class:`UnfetchableURL`."""
    text = url.strip(_STRIPPED)
    for position, char in enumerate(text):
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise UnfetchableURL(
                UrlFault.CHARACTERS,
                f"control or invisible character U+{ord(char):04X} at position {position}",
                url,
            )
    try:
        split = URL(text, encoded=True)  # split into parts only, nothing encoded yet
        scheme, raw_host = split.scheme.lower(), split.raw_host  # the authority splits lazily
    except ValueError as exc:  # brackets, ports, backslashes in the authority
        raise UnfetchableURL(UrlFault.SYNTAX, f"cannot be parsed ({exc})", url) from None
    if scheme not in FETCHABLE_SCHEMES:
        what = f"scheme {scheme!r} is not" if scheme else "no scheme: must be"
        raise UnfetchableURL(UrlFault.SCHEME, f"{what} http or https", url)
    if not raw_host:
        raise UnfetchableURL(UrlFault.HOST, "no host", url)
    host = _ascii_host(raw_host, url)
    # yarl's query encoder writes a space as "+" (HTML-form style); browsers send "%20", and
    # to a server that reads its query literally (signed CDN URLs) "+" is another character.
    # "%20" is a valid escape, so yarl keeps it. (Spaces in the host were refused above.)
    text = text.replace(" ", "%20")
    try:
        encoded = URL(text).with_host(host).with_fragment(None)
    except (ValueError, TypeError) as exc:
        raise UnfetchableURL(UrlFault.SYNTAX, f"cannot be encoded ({exc})", url) from None
    return str(encoded)


def _ascii_host(raw: str, url: str) -> str:
    """The host as it goes on the wire: IP literals as they are, IDN hosts IDNA-encoded the
    way requests does it (``idna.encode(host, uts46=True)``), ASCII names lower-cased; then
    checked for empty labels and, by yarl, for characters a host name cannot hold."""
    try:
        ipaddress.ip_address(raw.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return raw
    if raw.isascii():
        name = raw.lower()
    else:
        try:
            name = idna.encode(raw, uts46=True).decode("ascii")
        except UnicodeError as exc:  # idna.IDNAError and its InvalidCodepoint
            raise UnfetchableURL(UrlFault.HOST, f"invalid host ({exc})", url) from None
    if "" in name.removesuffix(".").split("."):
        raise UnfetchableURL(UrlFault.HOST, "invalid host (empty label)", url)
    try:
        URL.build(scheme="http", host=name)  # yarl's host syntax check: spaces, "<", "|", …
    except ValueError as exc:
        raise UnfetchableURL(UrlFault.HOST, f"invalid host ({exc})", url) from None
    return name
