"""The SSRF guard: address classification, URL checks, and the post-connect peer check."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import pytest
import urllib3.poolmanager
from urllib3.connectionpool import HTTPConnectionPool

from flickd.core.reasons import FailureReason, ImageFailure
from flickd.fetching import netguard
from flickd.fetching.fetch import fetch, make_session
from flickd.fetching.netguard import (
    BlockedAddressError,
    GuardedPoolManager,
    check_url,
    is_blocked,
)
from synthetic.server import CatalogServer
from tests.conftest_download import make_settings

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.fixture(scope="module")
def server() -> Iterator[CatalogServer]:
    with CatalogServer(None) as srv:
        yield srv


# --- is_blocked ------------------------------------------------------------------------------

BLOCKED = [
    "127.0.0.1",
    "127.255.255.254",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "0.0.0.0",
    "100.64.0.1",  # shared address space (carrier NAT)
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "::1",
    "::",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::7f00:1",  # IPv4-compatible (deprecated) 127.0.0.1
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",  # deprecated site-local
    "ff02::1",  # multicast
    "ff0e::1",  # global-scope multicast: still not a web server
    "2001:db8::1",
    "2002:7f00:1::1",  # 6to4 wrapping 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 wrapping 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
]
PUBLIC = [
    "8.8.8.8",
    "93.184.216.34",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8: what IPv6-only hosts use to reach IPv4 CDNs
    "2002:808:808::1",  # 6to4 of a public address
]


@pytest.mark.parametrize("ip", BLOCKED)
def test_non_public_addresses_are_blocked(ip: str) -> None:
    assert is_blocked(ip, [])


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_pass(ip: str) -> None:
    assert not is_blocked(ip, [])


def test_allowed_networks_open_exactly_their_range() -> None:
    assert not is_blocked("127.0.0.1", LOOPBACK)
    assert not is_blocked(ipaddress.ip_address("127.9.9.9"), LOOPBACK)
    assert not is_blocked("::ffff:127.0.0.1", LOOPBACK)  # the mapped form is the same host
    assert is_blocked("10.0.0.1", LOOPBACK)
    assert is_blocked("169.254.169.254", LOOPBACK)
    assert is_blocked("::1", LOOPBACK)  # IPv6 loopback is not in an IPv4 network
    assert not is_blocked("10.20.0.5", [ipaddress.ip_network("10.20.0.0/16")])
    assert is_blocked("10.21.0.5", [ipaddress.ip_network("10.20.0.0/16")])


# --- check_url -------------------------------------------------------------------------------

BLOCKED_URLS = [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://LOCALHOST/x",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.0.1:8080/img.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://0.0.0.0/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[fe80::1]/",
    "http://[ff02::1]/",
    "http://224.0.0.1/",
    "http://2130706433/",  # 127.0.0.1 as one decimal number
    "http://0x7f000001/",  # ... as hex
    "http://0x7f.1/",
    "http://017700000001/",  # ... as octal
    "http://127.1/",
    "http://0/",
    "https://127.0.0.1/",
    "http://user:pass@127.0.0.1/",
    "http://127.0.0.1:1@10.0.0.1/",  # userinfo trick: the host is 10.0.0.1
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
def test_check_url_blocks_internal_hosts(url: str) -> None:
    with pytest.raises(ImageFailure) as info:
        check_url(url, make_settings(allowed_networks=[]))
    assert info.value.reason is FailureReason.BLOCKED_ADDRESS
    assert not info.value.retryable
    assert "is not a public address" in info.value.detail


def test_blocked_detail_names_host_and_address() -> None:
    with pytest.raises(ImageFailure) as info:
        check_url("http://2130706433/x", make_settings(allowed_networks=[]))
    assert "2130706433" in info.value.detail and "127.0.0.1" in info.value.detail


INVALID_URLS = [
    "",
    "ftp://example.com/x.jpg",
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/_x",
    "javascript:alert(1)",
    "example.com/x.jpg",
    "//example.com/x.jpg",
    "http://",
    "http:///x.jpg",
    "http://exa mple.com/",
    "http://example.com:99999/",
    "http://example.com:0/",
    "http://example.com:abc/",
]


@pytest.mark.parametrize("url", INVALID_URLS)
def test_check_url_rejects_malformed_urls(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(host: str, port: int) -> list[netguard.IPAddress]:
        raise AssertionError(f"resolved {host} for a malformed URL")

    monkeypatch.setattr(netguard, "resolve", no_dns)
    with pytest.raises(ImageFailure) as info:
        check_url(url, make_settings(allowed_networks=[]))
    assert info.value.reason is FailureReason.INVALID_URL


def _fake_dns(monkeypatch: pytest.MonkeyPatch, *answers: str) -> None:
    monkeypatch.setattr(
        netguard, "resolve", lambda host, port: [ipaddress.ip_address(a) for a in answers]
    )


def test_check_url_passes_public_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, "93.184.216.34", "2606:2800:220:1::1")
    addresses = check_url("https://cdn.example.com/a.jpg", make_settings(allowed_networks=[]))
    assert [str(a) for a in addresses] == ["93.184.216.34", "2606:2800:220:1::1"]


def test_one_internal_answer_among_public_ones_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, "93.184.216.34", "10.0.0.7")
    with pytest.raises(ImageFailure) as info:
        check_url("http://cdn.example.com/a.jpg", make_settings(allowed_networks=[]))
    assert info.value.reason is FailureReason.BLOCKED_ADDRESS
    assert "cdn.example.com" in info.value.detail and "10.0.0.7" in info.value.detail


@pytest.mark.parametrize(
    ("errno", "retryable"), [(socket.EAI_NONAME, False), (socket.EAI_AGAIN, True)]
)
def test_dns_failure_is_a_connection_error(
    monkeypatch: pytest.MonkeyPatch, errno: int, retryable: bool
) -> None:
    def failing(host: str, port: int) -> list[netguard.IPAddress]:
        raise socket.gaierror(errno, "resolver says no")

    monkeypatch.setattr(netguard, "resolve", failing)
    with pytest.raises(ImageFailure) as info:
        check_url("http://nope.example/x.jpg", make_settings())
    assert info.value.reason is FailureReason.CONNECTION_ERROR
    assert info.value.retryable is retryable
    assert "nope.example" in info.value.detail


def test_idna_host_is_checked_as_it_is_connected_to(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(
        netguard,
        "resolve",
        lambda host, port: seen.append(host) or [ipaddress.ip_address("93.184.216.34")],
    )
    check_url("http://bücher.example/x.jpg", make_settings())
    assert seen == ["xn--bcher-kva.example"]


# --- the adapter's post-connect check --------------------------------------------------------


def _guarded_session(allowed: list[ipaddress.IPv4Network]) -> GuardedPoolManager:
    return GuardedPoolManager(allowed, retries=False)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_adapter_refuses_loopback_peer_before_sending(server: CatalogServer, scheme: str) -> None:
    path = f"/fault/jpeg/adapter-{scheme}"
    url = f"{scheme}://127.0.0.1:{server.port}{path}"
    with pytest.raises(BlockedAddressError) as info:
        _guarded_session([]).request("GET", url, timeout=2)
    assert info.value.reason is FailureReason.BLOCKED_ADDRESS
    assert "127.0.0.1" in info.value.detail
    assert server.hits(path) == 0  # closed before the request (or the TLS hello) went out


def test_adapter_allows_listed_networks(server: CatalogServer) -> None:
    response = _guarded_session(LOOPBACK).request("GET", server.url("fault/jpeg"), timeout=2)
    assert response.status == 200
    assert response.data[:3] == b"\xff\xd8\xff"


def test_adapters_keep_their_own_allow_lists(server: CatalogServer) -> None:
    # The allow-list lives on per-adapter classes; neither may leak into the other or into
    # urllib3's process-wide defaults.
    open_session, closed_session = _guarded_session(LOOPBACK), _guarded_session([])
    url = server.url("fault/jpeg")
    assert open_session.request("GET", url, timeout=2).status == 200
    with pytest.raises(BlockedAddressError):
        closed_session.request("GET", url, timeout=2)
    assert open_session.request("GET", url, timeout=2).status == 200
    assert urllib3.poolmanager.pool_classes_by_scheme["http"] is HTTPConnectionPool


def test_dns_rebinding_is_caught_after_connect(
    server: CatalogServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our resolver is told the host is public; the socket still lands on 127.0.0.1, as when a
    # rebinding DNS server answers differently the second time.
    _fake_dns(monkeypatch, "93.184.216.34")
    settings = make_settings(allowed_networks=[])
    path = "/fault/jpeg/rebinding"
    with pytest.raises(ImageFailure) as info:
        fetch(server.url(path), make_session(settings), settings)
    assert info.value.reason is FailureReason.BLOCKED_ADDRESS
    assert "127.0.0.1" in info.value.detail
    assert info.value.attempts == 1  # type: ignore[attr-defined]  # never retried
    assert server.hits(path) == 0


# --- the pre-connect check's short-lived resolution cache -----------------------------------


def test_resolution_is_cached_briefly_and_failures_never(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    clock = [1000.0]

    def counting(host: str, port: int) -> list[netguard.IPAddress]:
        calls.append(host)
        if host == "flaky.example":
            raise socket.gaierror(socket.EAI_AGAIN, "temporary failure")
        return [ipaddress.ip_address("93.184.216.34")]

    monkeypatch.setattr(netguard, "resolve", counting)
    monkeypatch.setattr(netguard.time, "monotonic", lambda: clock[0])
    settings = make_settings()
    for _ in range(3):
        check_url("http://cdn.example/a.jpg", settings)
    assert calls == ["cdn.example"]  # one lookup serves the batch
    clock[0] += netguard.RESOLVE_TTL + 1
    check_url("http://cdn.example/b.jpg", settings)
    assert calls == ["cdn.example", "cdn.example"]  # expired: asked again
    for _ in range(2):
        with pytest.raises(ImageFailure):
            check_url("http://flaky.example/a.jpg", settings)
    assert calls.count("flaky.example") == 2  # a failed lookup is not remembered


def test_cached_public_answer_does_not_let_a_rebound_connection_through(
    server: CatalogServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pre-check is answered from the cache ("public"), the socket lands on loopback: the
    # peer check still refuses it before a byte is sent.
    _fake_dns(monkeypatch, "93.184.216.34")
    settings = make_settings(allowed_networks=[])
    check_url(server.url("fault/jpeg/cached"), settings)  # fills the cache
    path = "/fault/jpeg/cached-rebinding"
    with pytest.raises(ImageFailure) as info:
        fetch(server.url(path), make_session(settings), settings)
    assert info.value.reason is FailureReason.BLOCKED_ADDRESS
    assert server.hits(path) == 0
