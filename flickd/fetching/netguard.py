"""SSRF guard: catalog URLs come from third parties and must never reach internal services.

Two layers, because either alone is bypassable:

1. ``check_url`` refuses a URL before any connection when its host resolves to a non-public
   address. This also runs on every redirect hop, so a public URL cannot bounce us inward.
2. ``GuardedPoolManager`` re-checks the address the socket *actually* connected to. Between our
   resolution and urllib3's own, DNS can change its answer (rebinding); the peer address
   cannot lie.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from flickd.core.reasons import FailureReason, ImageFailure
from flickd.core.settings import Settings
from flickd.fetching.urls import UnfetchableURL, fetchable_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = frozenset({"http", "https"})

# NAT64 well-known prefix (RFC 6052): the low 32 bits are the IPv4 address actually reached.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class BlockedAddressError(ImageFailure):
    """A connection reached a refused address. An ImageFailure, so fetch passes it through."""

    def __init__(self, host: str, ip: str) -> None:
        where = ip if host == ip else f"{host} -> {ip}"
        super().__init__(FailureReason.BLOCKED_ADDRESS, f"{where} is not a public address")
        self.host = host
        self.ip = ip


def _unwrap(ip: IPAddress) -> list[IPAddress]:
    """The addresses that decide where traffic to ``ip`` really goes.

    Tunnelling/translation formats embed an IPv4 address; judging only the IPv6 form would let
    ``::ffff:127.0.0.1`` or ``2002:7f00:1::`` through.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is plain IPv4 on a dual-stack socket
        return [ip.ipv4_mapped]
    if ip in _NAT64:  # ipaddress calls the prefix "reserved"; the IPv4 part is what matters
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    embedded: list[IPAddress] = [ip]
    if ip.sixtofour is not None:
        embedded.append(ip.sixtofour)
    if ip.teredo is not None:
        embedded.append(ip.teredo[1])  # (server, client); the client is the reachable host
    return embedded


def _not_public(ip: IPAddress) -> bool:
    # is_global is the base; the rest covers ranges it still calls global (multicast,
    # deprecated site-local, reserved IPv4-compatible ::a.b.c.d) across Python patch versions.
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return True
    if ip.is_loopback or ip.is_link_local or ip.is_private:
        return True
    return isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local


