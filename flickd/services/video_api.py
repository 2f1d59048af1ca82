"""The video routes: search a clip by upload or URL, and follow a long clip's job.

``POST /search/video`` takes a multipart form with either a ``file`` part (the video) or a
``url`` field (a video URL, fetched through the same SSRF guard as image URLs), and the query
parameter ``top_k``. The upload is capped at FLICKD_VIDEO_MAX_UPLOAD_BYTES while it streams in
(``api_errors.BodySizeLimit``). Then:

* a result already stored for this video (its SHA-256) under the served index's model version
  and the same ``top_k`` → 200 with it, at once (header ``X-Flickd-Result: stored``); the
  video's header is still read first, so what this deployment's limits refuse stays refused;
* a clip up to FLICKD_VIDEO_INLINE_SECONDS long (or cut to that by the duration cap) → searched
  in the request, stored, 200 with the ``VideoSearchResult`` (``X-Flickd-Result: computed``);
* a longer one (or one whose length the container does not say) → its bytes go to the blob
  store, a job row is recorded, ``flickd.video_search`` is sent to the gpu queue after the
  commit, and the answer is 202 ``{job_id, status, status_url}``.

``GET /search/video/jobs/{job_id}`` → ``{job_id, status, progress, result, reason, detail}``.

Errors are JSON ``{detail, reason}``: 415 for bytes that are no video we can decode
(not_a_video, unsupported_codec, no_video_stream), 422 for a broken one (truncated_video,
no_decodable_frames), 413 for too many pixels or bytes, 400 for a refused URL, 502 when the
URL's host fails, 503 while no index exists.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from db.session import session_scope
from db.videos import job_view, request_job, store_result, stored_result
from flickd.core.blobstore import BlobStore
from flickd.core.broker import BROKER_ERRORS, VIDEO_SEARCH_TASK, send
from flickd.core.reasons import FailureReason, ImageFailure
from flickd.core.settings import Settings
from flickd.fetching.fetch import HttpClient, make_session
from flickd.fetching.video import VideoLimits, VideoStream, fetch_video, open_video
from flickd.services.api_errors import MAX_TOP_K, UPSTREAM_FAILURE, ApiError, ErrorBody
from flickd.services.search import SearchService, SearchUnavailable
from flickd.services.video import VideoSearch, VideoSearchResult

log = logging.getLogger(__name__)

VIDEO_SEARCH_PATH = "/search/video"
RESULT_HEADER = "X-Flickd-Result"

# HTTP status of each reason a query video is refused; anything unlisted is the remote's fault.
VIDEO_STATUS_BY_REASON: dict[str, int] = {
    FailureReason.NOT_A_VIDEO: 415,
    FailureReason.UNSUPPORTED_CODEC: 415,
    FailureReason.NO_VIDEO_STREAM: 415,
    FailureReason.TRUNCATED_VIDEO: 422,
    FailureReason.NO_DECODABLE_FRAMES: 422,
    FailureReason.VIDEO_TOO_LARGE: 413,
    FailureReason.TOO_LARGE: 413,
    FailureReason.BLOCKED_ADDRESS: 400,
    FailureReason.INVALID_URL: 400,
}
VIDEO_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 413, 415, 422, 502, 503)
}


class VideoJobAccepted(BaseModel):
    job_id: int
    status: str
    status_url: str


class VideoJobStatus(BaseModel):
    job_id: int
    status: str  # queued | running | done | failed
    progress: float  # 0..1
    result: dict[str, Any] | None  # the VideoSearchResult, as stored
    reason: str | None
    detail: str | None


def video_failed(failure: ImageFailure) -> ApiError:
    """The API error for a refused video (or video URL)."""
    reason = failure.reason.value
    what = reason.replace("_", " ")
    message = f"{what}: {failure.detail}" if failure.detail else what
    return ApiError(VIDEO_STATUS_BY_REASON.get(reason, UPSTREAM_FAILURE), reason, message)


class _Videos:
    """The video side of the API: one HTTP session for video URLs, the blob store, and the
    search service shared with the image routes."""

    def __init__(self, settings: Settings, service: SearchService) -> None:
        self.settings = settings
        self.service = service
        self.blobs = BlobStore.for_settings(settings)
        self.limits = VideoLimits.from_settings(settings)
        self._session: HttpClient | None = None
        self._session_lock = threading.Lock()

    def read(self, file: UploadFile | None, url: str | None) -> bytes:
        if (file is None) == (not url):
            raise ApiError(422, "invalid_request", "send exactly one of a `file` or a `url`")
        if file is not None:
            # The body cap already refused more than the limit plus framing; one byte over the
            # limit is enough to know.
            data = file.file.read(self.settings.video_max_upload_bytes + 1)
            if len(data) > self.settings.video_max_upload_bytes:
                raise ApiError(
                    413,
                    FailureReason.TOO_LARGE.value,
                    f"video exceeds {self.settings.video_max_upload_bytes} bytes",
                )
        else:
            try:
                data = fetch_video(str(url), self._http(), self.settings)
            except ImageFailure as failure:
                raise video_failed(failure) from None
        if not data:
            raise ApiError(415, FailureReason.NOT_A_VIDEO.value, "the video is empty (0 bytes)")
        return data

    def search(self, data: bytes, top_k: int) -> JSONResponse:
        sha256 = hashlib.sha256(data).hexdigest()
        version_id = self._served_version()
        try:
            # Opening reads the container's header only: a video refused under this
            # deployment's limits is refused even when a result for it is stored.
            with open_video(data, self.limits) as stream:
                with session_scope(self.settings) as session:
                    stored = stored_result(session, sha256, version_id, top_k)
                if stored is not None:
                    return JSONResponse(stored, headers={RESULT_HEADER: "stored"})
                if self._answer_inline(stream):
                    result = VideoSearch(self.service).search_video(stream, sha256, top_k)
                    return self._store(result, top_k)
        except ImageFailure as failure:
            raise video_failed(failure) from None
        except SearchUnavailable as exc:
            raise ApiError(503, "search_unavailable", str(exc)) from exc
        return self._start_job(data, sha256, version_id, top_k, stream.info.duration_s)

    def _answer_inline(self, stream: VideoStream) -> bool:
        """Short enough to answer in the request: the seconds that will be analysed (the
        duration, or the duration cap) are within FLICKD_VIDEO_INLINE_SECONDS. A container that
        does not say how long it is might be long: it becomes a job."""
        duration = stream.info.duration_s
        if duration is None:
            return False
        analysed = min(duration, self.settings.video_max_seconds)
        return analysed <= self.settings.video_inline_seconds

    def _store(self, result: VideoSearchResult, top_k: int) -> JSONResponse:
        payload = result.model_dump(mode="json")
        with session_scope(self.settings) as session:
            store_result(
                session,
                result.sha256,
                result.model_version_id,
                top_k,
                payload,
                result.duration_s,
            )
        return JSONResponse(payload, headers={RESULT_HEADER: "computed"})

    def _start_job(
        self, data: bytes, sha256: str, version_id: int, top_k: int, duration: float | None
    ) -> JSONResponse:
        key = self.blobs.put(data)  # before the job row: a worker must find the bytes
        with session_scope(self.settings) as session:
            job = request_job(session, sha256, version_id, top_k, key, duration)
        if job.send:
            try:
                send(VIDEO_SEARCH_TASK, [[job.job_id]], self.settings)
            except BROKER_ERRORS as error:
                # The job is recorded: the reconciler sends it once the broker is back.
                log.warning("video job %s not sent (%s); the reconciler will", job.job_id, error)
        if job.status == "done":  # finished between our look and the request
            with session_scope(self.settings) as session:
                stored = stored_result(session, sha256, version_id, top_k)
            if stored is not None:
                return JSONResponse(stored, headers={RESULT_HEADER: "stored"})
        accepted = VideoJobAccepted(
            job_id=job.job_id,
            status=job.status,
            status_url=f"{VIDEO_SEARCH_PATH}/jobs/{job.job_id}",
        )
        return JSONResponse(accepted.model_dump(), status_code=202)

    def job(self, job_id: int) -> dict[str, Any]:
        with session_scope(self.settings) as session:
            view = job_view(session, job_id)
        if view is None:
            raise ApiError(404, "not_found", f"no video search job {job_id}")
        return view.to_dict()

    def _served_version(self) -> int:
        status = self.service.status()
        if not status["loaded"]:
            raise ApiError(503, "search_unavailable", str(status.get("detail")))
        return int(status["model_version_id"])

    def _http(self) -> HttpClient:
        with self._session_lock:
            if self._session is None:
                self._session = make_session(self.settings)
            return self._session


def add_video_routes(app: FastAPI, settings: Settings, service: SearchService) -> None:
    videos = _Videos(settings, service)

    @app.post(
        VIDEO_SEARCH_PATH,
        response_model=VideoSearchResult,
        responses={202: {"model": VideoJobAccepted}, **VIDEO_ERRORS},
        tags=["search"],
    )
    def search_video(
        file: Annotated[UploadFile | None, File(description="an MP4, WebM, MOV or GIF")] = None,
        url: Annotated[str | None, Form(max_length=2048, description="a video URL")] = None,
        top_k: Annotated[int, Query(ge=1, le=MAX_TOP_K, description="matches per track")] = 5,
    ) -> Any:
        """Catalog products seen in a video, each with the time ranges it appears in. A clip
        longer than FLICKD_VIDEO_INLINE_SECONDS becomes a job: 202 with its status URL."""
        return videos.search(videos.read(file, url), top_k)

    @app.get(
        f"{VIDEO_SEARCH_PATH}/jobs/{{job_id}}",
        response_model=VideoJobStatus,
        responses={404: {"model": ErrorBody}},
        tags=["search"],
    )
    def video_job(job_id: int) -> dict[str, Any]:
        """A video job's status and progress, and its result once done."""
        return videos.job(job_id)
