"""URLs as catalog exports write them (raw spaces, accents, emoji, IDN hosts, escapes mixed in):
``fetchable_url`` encodes them as a browser would, the feed accepts them and keeps what it
said, and the fetch path (download worker, search by image URL, the SSRF guard) requests and
checks the encoded form. Against the real loopback CatalogServer and, for the worker, the real
Postgres, Redis and Celery."""

from __future__ import annotations

import ipaddress
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import urllib3.util.connection
from sqlalchemy import func, select

from db.schema import Image, RejectedRow
from db.session import session_scope
from flickd.core.blobstore import BlobStore
from flickd.core.reasons import FailureReason, ImageFailure
from flickd.fetching import netguard
from flickd.fetching.fetch import HttpClient, fetch, make_session
from flickd.fetching.netguard import check_url
from flickd.fetching.urls import UnfetchableURL, UrlFault, fetchable_url
from producer.feeds import FeedColumns, InvalidURL, RejectReason, normalize_url, read_feed
from producer.ingest import ingest
from synthetic import faults
from synthetic.catalog import Catalog
from synthetic.server import CatalogServer
from tests.conftest import catalog_fixture, celery_worker, wait_for_run
from tests.conftest_download import make_settings

# --- fetchable_url: input -> what is requested ------------------------------------------------

ENCODED = [
    # raw spaces and non-ASCII in the path: UTF-8, percent-encoded
    (
        "http://host/c/unicode/robe rouge été ñ.jpg",
        "http://host/c/unicode/robe%20rouge%20%C3%A9t%C3%A9%20%C3%B1.jpg",
    ),
    ("http://127.0.0.1:8080/p/👗.jpg", "http://127.0.0.1:8080/p/%F0%9F%91%97.jpg"),
    ("https://a.com/x\u00a0y.jpg", "https://a.com/x%C2%A0y.jpg"),  # no-break space: encoded
    # …and in the query: a space is %20 there too (not "+"), "+" and "%2B" stay what they are
    (
        "https://cdn.example/c/👗 robe.jpg?w=800&t=été 2024",
        "https://cdn.example/c/%F0%9F%91%97%20robe.jpg?w=800&t=%C3%A9t%C3%A9%202024",
    ),
    ("https://a.com/p?q=a+b&r=a%2Bb", "https://a.com/p?q=a+b&r=a%2Bb"),
    ("https://a.com/p?next=http://b.com/y z", "https://a.com/p?next=http://b.com/y%20z"),
    # IDN hosts: IDNA (UTS #46, non-transitional), as requests and browsers encode them
    ("https://bücher.example/ä.jpg", "https://xn--bcher-kva.example/%C3%A4.jpg"),
    ("https://BÜCHER.example/x", "https://xn--bcher-kva.example/x"),
    ("https://Straße.example/x", "https://xn--strae-oqa.example/x"),
    ("http://例え.テスト/x", "http://xn--r8jz45g.xn--zckzah/x"),
    ("https://xn--bcher-kva.example/x", "https://xn--bcher-kva.example/x"),
    # already encoded: never twice
    ("https://a.com/a%20b.jpg", "https://a.com/a%20b.jpg"),
    ("https://a.com/100%25.jpg", "https://a.com/100%25.jpg"),
    ("https://a.com/%2520", "https://a.com/%2520"),
    ("https://a.com/a%2Fb.jpg", "https://a.com/a%2Fb.jpg"),
    ("https://a.com/%C3%A9t%C3%A9.jpg", "https://a.com/%C3%A9t%C3%A9.jpg"),
    # mixed encodings: one spelling
    ("https://a.com/a%20b c.jpg", "https://a.com/a%20b%20c.jpg"),
    ("https://a.com/%c3%a9t%C3%A9 é.jpg", "https://a.com/%C3%A9t%C3%A9%20%C3%A9.jpg"),
    ("https://a.com/100% coton.jpg", "https://a.com/100%25%20coton.jpg"),  # lone "%"
    ("https://a.com/%7Euser/~x.jpg", "https://a.com/~user/~x.jpg"),  # unreserved, as requests
    # the rest of the URL
    ("HTTPS://A.COM:443/X.jpg", "https://a.com/X.jpg"),
    ("https://a.com:8443/x.jpg", "https://a.com:8443/x.jpg"),
    ("https://User:P W@a.com/x.jpg", "https://User:P%20W@a.com/x.jpg"),
    ("https://[2001:DB8::1]/x", "https://[2001:db8::1]/x"),
    ("https://a.com/x.jpg#zoom in", "https://a.com/x.jpg"),
    ("https://a.com/a/../b/./c.jpg", "https://a.com/b/c.jpg"),
    ("  https://a.com/x.jpg \n", "https://a.com/x.jpg"),
    # plain URLs (the feed's fast path) are left as they are
    ("https://cdn.a.com/p/1.jpg", "https://cdn.a.com/p/1.jpg"),
    (
        "http://a-b_c.example.co.uk/p/1.jpg?x=1&y=%20",
        "http://a-b_c.example.co.uk/p/1.jpg?x=1&y=%20",
    ),
    ("https://x/!$&'()*+,;=:@~", "https://x/!$&'()*+,;=:@~"),
    ("http://0x0a000001/x.jpg", "http://0x0a000001/x.jpg"),
]


