"""Video search over HTTP on real Postgres and Redis: synthetic clips decoded for real, searched
with the tiny offline models in an index of a catalog the real pipeline analysed; long clips as
jobs on a real gpu worker process; every bad input of issue 10 through the API."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func
from sqlalchemy import select as sql_select

from db.schema import VideoSearchJob
from db.session import session_scope
from flickd.core.settings import Settings
from flickd.fetching.video import VideoLimits, open_video
from flickd.services.api import create_app
from flickd.services.search import SearchService
from flickd.services.video import VideoSearch
from synthetic import video as clips
from synthetic.catalog import Catalog
from synthetic.procs import celery_worker, free_port
from synthetic.server import CatalogServer
from tests.conftest import FAST_DOWNLOADS, SESSION_PREFIX, _truncate_all, catalog_fixture
from tests.models_fixtures import tiny_models
from tests.test_search_api import build_index, ingest_products
from workers.reconcile import reconcile_once

__all__ = ["tiny_models"]

catalog = catalog_fixture(6, seed=21, dirname="video-catalog")


# --- an indexed catalog in Postgres ------------------------------------------------------------
def video_catalog(
    pg_url: str, data_dir: Path, tiny_models: dict[str, Path], cat: Catalog
) -> Settings:
    """The catalog analysed by the real pipeline (in-process tasks) into the session's Postgres
    and indexed. Whole-image crops (no detector): each frame of a clip is searched whole."""
    _truncate_all(pg_url)
    settings = Settings(
        database_url=pg_url,
        data_dir=data_dir,
        allowed_networks=["127.0.0.0/8"],
        **{**FAST_DOWNLOADS, "last_stage": "analyze"},
        detector_model="none",
        embedding_model=str(tiny_models["clip"]),
        device="cpu",
        analyze_batch_size=4,
    )
    with CatalogServer(cat.root / "images") as server:
        ingest_products(settings, cat, server, len(cat.products))
    build_index(settings)
    return settings


def with_broker(settings: Settings, redis_url: str, **extra: Any) -> Settings:
    """The same deployment with a broker of its own (a fresh key prefix: an empty gpu queue)."""
    prefix = f"{SESSION_PREFIX}v{uuid.uuid4().hex[:8]}:"
    return settings.model_copy(update={"broker_url": redis_url, "broker_prefix": prefix, **extra})


def shots(cat: Catalog, n: int) -> list[tuple[str, Image.Image]]:
    return [
        (img.product_id, Image.open(cat.image_path(img)).convert("RGB")) for img in cat.images[:n]
    ]


@pytest.fixture(scope="module")
def indexed(pg_url, tmp_path_factory, tiny_models, catalog) -> Settings:
    return video_catalog(
        pg_url, tmp_path_factory.mktemp("video-api") / "data", tiny_models, catalog
    )


@pytest.fixture(scope="module")
def settings(indexed: Settings, redis_url: str) -> Settings:
    return with_broker(indexed, redis_url)


@pytest.fixture(scope="module")
def clip(catalog, tmp_path_factory) -> clips.ClipTruth:
    """Three products, about five seconds: answered in the request."""
    path = tmp_path_factory.mktemp("clips") / "three.mp4"
    return clips.make_clip(shots(catalog, 3), path, shot_seconds=(1.2, 1.8), seed=1)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def upload(client: TestClient, data: bytes, name: str = "clip.mp4", **params: Any) -> Any:
    return client.post("/search/video", files={"file": (name, data, "video/mp4")}, params=params)


def rows(settings: Settings, sha256: str | None = None) -> int:
    query = sql_select(func.count()).select_from(VideoSearchJob)
    if sha256:
        query = query.where(VideoSearchJob.sha256 == sha256)
    with session_scope(settings) as session:
        return int(session.scalar(query) or 0)


def gpu_messages(settings: Settings) -> list[tuple[str, list[Any]]]:
    client = redis.Redis.from_url(settings.broker_url or "")
    raw = client.lrange(settings.broker_prefix + "gpu", 0, -1)
    return [
        (m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0])
        for m in map(json.loads, raw)
    ]


def direct(settings: Settings, data: bytes, top_k: int = 5) -> dict[str, Any]:
    """The same clip searched by VideoSearch itself, without the API."""
    with open_video(data, VideoLimits.from_settings(settings)) as stream:
        result = VideoSearch(SearchService(settings)).search_video(
            stream, hashlib.sha256(data).hexdigest(), top_k
        )
    return result.model_dump(mode="json")


def without_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "took_ms"}


def still_answering(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200, health.text


# --- a short clip: answered in the request -----------------------------------------------------
def test_an_uploaded_clip_is_answered_and_stored(client, settings, clip):
    data = clip.path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    response = upload(client, data, top_k=3)
    assert response.status_code == 200, response.text
    assert response.headers["x-flickd-result"] == "computed"
    body = response.json()
    assert body["kind"] == "video" and body["sha256"] == sha
    assert body["frames_sampled"] > 0 and body["corrupt_packets"] == 0
    assert body["duration_s"] == pytest.approx(clip.duration_s, abs=0.2)
    # Exactly what VideoSearch answers for these bytes: the API adds nothing and loses nothing.
    assert without_timing(body) == without_timing(direct(settings, data, 3))
    assert body["products"], "no product found in a clip of three catalog products"
    shown = {shot.product_id for shot in clip.shots}
    assert shown & {p["product_id"] for p in body["products"]}
    for product in body["products"]:
        assert product["time_ranges"] and product["thumbnail"].startswith("data:image/jpeg")
        for start, end in product["time_ranges"]:
            assert 0 <= start <= end <= clip.duration_s + 0.1
    assert rows(settings, sha) == 1

    # Asking again is answered from the stored row: the same body, byte for byte (its took_ms
    # too), no new row, nothing sent to a worker.
    again = upload(client, data, top_k=3)
    assert again.status_code == 200
    assert again.headers["x-flickd-result"] == "stored"
    assert again.json() == body
    assert rows(settings, sha) == 1 and gpu_messages(settings) == []
    # Another top_k is another question.
    other = upload(client, data, top_k=1)
    assert other.status_code == 200 and other.headers["x-flickd-result"] == "computed"
    assert rows(settings, sha) == 2


def test_a_video_url_is_fetched_and_searched(client, clip, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "clip.mp4").write_bytes(clip.path.read_bytes())
    with CatalogServer(served) as server:
        response = client.post("/search/video", data={"url": f"{server.base_url}/images/clip.mp4"})
        assert response.status_code == 200, response.text
        assert response.json()["sha256"] == hashlib.sha256(clip.path.read_bytes()).hexdigest()
        assert server.hits("/images/clip.mp4") == 1


def test_a_request_needs_exactly_one_of_file_and_url(client, clip):
    neither = client.post("/search/video", data={"top_k": "3"})
    assert (neither.status_code, neither.json()["reason"]) == (422, "invalid_request")
    both = client.post(
        "/search/video",
        files={"file": ("c.mp4", clip.path.read_bytes(), "video/mp4")},
        data={"url": "http://127.0.0.1/c.mp4"},
    )
    assert (both.status_code, both.json()["reason"]) == (422, "invalid_request")
    assert client.get("/search/video/jobs/987654").status_code == 404
    still_answering(client)


# --- bad input ---------------------------------------------------------------------------------
def _expect(response: Any, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] == reason and body["detail"], body
    return body


def test_bytes_that_are_no_video_are_refused(client):
    for name, data in clips.not_a_video().items():
        body = _expect(upload(client, data, f"{name}.mp4"), 415, "not_a_video")
        assert body["detail"], name
    still_answering(client)


def test_broken_videos_get_their_reason(client, clip):
    data = clip.path.read_bytes()
    _expect(upload(client, clips.drop_moov(data)), 422, "truncated_video")
    _expect(upload(client, clips.undecodable(data)), 422, "no_decodable_frames")
    audio = _expect(upload(client, clips.audio_only(), "tone.m4a"), 415, "no_video_stream")
    assert "audio" in audio["detail"]
    codec = _expect(upload(client, clips.unknown_codec(data)), 415, "unsupported_codec")
    assert "zzzz" in codec["detail"]
    still_answering(client)


def test_a_stream_cut_short_is_analysed_up_to_the_cut(client, clip):
    response = upload(client, clips.cut_stream(clip.path.read_bytes(), keep=0.6))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["frames_sampled"] > 0 and body["notes"]
    still_answering(client)


def test_corrupt_packets_are_skipped_counted_and_noted(client, clip):
    response = upload(client, clips.corrupt_packets(clip.path.read_bytes(), at_s=1.0, count=3))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["corrupt_packets"] > 0
    assert any("corrupt" in note for note in body["notes"]), body["notes"]
    assert body["frames_sampled"] > 0
    still_answering(client)


def test_the_caps_on_pixels_and_duration(settings, clip, catalog, tmp_path):
    small = settings.model_copy(update={"video_max_pixels": 320 * 240 - 1})
    with TestClient(create_app(small)) as capped:
        # Refused although a result for this clip is stored (asked under the default caps).
        body = _expect(upload(capped, clip.path.read_bytes()), 413, "video_too_large")
        assert "320x240" in body["detail"]
    # Stored results are keyed by video, model and top_k, not by caps: a clip of its own.
    fresh = clips.make_clip(shots(catalog, 3), tmp_path / "capped.mp4", shot_seconds=(1.2, 1.8))
    short = settings.model_copy(update={"video_max_seconds": 2.0})
    with TestClient(create_app(short)) as capped:
        response = upload(capped, fresh.path.read_bytes())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["cut_at_s"] == pytest.approx(2.0, abs=0.2)
        assert body["notes"] and any("2" in note for note in body["notes"])
        assert all(end <= 2.2 for p in body["products"] for _, end in p["time_ranges"])
        still_answering(capped)


def test_video_urls_go_through_the_ssrf_guard(client, tmp_path):
    for url, status, reason in [
        ("http://10.1.2.3/clip.mp4", 400, "blocked_address"),
        ("http://169.254.169.254/latest/meta-data/", 400, "blocked_address"),
        ("ftp://example.com/clip.mp4", 400, "invalid_url"),
    ]:
        _expect(client.post("/search/video", data={"url": url}), status, reason)
    served = tmp_path / "served"
    served.mkdir()
    (served / "page.mp4").write_bytes(b"<!doctype html><html><body>a page</body></html>\n" * 50)
    with CatalogServer(served) as server:
        url = f"{server.base_url}/images/page.mp4"  # served as video/mp4
        _expect(client.post("/search/video", data={"url": url}), 415, "not_a_video")
        _expect(
            client.post("/search/video", data={"url": f"{server.base_url}/fault/404"}),
            502,
            "http_error",
        )
    still_answering(client)


# --- a huge upload, refused while it streams in ------------------------------------------------
class _Server:
    """The app under uvicorn on loopback (a real HTTP server, reading the socket as it comes)."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _stream_upload(port: int, total: int, chunk: int = 64 * 1024) -> tuple[bytes, int]:
    """POST a chunked multipart body of ``total`` file bytes, a chunk at a time, stopping as
    soon as the server answers; returns (response bytes, file bytes sent)."""
    boundary = "flickdboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /search/video HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
        )
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        piece = os.urandom(chunk)
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the server has answered: stop sending
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        sock.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer, sent


