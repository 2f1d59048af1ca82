"""Download one image: SSRF-guarded, size- and time-capped, retried with backoff.

Redirects are followed by hand so that every hop passes ``check_url`` before we connect;
urllib3's own retries are off so that ``max_attempts`` means what it says. The transport is
urllib3 itself (a guarded ``PoolManager``, one per process, shared by its download threads):
requests on top of it cost about 0.6 ms of CPU per image for sessions, hooks and cookies
that a bulk image fetch does not use.
The URL, and every redirect target, is first encoded as a browser would request it
(:func:`flickd.fetching.urls.fetchable_url`: spaces, non-ASCII, IDN hosts), so the guard
checks exactly the URL that is sent.
"""

from __future__ import annotations

import contextlib
import email.utils
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from urllib.parse import urljoin

from urllib3 import BaseHTTPResponse, Timeout
from urllib3 import exceptions as uex
from urllib3.util import make_headers

from flickd.core.reasons import FailureReason, ImageFailure
from flickd.core.settings import Settings
from flickd.fetching.netguard import GuardedPoolManager, check_url
from flickd.fetching.urls import UnfetchableURL, fetchable_url

# Only what imaging.decode_image accepts: CDNs negotiate the format from Accept, and offering
# AVIF/HEIC would get us files we then reject.
ACCEPT = "image/webp,image/png,image/jpeg,image/gif,image/bmp,image/tiff;q=0.9,*/*;q=0.5"
CHUNK_SIZE = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# 408/429/5xx say "not now", not "never".
RETRYABLE_STATUSES = frozenset({408, 429})

Sleep = Callable[[float], None]
Clock = Callable[[], float]


@dataclass(frozen=True)
class FetchResult:
    content: bytes
    final_url: str  # after redirects
    status: int
    content_type: str | None
    attempts: int  # 1 when the first try succeeded


HttpClient = GuardedPoolManager


def make_session(settings: Settings) -> HttpClient:
    """A pooled, guarded HTTP client for one process; share it between its download threads.

    No proxies (through one the guard would check the proxy's address, not the catalog
    host's) and no cookies: urllib3 keeps neither."""
    headers = make_headers(accept_encoding=True)  # gzip/deflate, decoded and counted in fetch
    headers.update({"User-Agent": settings.user_agent, "Accept": ACCEPT})
    return GuardedPoolManager(
        settings.allowed_ip_networks,
        num_pools=max(10, settings.download_threads),  # per-host pools kept
        maxsize=settings.download_threads,  # connections per host, one per thread
        headers=headers,
        retries=False,  # fetch() retries, with backoff; urllib3 must not add its own
    )


