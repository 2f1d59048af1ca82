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
    # Video queries (flickd/fetching/video.py): the bytes are no video container; the
    # container is cut short (no moov atom, a stream that stops); the container holds no video
    # stream (audio only); no frame of the stream decodes; the codec is not one PyAV decodes;
    # a frame over FLICKD_VIDEO_MAX_PIXELS.
    NOT_A_VIDEO = "not_a_video"
    TRUNCATED_VIDEO = "truncated_video"
    NO_VIDEO_STREAM = "no_video_stream"
    NO_DECODABLE_FRAMES = "no_decodable_frames"
    UNSUPPORTED_CODEC = "unsupported_codec"
    VIDEO_TOO_LARGE = "video_too_large"
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
