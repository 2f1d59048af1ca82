"""What every API route shares: errors as JSON ``{"detail", "reason"}``, and the request-body
cap that refuses an upload while it streams in (each upload route has its own limit)."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Multipart framing (boundaries, part headers, the form field's name) on top of the file.
MULTIPART_SLACK = 64 * 1024
MAX_TOP_K = 100  # products (or matches per track) a query may ask for
UPSTREAM_FAILURE = 502  # the status of any refusal reason a route does not map: the remote's fault


class ApiError(HTTPException):
    """An error with a machine-readable ``reason`` next to the human ``detail``.

    An HTTPException so that FastAPI re-raises it untouched when it comes out of body parsing
    (the body-size guard raises it from inside ``receive``).
    """

    def __init__(self, status_code: int, reason: str, message: str) -> None:
        super().__init__(status_code=status_code, detail=message)
        self.reason = reason


class ErrorBody(BaseModel):
    detail: str
    reason: str


class BodySizeLimit:
    """Refuse request bodies over their route's limit before they are spooled to disk:
    ``max_bytes`` by default, ``per_path[path]`` for the paths named there (video uploads).

    A declared Content-Length is refused up front; a chunked body is counted as it arrives,
    and refused the moment it passes the limit: the rest is never read.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await error_response(_too_large(limit))(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"request body exceeds {limit} bytes")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        {"detail": error.detail, "reason": error.reason}, status_code=error.status_code
    )