def _in_any(ip: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    # ``in`` across IP versions is simply False, so mixed lists are fine.
    return any(ip in net for net in networks)


def is_blocked(ip: IPAddress | str, allowed_networks: Sequence[IPNetwork] = ()) -> bool:
    """True when connecting to ``ip`` must be refused.

    Anything that is not a public unicast address is refused unless it lies in one of
    ``allowed_networks`` (e.g. a catalog CDN on a private range, or loopback in tests).
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
    if _in_any(addr, allowed_networks):
        return False
    return any(_not_public(a) and not _in_any(a, allowed_networks) for a in _unwrap(addr))


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to. A module function so tests can substitute it.

    getaddrinfo also normalises numeric oddities (``2130706433``, ``0x7f.1``, ``0177.0.0.1``)
    the same way the connecting socket will.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # sockaddr[0] may carry an IPv6 scope ("fe80::1%eth0"); the scope is not part of the address.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _invalid(url: str, why: str) -> ImageFailure:
    return ImageFailure(FailureReason.INVALID_URL, f"{why}: {url[:200]}")


def _parse(url: str, encoded: bool = False) -> tuple[str, int]:
    """(host, port) exactly as the fetch connects, or INVALID_URL.

    The URL is first encoded as fetch requests it (``fetchable_url``: percent-encoding, IDNA;
    skipped when the caller says it already is) and then split by urllib3's own parser, the
    one the connection pool uses: a parser differential here would be an SSRF bypass."""
    try:
        original = parse_url(url)
    except (LocationParseError, ValueError) as exc:
        raise _invalid(url, f"malformed URL ({exc})") from None
    scheme = (original.scheme or "").lower()
    if scheme not in ALLOWED_SCHEMES:
        raise _invalid(url, f"scheme {scheme or 'missing'!r} not allowed")
    if original.port == 0:  # an HTTP client would silently use the default port
        raise _invalid(url, "bad port 0")
    if encoded:
        parsed = original
    else:
        try:
            parsed = parse_url(fetchable_url(url))
        except (UnfetchableURL, LocationParseError, ValueError, UnicodeError) as exc:
            raise _invalid(url, f"malformed URL ({exc})") from None
    host = (parsed.host or "").strip("[]")
    if not host:
        raise _invalid(url, "no host")
    port = parsed.port if parsed.port is not None else (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise _invalid(url, f"bad port {port}")
    return host, port


# The pre-connect check's answers, kept a short while: a catalog batch asks about the same few
# hosts thousands of times, and getaddrinfo per image was a tenth of a download worker's CPU.
# A stale answer cannot let a connection through: the peer check below runs on every new
# connection, whatever this cache said. Failures are never cached.
RESOLVE_TTL = 60.0
RESOLVE_CACHE_SIZE = 4096
_resolved: OrderedDict[tuple[object, str, int], tuple[float, list[IPAddress]]] = OrderedDict()
_resolved_lock = threading.Lock()


def _resolve_cached(host: str, port: int) -> list[IPAddress]:
    key = (resolve, host, port)  # a substituted resolver (tests) never sees older answers
    now = time.monotonic()
    with _resolved_lock:
        hit = _resolved.get(key)
        if hit is not None and now - hit[0] < RESOLVE_TTL:
            _resolved.move_to_end(key)
            return hit[1]
    addresses = resolve(host, port)
    with _resolved_lock:
        _resolved[key] = (now, addresses)
        _resolved.move_to_end(key)
        while len(_resolved) > RESOLVE_CACHE_SIZE:
            _resolved.popitem(last=False)
    return addresses


def check_url(url: str, settings: Settings, *, encoded: bool = False) -> list[IPAddress]:
    """Refuse ``url`` unless it is http(s) and every address its host resolves to is public.

    Returns the resolved addresses. Raises ImageFailure with INVALID_URL, BLOCKED_ADDRESS or
    CONNECTION_ERROR (name resolution failed). *Any* bad address refuses the URL: the
    connection may pick any of them. ``encoded``: the URL is already ``fetchable_url``'s form.
    """
    host, port = _parse(url, encoded)
    try:
        addresses = _resolve_cached(host, port)
    except socket.gaierror as exc:
        # "No such name" will not fix itself; a resolver hiccup (EAI_AGAIN) might.
        permanent = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None))
        raise ImageFailure(
            FailureReason.CONNECTION_ERROR,
            f"cannot resolve {host}: {exc.strerror or exc}",
            retryable=not permanent,
        ) from None
    except (UnicodeError, ValueError) as exc:
        raise _invalid(url, f"bad host ({exc})") from None
    if not addresses:
        raise ImageFailure(FailureReason.CONNECTION_ERROR, f"{host} has no addresses")
    allowed = settings.allowed_ip_networks
    for addr in addresses:
        if is_blocked(addr, allowed):
            raise BlockedAddressError(host, str(addr))
    return addresses


# --- post-connect check ----------------------------------------------------------------------


class _PeerCheckMixin:
    """Checks the connected peer. ``allowed_networks`` is set per adapter (see the factory)."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    host: str

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]  # mixed into urllib3's HTTP(S)Connection, which has _new_conn
        try:
            peer = str(sock.getpeername()[0])
        except OSError:
            sock.close()
            raise
        if is_blocked(peer, self.allowed_networks):
            # Close before a single byte of the request is sent.
            sock.close()
            raise BlockedAddressError(self.host, peer)
        return sock


class GuardedHTTPConnection(_PeerCheckMixin, HTTPConnection):
    pass


class GuardedHTTPSConnection(_PeerCheckMixin, HTTPSConnection):
    # TLS is wrapped around the socket _new_conn returns, so the check runs before the handshake.
    pass


def _guarded_pool_classes(
    allowed: tuple[IPNetwork, ...],
) -> dict[str, type[HTTPConnectionPool]]:
    """Pool classes bound to ``allowed``.

    The allow-list rides on the classes rather than in the pool kwargs because PoolManager
    builds its pool keys from a fixed namedtuple and rejects unknown kwargs.
    """
    http_conn = type(
        "GuardedHTTPConnection", (GuardedHTTPConnection,), {"allowed_networks": allowed}
    )
    https_conn = type(
        "GuardedHTTPSConnection", (GuardedHTTPSConnection,), {"allowed_networks": allowed}
    )
    http_pool = type(
        "GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}
    )
    https_pool = type(
        "GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}
    )
    return {"http": http_pool, "https": https_pool}


class GuardedPoolManager(PoolManager):
    """A urllib3 PoolManager whose every new connection refuses non-public peers.

    It never goes through a proxy (the peer would be the proxy, and the post-connect check
    void): unlike requests, urllib3 does not read proxies from the environment.
    """

    def __init__(self, allowed_networks: Sequence[IPNetwork] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allowed_networks: tuple[IPNetwork, ...] = tuple(allowed_networks)
        # A fresh dict: PoolManager's default is the module-level one, shared process-wide.
        self.pool_classes_by_scheme = _guarded_pool_classes(self.allowed_networks)
