"""A loopback HTTP server that plays catalog CDN: real files plus every failure mode we handle.

Used by tests, benchmarks and the demo. Routes:

``/images/<path>``
    Files under ``root_dir`` (never outside it), content type from the extension.
``/blobs/<name>``
    Bytes a test registered with ``server.serve_bytes(name, body, content_type)``, served
    with that Content-Type whatever they are (a video, HTML labelled video/mp4).
``/fault/<name>``
    ``404``, ``500`` (forever), ``flaky/<key>/<n>`` (500 for the first n hits per key, then a
    JPEG), ``429/<key>/<seconds>`` (429 + Retry-After once per key, then a JPEG; ``?date=1``
    sends Retry-After as an HTTP-date), ``slow?seconds=`` (headers only after sleeping),
    ``trickle?interval=&seconds=`` (a JPEG one byte per interval for that long, then the rest),
    ``redirect-loop``, ``redirect-chain/<n>`` (n hops, then a JPEG),
    ``redirect-to?to=<url>&status=302``, ``huge?bytes=`` (chunked, no Content-Length),
    ``huge?declare=1`` (declares an enormous Content-Length, sends 1 KiB, then stalls),
    ``reset`` (closes without answering), ``short`` (Content-Length promises more than is sent),
    ``gzip-bomb?bytes=`` (gzip Content-Encoding, tiny on the wire), ``headers`` (echoes them),
    ``html-as-jpeg``, ``jpeg``, and one route per odd image in ``faults`` (``truncated``,
    ``empty``, ``bomb``, ``cmyk``, ``png16``, ``palette``, ``gif``, ``exif``, ``unsupported``…).

``server.hits(path)`` counts requests per path (query excluded), so tests can see retries.
"""

from __future__ import annotations

import argparse
import email.utils
import gzip
import mimetypes
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from synthetic import faults

# Static fault bodies: route -> (content type, payload factory).
_STATIC: dict[str, tuple[str, Callable[[], bytes]]] = {
    "jpeg": ("image/jpeg", faults.jpeg),
    "html-as-jpeg": ("image/jpeg", faults.html_page),
    "truncated": ("image/jpeg", faults.truncated_jpeg),
    "empty": ("image/jpeg", lambda: b""),
    "bomb": ("image/png", faults.decompression_bomb_png),
    "cmyk": ("image/jpeg", faults.cmyk_jpeg),
    "png16": ("image/png", faults.png16),
    "palette": ("image/png", faults.palette_png_with_transparency),
    "gif": ("image/gif", faults.animated_gif),
    "webp": ("image/webp", faults.animated_webp),
    "exif": ("image/jpeg", faults.exif_rotated_jpeg),
    "unsupported": ("image/x-icon", faults.ico_image),
    "pdf": ("image/jpeg", faults.pdf_document),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck trickle must not keep the process alive
    request_queue_size = 1024  # benchmarks open hundreds of connections at once
    allow_reuse_address = True

    catalog: CatalogServer

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        # Clients hanging up mid-response is the point of half the fault routes: not an error.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries a length or is chunked
    server: _Server
    timeout = 30  # idle keep-alive connections give their thread back eventually
    # TCP_NODELAY, as nginx and CDNs set it on keep-alive connections: the headers and the body
    # go out in two writes, and with Nagle on, the body waits for the client's delayed ACK of
    # the headers (~40 ms) on every reused connection (new connections start in quick-ACK mode,
    # so only clients that keep connections alive paid it).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        if self.server.catalog.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # --- plumbing ------------------------------------------------------------------------------

    def _dispatch(self, head: bool) -> None:
        self._head = head
        split = urlsplit(self.path)
        path = unquote(split.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        catalog = self.server.catalog
        hit = catalog._record(path)
        if catalog.latency > 0:
            time.sleep(catalog.latency)
        try:
            if path.startswith("/images/"):
                self._serve_file(path.removeprefix("/images/"))
            elif path.startswith("/blobs/"):
                self._serve_blob(path.removeprefix("/blobs/"))
            elif path.startswith("/fault/"):
                self._fault(path.removeprefix("/fault/").split("/"), hit)
            else:
                self._send(404, b"not found\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (timeouts, size caps): expected, and nothing to answer.
            self.close_connection = True

    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not self._head:
            self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self._send(status, b"", "text/plain", {"Location": location})

    def _qfloat(self, name: str, default: float) -> float:
        try:
            return float(self.query.get(name, default))
        except ValueError:
            return default

    # --- routes --------------------------------------------------------------------------------

    def _serve_file(self, relative: str) -> None:
        root = self.server.catalog.root_dir
        if root is None:
            return self._send(404, b"no catalog directory\n", "text/plain")
        root = root.resolve()
        target = (root / relative).resolve()
        # resolve() folds "..", symlinks and absolute parts; anything not under root is refused.
        if not target.is_relative_to(root) or not target.is_file():
            return self._send(404, b"not found\n", "text/plain")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), ctype)

    def _serve_blob(self, name: str) -> None:
        blob = self.server.catalog.blob(name)
        if blob is None:
            return self._send(404, b"not found\n", "text/plain")
        self._send(200, blob[1], blob[0])

    def _fault(self, parts: list[str], hit: int) -> None:
        name, args = parts[0], parts[1:]
        if name in _STATIC:
            ctype, factory = _STATIC[name]
            return self._send(200, factory(), ctype)
        handler = getattr(self, "_fault_" + name.replace("-", "_"), None)
        if handler is None:
            return self._send(404, b"unknown fault\n", "text/plain")
        handler(args, hit)

    def _fault_404(self, args: list[str], hit: int) -> None:
        self._send(404, faults.html_page(), "text/html")

    def _fault_500(self, args: list[str], hit: int) -> None:
        self._send(500, b"internal error\n", "text/plain")

    def _fault_flaky(self, args: list[str], hit: int) -> None:
        failures = int(args[1]) if len(args) > 1 else 1
        if hit <= failures:
            return self._send(500, b"try again\n", "text/plain")
        self._send(200, faults.jpeg(), "image/jpeg")

    def _fault_429(self, args: list[str], hit: int) -> None:
        seconds = float(args[1]) if len(args) > 1 else 1.0
        if hit > 1:
            return self._send(200, faults.jpeg(), "image/jpeg")
        if self.query.get("date"):
            value = email.utils.formatdate(time.time() + seconds, usegmt=True)
        else:
            value = f"{seconds:g}"
        self._send(429, b"slow down\n", "text/plain", {"Retry-After": value})

    def _fault_slow(self, args: list[str], hit: int) -> None:
        time.sleep(self._qfloat("seconds", 5.0))
        self._send(200, faults.jpeg(), "image/jpeg")

    def _fault_trickle(self, args: list[str], hit: int) -> None:
        interval, seconds = self._qfloat("interval", 0.1), self._qfloat("seconds", 5.0)
        body = faults.noisy_jpeg()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent, stop = 0, time.monotonic() + seconds
        while sent < len(body) and time.monotonic() < stop:
            self.wfile.write(body[sent : sent + 1])
            self.wfile.flush()
            sent += 1
            time.sleep(interval)
        self.wfile.write(body[sent:])

    def _fault_redirect_loop(self, args: list[str], hit: int) -> None:
        # Two URLs pointing at each other, relative Locations on purpose.
        other = "/fault/redirect-loop/b" if args[:1] != ["b"] else "/fault/redirect-loop"
        self._redirect(other)

    def _fault_redirect_chain(self, args: list[str], hit: int) -> None:
        remaining = int(args[0]) if args else 1
        if remaining <= 0:
            return self._send(200, faults.jpeg(), "image/jpeg")
        self._redirect(f"/fault/redirect-chain/{remaining - 1}")

    def _fault_redirect_to(self, args: list[str], hit: int) -> None:
        target = self.query.get("to") or "/".join(args)
        self._redirect(target, int(self._qfloat("status", 302)))

    def _fault_huge(self, args: list[str], hit: int) -> None:
        total = int(self._qfloat("bytes", 64 * 1024 * 1024))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if self.query.get("declare"):
            # Promise a lot, deliver a little, then stall: only a client that trusts
            # Content-Length and stops early finishes quickly.
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            self.wfile.write(b"\xff" * 1024)
            self.wfile.flush()
            time.sleep(self._qfloat("hold", 5.0))
            self.close_connection = True
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\xff" * 65536
        sent = 0
        while sent < total:
            piece = block[: total - sent]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        self.wfile.write(b"0\r\n\r\n")

    def _fault_gzip_bomb(self, args: list[str], hit: int) -> None:
        # ~10 KB on the wire, ?bytes= (default 10 MB) once decoded: caps must count decoded bytes.
        size = int(self._qfloat("bytes", 10 * 1024 * 1024))
        body = gzip.compress(b"\x00" * size, compresslevel=9)
        self._send(200, body, "image/jpeg", {"Content-Encoding": "gzip"})

    def _fault_headers(self, args: list[str], hit: int) -> None:
        """Echo the request headers, so tests can see what the client sends."""
        self._send(200, str(self.headers).encode(), "text/plain")

    def _fault_reset(self, args: list[str], hit: int) -> None:
        self.close_connection = True  # no status line at all: the client sees a dropped link

    def _fault_short(self, args: list[str], hit: int) -> None:
        body = faults.jpeg()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body) * 2))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