@pytest.mark.parametrize(("url", "expected"), ENCODED)
def test_fetchable_url_encodes_as_a_browser(url: str, expected: str) -> None:
    assert fetchable_url(url) == expected
    assert fetchable_url(expected) == expected  # idempotent: the encoded form is final


REFUSED = [
    ("ftp://a.com/x.jpg", UrlFault.SCHEME, "scheme 'ftp' is not http or https"),
    ("//a.com/x.jpg", UrlFault.SCHEME, "no scheme"),
    ("a.com/x.jpg", UrlFault.SCHEME, "no scheme"),
    ("http:/a.com/x.jpg", UrlFault.HOST, "no host"),
    ("https://exa mple.com/x.jpg", UrlFault.HOST, "cannot contain ' '"),
    ("https://a<b.com/x.jpg", UrlFault.HOST, "cannot contain '<'"),
    ("https://a..com/x.jpg", UrlFault.HOST, "empty label"),
    ("https://bü_cher.example/x.jpg", UrlFault.HOST, "U+005F"),
    ("https://👗.example/x.jpg", UrlFault.HOST, "U+1F457"),
    ("https://-bücher.example/x.jpg", UrlFault.HOST, "hyphen"),
    ("https://a.com/\x01.jpg", UrlFault.CHARACTERS, "U+0001"),
    ("https://a.com/a\tb.jpg", UrlFault.CHARACTERS, "U+0009"),
    ("https://a.com/\u200b.jpg", UrlFault.CHARACTERS, "U+200B"),
    ("https://a.com/\u202e.jpg", UrlFault.CHARACTERS, "U+202E"),  # bidi override
    ("https://a.com:99999/x.jpg", UrlFault.SYNTAX, "Port out of range"),
    ("https://[::1/x.jpg", UrlFault.SYNTAX, "cannot be parsed"),
    ("https://a\\b.com/x.jpg", UrlFault.SYNTAX, "backslash"),
]


@pytest.mark.parametrize(("url", "fault", "detail"), REFUSED)
def test_fetchable_url_refuses_with_a_reason(url: str, fault: UrlFault, detail: str) -> None:
    with pytest.raises(UnfetchableURL) as info:
        fetchable_url(url)
    assert info.value.fault is fault
    assert detail in str(info.value)
    assert isinstance(info.value, ValueError)


# --- the feed: accepts what can be encoded, keeps what it said --------------------------------

HEADER = "product_id,image_url\n"


def _read(tmp_path: Path, text: str) -> tuple[list[tuple[str, str]], list[tuple[int, str, str]]]:
    path = tmp_path / "feed.csv"
    path.write_text(HEADER + text, encoding="utf-8")
    chunks = list(read_feed(path, FeedColumns()))
    pairs = [
        (pid, url) for c in chunks for pid, url in c.images[["product_id", "url"]].values.tolist()
    ]
    rejected = [(r.row_number, r.reason.value, r.detail) for c in chunks for r in c.rejected]
    return pairs, rejected


def test_feed_accepts_spaces_accents_emoji_idn_and_escapes_as_written(tmp_path: Path) -> None:
    urls = [
        "http://host/c/unicode/robe rouge été ñ.jpg",
        "https://cdn.example/c/👗 robe.jpg?t=été 2024",
        "https://bücher.example/ä.jpg",
        "https://a.com/a%20b.jpg",
        "https://a.com/100%25.jpg",
        "https://a.com/%c3%a9t%C3%A9 é.jpg",
    ]
    pairs, rejected = _read(tmp_path, "".join(f"p{i},{u}\n" for i, u in enumerate(urls)))
    assert rejected == []
    assert pairs == [(f"p{i}", u) for i, u in enumerate(urls)]  # stored as the feed said