def fetch(
    url: str,
    session: HttpClient,
    settings: Settings,
    *,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> FetchResult:
    """Download ``url``, retrying transient failures; raise the last ImageFailure otherwise.

    ``url`` may be as a feed gave it (raw spaces, accents, an IDN host): what is requested is
    its ``fetchable_url`` form; one that cannot be encoded fails with INVALID_URL, unconnected.

    The raised ImageFailure carries an extra ``attempts`` attribute (tries made).

    Each attempt follows the redirect chain from the start, within its own
    ``download_deadline``.
    """
    max_attempts = max(1, settings.max_attempts)
    for attempt in range(1, max_attempts + 1):
        try:
            return _attempt(url, session, settings, clock, attempt)
        except ImageFailure as failure:
            if failure.retryable and attempt < max_attempts:
                sleep(backoff_delay(attempt, settings, failure.retry_after))
                continue
            if failure.retryable:
                raise _exhausted(failure, attempt) from failure
            failure.attempts = attempt  # type: ignore[attr-defined]  # extra attribute, read by download.py via getattr
            raise
    raise AssertionError("unreachable: the loop returns or raises")


def backoff_delay(
    attempt: int,
    settings: Settings,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Full jitter (a uniform draw below the exponential ceiling) spreads a burst of failures
    from many threads instead of retrying them in lockstep. A server's Retry-After is a floor,
    capped so one host cannot park a worker.
    """
    # The exponent is bounded so a large attempt number cannot overflow the float.
    ceiling = min(settings.backoff_max, settings.backoff_base * 2 ** min(attempt - 1, 64))
    delay = rand() * ceiling
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.max_retry_after))
    return delay


def parse_retry_after(value: str | None, now: Clock = time.time) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP-dates are GMT by definition
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now()
    return max(0.0, seconds) if math.isfinite(seconds) else None


# --- one attempt -----------------------------------------------------------------------------


def _attempt(
    url: str, session: HttpClient, settings: Settings, clock: Clock, attempt: int
) -> FetchResult:
    deadline = clock() + settings.download_deadline
    current = _fetchable(url)
    seen = {current}
    for _hop in range(settings.max_redirects + 1):
        check_url(current, settings, encoded=True)  # before every connection, redirects too
        response = _request(session, current, settings, deadline, clock)
        try:
            target = _redirect_target(response, current)
            if target is None:
                _raise_for_status(response)
                content = _read_body(response, settings, deadline, clock)
                return FetchResult(
                    content=content,
                    final_url=current,
                    status=response.status,
                    content_type=response.headers.get("Content-Type"),
                    attempts=attempt,
                )
        finally:
            _close(response)
        target = _fetchable(target)  # a Location is encoded like a feed URL
        if target in seen:
            raise ImageFailure(FailureReason.TOO_MANY_REDIRECTS, f"redirect loop at {target}")
        seen.add(target)
        current = target
    raise ImageFailure(
        FailureReason.TOO_MANY_REDIRECTS, f"more than {settings.max_redirects} redirects"
    )


def _fetchable(url: str) -> str:
    """The URL to request (:func:`flickd.fetching.urls.fetchable_url`), or INVALID_URL."""
    try:
        return fetchable_url(url)
    except UnfetchableURL as exc:
        raise ImageFailure(FailureReason.INVALID_URL, str(exc)) from None


def _remaining(deadline: float, clock: Clock, settings: Settings) -> float:
    left = deadline - clock()
    if left <= 0:
        raise _deadline_failure(settings)
    return left


def _deadline_failure(settings: Settings, received: int | None = None) -> ImageFailure:
    got = f" ({received} bytes received)" if received is not None else ""
    # Not retryable: the whole budget is spent, and a host that slow will be slow again.
    return ImageFailure(
        FailureReason.TIMEOUT, f"not complete within {settings.download_deadline:g}s{got}"
    )


def _request(
    session: HttpClient, url: str, settings: Settings, deadline: float, clock: Clock
) -> BaseHTTPResponse:
    left = _remaining(deadline, clock, settings)
    timeout = Timeout(
        connect=min(settings.connect_timeout, left), read=min(settings.read_timeout, left)
    )
    try:
        return session.request(
            "GET", url, preload_content=False, redirect=False, retries=False, timeout=timeout
        )
    except ImageFailure:  # the guard refused the peer address
        raise
    except Exception as exc:
        raise _failure_from(exc) from exc


def _close(response: BaseHTTPResponse) -> None:
    """A body read to the end was already given back to the pool; any other is dropped with
    its connection (draining an unknown remainder could take long)."""
    response.close()
    response.release_conn()


def _redirect_target(response: BaseHTTPResponse, current: str) -> str | None:
    if response.status not in REDIRECT_STATUSES:
        return None
    location = response.headers.get("Location")
    if not location:
        return None  # a 3xx without Location is reported by _raise_for_status
    # http.client decodes header bytes as Latin-1; servers send UTF-8 paths raw (as requests'
    # get_redirect_target undoes it too).
    with contextlib.suppress(UnicodeError):
        location = location.encode("latin-1").decode("utf-8")
    return urljoin(current, location.strip())


def _raise_for_status(response: BaseHTTPResponse) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    if status >= 500 or status in RETRYABLE_STATUSES:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise ImageFailure(
            FailureReason.HTTP_ERROR, f"HTTP {status}", retryable=True, retry_after=retry_after
        )
    raise ImageFailure(FailureReason.HTTP_ERROR, f"HTTP {status}")


def _read_body(
    response: BaseHTTPResponse, settings: Settings, deadline: float, clock: Clock
) -> bytes:
    cap = settings.max_download_bytes
    declared = response.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > cap:  # refuse before reading a byte
        raise ImageFailure(
            FailureReason.TOO_LARGE, f"Content-Length {declared} exceeds {cap} bytes"
        )
    # read1 returns whatever has arrived; read blocks until a whole chunk is in, so a server
    # trickling a byte at a time would never let us look at the clock.
    body = bytearray()
    try:
        while chunk := response.read1(CHUNK_SIZE, decode_content=True):
            body += chunk  # counted after decoding: a gzip bomb hits the cap too
            if len(body) > cap:
                raise ImageFailure(FailureReason.TOO_LARGE, f"body exceeds {cap} bytes")
            if clock() > deadline:
                raise _deadline_failure(settings, len(body))
    except ImageFailure:
        raise
    except Exception as exc:
        raise _failure_from(exc) from exc
    response.release_conn()  # fully read: the connection can serve the next request
    return bytes(body)


# --- error mapping ---------------------------------------------------------------------------


def _exhausted(failure: ImageFailure, attempts: int) -> ImageFailure:
    exhausted = ImageFailure(
        failure.reason,
        f"{failure.detail} after {attempts} attempts",
        retryable=True,  # a later run may still succeed
        retry_after=failure.retry_after,
    )
    exhausted.attempts = attempts  # type: ignore[attr-defined]  # extra attribute, read by download.py via getattr
    return exhausted


def _cause(exc: BaseException) -> BaseException:
    """The socket-level error inside a urllib3 exception, for classification and detail."""
    if isinstance(exc, uex.MaxRetryError) and exc.reason is not None:
        return exc.reason
    if isinstance(exc, uex.ProtocolError) and len(exc.args) > 1:
        inner = exc.args[1]
        if isinstance(inner, BaseException):
            return inner
    return exc


def _failure_from(exc: BaseException) -> ImageFailure:
    cause = _cause(exc)
    detail = f"{type(cause).__name__}: {cause}"[:300]
    if isinstance(cause, uex.NewConnectionError):
        # Refused/unreachable. Checked first: urllib3 makes it a subclass of ConnectTimeoutError.
        return ImageFailure(FailureReason.CONNECTION_ERROR, detail, retryable=True)
    if isinstance(cause, uex.ConnectTimeoutError):
        return ImageFailure(FailureReason.TIMEOUT, f"connect timeout: {detail}", retryable=True)
    if isinstance(cause, uex.ReadTimeoutError | TimeoutError):
        return ImageFailure(FailureReason.TIMEOUT, f"read timeout: {detail}", retryable=True)
    if isinstance(cause, uex.LocationValueError | uex.URLSchemeUnknown):
        return ImageFailure(FailureReason.INVALID_URL, detail)
    if isinstance(cause, uex.SSLError):
        # Certificate problems do not fix themselves between attempts.
        return ImageFailure(FailureReason.CONNECTION_ERROR, f"TLS error: {detail}")
    if isinstance(cause, uex.DecodeError):
        return ImageFailure(FailureReason.HTTP_ERROR, f"undecodable Content-Encoding: {detail}")
    if isinstance(exc, uex.HTTPError) or isinstance(cause, uex.HTTPError | OSError):
        # Refused, reset, dropped mid-body, name resolution at connect time: all transient.
        return ImageFailure(FailureReason.CONNECTION_ERROR, detail, retryable=True)
    raise exc  # a bug, not a network condition: let it surface