class CatalogServer:
    """The server, in a background thread. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        root_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        verbose: bool = False,
    ) -> None:
        self.root_dir = Path(root_dir) if root_dir is not None else None
        self.host = host
        self.port = port
        self.latency = latency  # seconds added to every request; may be changed while running
        self.verbose = verbose
        self._hits: Counter[str] = Counter()
        self._blobs: dict[str, tuple[str, bytes]] = {}
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> CatalogServer:
        if self._httpd is not None:
            return self
        server_cls = _Server6 if ":" in self.host else _Server
        httpd = server_cls((self.host, self.port), _Handler)
        httpd.catalog = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> CatalogServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- addresses -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def image_url(self, relative: str) -> str:
        """URL of a file under root_dir."""
        return self.url("images/" + quote(relative))

    def serve_bytes(self, name: str, body: bytes, content_type: str) -> str:
        """Serve ``body`` at ``/blobs/<name>`` with ``content_type``; returns its URL."""
        with self._lock:
            self._blobs[name] = (content_type, body)
        return self.url("blobs/" + quote(name))

    def blob(self, name: str) -> tuple[str, bytes] | None:
        with self._lock:
            return self._blobs.get(name)

    # --- request counts ------------------------------------------------------------------------

    def _record(self, path: str) -> int:
        with self._lock:
            self._hits[path] += 1
            return self._hits[path]

    def hits(self, path: str) -> int:
        """Requests seen for ``path`` (with or without leading slash, query ignored)."""
        key = "/" + unquote(urlsplit(path).path).lstrip("/")
        with self._lock:
            return self._hits[key]

    def reset_hits(self) -> None:
        with self._lock:
            self._hits.clear()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a catalog directory plus fault routes.")
    parser.add_argument("root_dir", type=Path, nargs="?", help="directory served at /images/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    server = CatalogServer(args.root_dir, args.host, args.port, args.latency, not args.quiet)
    with server:
        print(f"serving {args.root_dir or '(no directory)'} at {server.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