def test_feed_still_lowercases_the_host_and_keeps_the_rest() -> None:
    assert normalize_url("HTTP://BÜCHER.example:80/Robe Été.jpg#x") == (
        "http://bücher.example/Robe Été.jpg"
    )


def test_feed_rejects_what_cannot_be_encoded_with_its_reason(tmp_path: Path) -> None:
    pairs, rejected = _read(
        tmp_path,
        "p1,https://bü_cher.example/x.jpg\n"
        "p2,https://exa mple.com/x.jpg\n"
        "p3,https://a.com/\u200bx.jpg\n"
        "p4,ftp://a.com/robe rouge.jpg\n"
        "p5,https://a.com/robe rouge.jpg\n",
    )
    assert pairs == [("p5", "https://a.com/robe rouge.jpg")]
    assert [(n, reason) for n, reason, _ in rejected] == [
        (1, "malformed_url"),
        (2, "malformed_url"),
        (3, "malformed_url"),
        (4, "unsupported_scheme"),
    ]
    assert "invalid host" in rejected[0][2] and "U+005F" in rejected[0][2]
    assert "https://bü_cher.example/x.jpg" in rejected[0][2]
    with pytest.raises(InvalidURL) as info:
        normalize_url("https://bü_cher.example/x.jpg")
    assert info.value.reason is RejectReason.MALFORMED_URL
    assert "U+005F" in info.value.detail


def test_url_too_long_is_measured_as_written(tmp_path: Path) -> None:
    # 2048 characters as written; encoded, each "é" is six. Accepted, as before.
    url = "https://a.com/" + "é" * (2048 - len("https://a.com/"))
    pairs, rejected = _read(tmp_path, f"p1,{url}\np2,{url}é\n")
    assert pairs == [("p1", url)]
    assert [(n, reason) for n, reason, _ in rejected] == [(2, "url_too_long")]


# --- fetch: the encoded URL is requested, from the real loopback server ----------------------

JPEG = faults.jpeg((200, 40, 60), (32, 24))
FILES = {  # file name on the server -> a URL path written as catalog exports write it
    "robe rouge été 👗.jpg": "robe rouge été 👗.jpg",  # raw
    "chemise bleue.jpg": "chemise%20bleue.jpg",  # already encoded: must not become %2520
    "100% coton.jpg": "100%25 coton.jpg",  # mixed: an escape and a raw space
    "jupe plissée ñ.jpg": "jupe%20pliss%C3%A9e ñ.jpg",  # mixed: escapes and raw non-ASCII
}


@pytest.fixture(scope="module")
def files_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogServer]:
    root = tmp_path_factory.mktemp("unicode-catalog")
    for name in FILES:
        (root / name).write_bytes(JPEG)
    with CatalogServer(root) as srv:
        yield srv


@pytest.fixture(scope="module")
def session() -> Iterator[HttpClient]:
    with make_session(make_settings()) as s:
        yield s


@pytest.mark.parametrize("name", list(FILES))
def test_fetch_requests_the_encoded_url(files_server: CatalogServer, session, name: str) -> None:
    url = f"{files_server.base_url}/images/{FILES[name]}"
    before = files_server.hits(f"images/{quote(name)}")
    result = fetch(url, session, make_settings())
    assert result.content == JPEG
    assert result.final_url == f"{files_server.base_url}/images/{quote(name)}"
    assert files_server.hits(f"images/{quote(name)}") == before + 1


def test_redirect_location_with_spaces_is_encoded(files_server: CatalogServer, session) -> None:
    target = quote("/images/chemise bleue.jpg")  # the server un-quotes: Location has a space
    result = fetch(files_server.url(f"fault/redirect-to?to={target}"), session, make_settings())
    assert result.content == JPEG
    assert result.final_url.endswith("/images/chemise%20bleue.jpg")


def test_fetch_refuses_an_unencodable_url_before_connecting(
    session, connections: list[str]
) -> None:
    with pytest.raises(ImageFailure) as info:
        fetch("http://exa mple.com/x.jpg", session, make_settings())
    assert info.value.reason is FailureReason.INVALID_URL
    assert "cannot contain ' '" in info.value.detail
    assert info.value.retryable is False
    assert info.value.attempts == 1  # type: ignore[attr-defined]
    assert connections == []


def test_search_by_image_url_fetches_the_encoded_url(files_server: CatalogServer) -> None:
    from flickd.services.search import SearchService

    settings = make_settings(max_upload_bytes=1024 * 1024)
    image = SearchService(settings).fetch_image(
        f"{files_server.base_url}/images/robe rouge été 👗.jpg"
    )
    assert image.size == (32, 24)


