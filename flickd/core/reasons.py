"""Why an image failed: the reason vocabulary every stage records."""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    INVALID_URL = "invalid_url"
    BLOCKED_ADDRESS = "blocked_address"
    HTTP_ERROR = "http_error"  # the status code goes in the detail
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    DECOMPRESSION_BOMB = "decompression_bomb"
    CORRUPT_IMAGE = "corrupt_image"
    # A side shorter than FLICKD_MIN_IMAGE_SIDE pixels (a 1x8000 line): nothing to look at.
    BAD_GEOMETRY = "bad_geometry"
    ANALYSIS_ERROR = "analysis_error"
    INTERNAL_ERROR = "internal_error"  # a bug; the detail names the exception
    # The stage was started FLICKD_MAX_STAGE_ATTEMPTS times without finishing (its worker died,
    # or the stage raised each time); the detail says which stage and the last error.
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    CANCELLED = "cancelled"


class ImageFailure(Exception):
    """An image cannot be processed. ``retryable`` says whether trying again may help."""

    def __init__(
        self,
        reason: FailureReason,
        detail: str = "",
        *,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail[:1000]
        self.retryable = retryable
        self.retry_after = retry_after