def test_a_huge_upload_is_refused_while_it_streams_in(settings):
    cap = 256 * 1024
    total = 64 * 1024 * 1024  # 256 times the cap: the server must not wait for all of it
    with _Server(settings.model_copy(update={"video_max_upload_bytes": cap})) as live:
        answer, sent = _stream_upload(live.port, total)
        status_line, _, rest = answer.partition(b"\r\n")
        assert b" 413 " in status_line, answer[:500]
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["reason"] == "too_large"
        assert sent < total // 4, f"the client sent {sent} of {total} bytes before the answer"
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")


# --- long clips: jobs on a real gpu worker -----------------------------------------------------
def poll_job(client: TestClient, status_url: str, timeout: float = 180) -> list[dict[str, Any]]:
    """Every status the endpoint reported until the job ended."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(status_url)
        assert response.status_code == 200, response.text
        seen.append(response.json())
        if seen[-1]["status"] in ("done", "failed"):
            return seen
        time.sleep(0.05)
    raise TimeoutError(f"job still {seen[-1] if seen else None} after {timeout}s")


def test_a_long_clip_is_a_job_on_the_gpu_worker(indexed, redis_url, clip, tmp_path):
    settings = with_broker(indexed, redis_url, video_inline_seconds=1.0)
    data = clip.path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    before = rows(settings, sha)  # earlier tests stored this clip under other top_k values
    with TestClient(create_app(settings)) as client:
        accepted = upload(client, data, top_k=2)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert job["status"] == "queued"
        assert job["status_url"] == f"/search/video/jobs/{job['job_id']}"
        # The bytes wait in the blob store, the job in Postgres, its message on the gpu queue.
        assert gpu_messages(settings) == [("flickd.video_search", [job["job_id"]])]
        queued = client.get(job["status_url"]).json()
        assert queued == {
            "job_id": job["job_id"],
            "status": "queued",
            "progress": 0.0,
            "result": None,
            "reason": None,
            "detail": None,
        }
        with celery_worker(settings, "gpu", concurrency=1, log_path=tmp_path / "gpu.log"):
            seen = poll_job(client, job["status_url"])
        final = seen[-1]
        assert final["status"] == "done", final
        assert final["progress"] == 1.0 and final["reason"] is None
        progress = [s["progress"] for s in seen]
        assert progress == sorted(progress)  # never goes backwards
        assert without_timing(final["result"]) == without_timing(direct(settings, data, 2))
        # Asked again: the stored result at once, the same row, no new message.
        again = upload(client, data, top_k=2)
        assert again.status_code == 200 and again.headers["x-flickd-result"] == "stored"
        assert again.json() == final["result"]
        assert rows(settings, sha) == before + 1 and gpu_messages(settings) == []


def test_a_job_whose_worker_dies_is_re_driven_and_finishes_once(
    indexed, redis_url, catalog, tmp_path
):
    settings = with_broker(
        indexed,
        redis_url,
        video_inline_seconds=1.0,
        video_max_fps=12.0,  # every frame: a job long enough to kill mid-way
        video_batch_size=2,
        lease_seconds=2,
        reconcile_interval=1,
        # Redis would re-deliver the dead worker's message only after minutes: whatever comes
        # back in this test, the reconciler brought back.
        visibility_timeout=300,
        task_soft_time_limit=100,
        task_time_limit=120,
    )
    long_clip = clips.make_clip(
        shots(catalog, 6), tmp_path / "long.mp4", shot_seconds=(2.0, 2.5), seed=4
    )
    data = long_clip.path.read_bytes()
    with TestClient(create_app(settings)) as client:
        job = upload(client, data).json()
        status_url = job["status_url"]
        with celery_worker(settings, "gpu", concurrency=1, log_path=tmp_path / "gpu-1.log") as gpu:
            deadline = time.monotonic() + 120
            while True:
                status = client.get(status_url).json()
                if status["status"] == "running" and status["progress"] > 0:
                    break
                assert status["status"] in ("queued", "running"), status
                assert time.monotonic() < deadline, status
                time.sleep(0.02)
            os.killpg(gpu.pid, signal.SIGKILL)
            gpu.wait(timeout=10)
        landed = client.get(status_url).json()
        assert landed["status"] == "running" and 0 < landed["progress"] < 1, landed
        # The dead worker's heartbeat has stopped; after a lease the reconciler sends the job
        # again, and a new worker takes it over.
        with celery_worker(settings, "gpu", concurrency=1, log_path=tmp_path / "gpu-2.log"):
            deadline = time.monotonic() + 60
            while not reconcile_once(settings).video_jobs_redriven:
                assert time.monotonic() < deadline, "the reconciler never re-drove the job"
                time.sleep(0.5)
            seen = poll_job(client, status_url)
        assert seen[-1]["status"] == "done", seen[-1]
        assert without_timing(seen[-1]["result"]) == without_timing(direct(settings, data))
    with session_scope(settings) as session:
        row = session.scalars(
            sql_select(VideoSearchJob).where(VideoSearchJob.id == job["job_id"])
        ).one()
        assert row.attempts == 2 and row.status == "done" and row.blob_key is None
    assert rows(settings, row.sha256) == 1