# --- the SSRF guard sees the punycode host ----------------------------------------------------


def _dns(monkeypatch: pytest.MonkeyPatch, answer: str) -> list[str]:
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[netguard.IPAddress]:
        asked.append(host)
        return [ipaddress.ip_address(answer)]

    monkeypatch.setattr(netguard, "resolve", resolve)
    return asked


@pytest.mark.parametrize("answer", ["10.0.0.7", "127.0.0.1", "169.254.169.254", "::1"])
def test_idn_host_resolving_to_a_private_address_is_blocked(
    monkeypatch: pytest.MonkeyPatch, session, connections: list[str], answer: str
) -> None:
    asked = _dns(monkeypatch, answer)
    with pytest.raises(ImageFailure) as info:
        fetch("http://bücher.example/robe rouge.jpg", session, make_settings(allowed_networks=[]))
    assert info.value.reason is FailureReason.BLOCKED_ADDRESS
    assert asked == ["xn--bcher-kva.example"]  # the host the fetch connects to
    assert f"xn--bcher-kva.example -> {answer}" in info.value.detail
    assert connections == []  # refused before any connection


def test_check_url_of_the_encoded_url_sees_punycode(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _dns(monkeypatch, "93.184.216.34")
    check_url(fetchable_url("https://Straße.example/été.jpg"), make_settings(allowed_networks=[]))
    assert asked == ["xn--strae-oqa.example"]


# --- through a real ingest and download worker -------------------------------------------------

catalog = catalog_fixture(2, seed=5, dirname="url-catalog")


def _named_copies(catalog: Catalog) -> dict[str, tuple[str, Path]]:
    """Catalog images copied, inside the served folder, to names with spaces, accents and
    emoji: URL path as the feed writes it -> (file name, file)."""
    source = catalog.root / "images" / catalog.images[0].filename
    out: dict[str, tuple[str, Path]] = {}
    for name, written in FILES.items():
        target = catalog.root / "images" / name
        shutil.copyfile(source, target)
        out[written] = (name, target)
    return out


@pytest.mark.services
def test_unicode_urls_download_through_a_real_worker(pg_settings, catalog, server, tmp_path):
    copies = _named_copies(catalog)
    plain = f"{server.base_url}/images/{catalog.images[1].filename}"
    urls = [f"{server.base_url}/images/{written}" for written in copies] + [plain]
    bad = "http://bü_cher.example/x.jpg"
    feed = tmp_path / "feed.csv"
    feed.write_text(
        HEADER + "".join(f"p{i},{u}\n" for i, u in enumerate(urls)) + f"p9,{bad}\n",
        encoding="utf-8",
    )
    assert pg_settings.last_stage == "download"  # FLICKD_LAST_STAGE=download in the worker
    with celery_worker(pg_settings, queues="download", concurrency=2) as worker:
        summary = ingest(feed, pg_settings)
        assert summary.accepted == len(urls)
        assert dict(summary.invalid_by_reason) == {"malformed_url": 1}
        assert wait_for_run(pg_settings, summary.run_id, timeout=120) == "done"
        assert worker.poll() is None

    blobs = BlobStore(pg_settings.blob_dir)
    with session_scope(pg_settings) as session:
        rows = {img.url: img for img in session.scalars(select(Image))}
        rejected = session.execute(select(RejectedRow.reason, RejectedRow.detail)).all()
    assert set(rows) == set(urls)  # images.url: the text of the feed, not the encoded form
    for url, image in rows.items():
        assert (image.state, image.failure_reason) == ("downloaded", None), image.failure_detail
        written = url.removeprefix(f"{server.base_url}/images/")
        path = copies[written][1] if written in copies else catalog.root / "images" / written
        assert blobs.get(image.blob_key) == path.read_bytes()
    for written, (name, _) in copies.items():
        assert server.hits(f"images/{quote(name)}") == 1, written  # fetched once, encoded
    assert [r.reason for r in rejected] == ["malformed_url"]
    assert "invalid host" in rejected[0].detail and bad in rejected[0].detail

    again = ingest(feed, pg_settings)  # the same feed again: nothing new
    assert again.new_images == 0 and again.enqueued == 0
    assert again.already_known == len(urls)
    with session_scope(pg_settings) as session:
        assert session.scalar(select(func.count()).select_from(Image)) == len(urls)
