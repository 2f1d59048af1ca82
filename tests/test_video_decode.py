"""open_video / frames() / fetch_video with real PyAV decoding of synthetic clips: every format,
the sampling rule, each hard cap, every bad input of issue 10, and video URLs through the SSRF
guard against the loopback server."""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import av
import pytest
from PIL import Image

from flickd.core.reasons import FailureReason
from flickd.core.settings import Settings
from flickd.fetching.fetch import HttpClient, make_session
from flickd.fetching.video import (
    SampledFrame,
    VideoFailure,
    VideoLimits,
    fetch_video,
    open_video,
)
from synthetic.catalog import Catalog
from synthetic.server import CatalogServer
from synthetic.video import (
    SUFFIXES,
    ClipTruth,
    audio_only,
    corrupt_packets,
    cut_stream,
    drop_moov,
    make_clip,
    not_a_video,
    packet_layout,
    undecodable,
    unknown_codec,
)
from tests.conftest import catalog_fixture
from tests.conftest_download import make_settings

catalog = catalog_fixture(4, seed=5, dirname="video_catalog")

# The rate rule alone (no motion gate): every frame due at max_fps is kept and analysed.
LIMITS = dataclasses.replace(VideoLimits.from_settings(Settings()), motion_threshold=0.0)
FPS = 12
# (codec, container PyAV names, decoder)
FORMATS = [
    ("h264", "mov,mp4,m4a,3gp,3g2,mj2", "h264"),
    ("vp9", "matroska,webm", "vp9"),
    ("mov", "mov,mp4,m4a,3gp,3g2,mj2", "h264"),
    ("gif", "gif", "gif"),
]


@pytest.fixture(scope="module")
def clips(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ClipTruth]:
    """One clip of the four products per format: cut, fade, cut."""
    root = tmp_path_factory.mktemp("clips")
    images = [(p.product_id, Image.open(catalog.image_path(p.images[0]))) for p in catalog.products]
    made = {}
    for codec, _container, _decoder in FORMATS:
        size = (160, 120) if codec == "gif" else (320, 240)  # GIFs of noise are big
        made[codec] = make_clip(
            images, root / f"clip{SUFFIXES[codec]}", codec=codec, fps=FPS, size=size,
            shot_seconds=(1.2, 1.8), seed=1,
        )  # fmt: skip
    return made


@pytest.fixture(scope="module")
def mp4(clips: dict[str, ClipTruth]) -> bytes:
    return clips["h264"].path.read_bytes()


@pytest.fixture(scope="module")
def webm(clips: dict[str, ClipTruth]) -> bytes:
    return clips["vp9"].path.read_bytes()


def _decode(source: object, limits: VideoLimits = LIMITS) -> tuple[list[SampledFrame], object]:
    with open_video(source, limits) as video:  # type: ignore[arg-type]
        frames = list(video.frames())
        return frames, video


def _failure(source: object, limits: VideoLimits = LIMITS) -> VideoFailure:
    with pytest.raises(VideoFailure) as info:
        _decode(source, limits)
    return info.value


# --- formats and sampling --------------------------------------------------------------------


@pytest.mark.parametrize(("codec", "container", "decoder"), FORMATS)
def test_every_format_decodes_to_rgb_frames(
    clips: dict[str, ClipTruth], codec: str, container: str, decoder: str
) -> None:
    truth = clips[codec]
    with open_video(truth.path, LIMITS) as video:
        assert video.info.container == container
        assert video.info.codec == decoder
        assert (video.info.width, video.info.height) == (truth.width, truth.height)
        assert video.info.duration_s == pytest.approx(truth.duration_s, abs=0.05)
        frames = list(video.frames())
        report = video.report
    assert report.frames_decoded == truth.frames
    assert report.corrupt_packets == 0 and not report.truncated and report.notes == []
    assert report.frames_sampled == len(frames) >= truth.duration_s * LIMITS.max_fps
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(
        f.image.mode == "RGB" and f.image.size == (truth.width, truth.height) for f in frames
    )
    assert frames[0].timestamp == 0.0 and frames[0].scene_change
    numbers = [f.frame_number for f in frames]
    assert numbers == sorted(set(numbers)) and numbers[-1] < truth.frames


def test_bytes_and_file_objects_decode_like_the_path(
    mp4: bytes, clips: dict[str, ClipTruth]
) -> None:
    from_path, _ = _decode(clips["h264"].path)
    from_bytes, _ = _decode(mp4)
    from_file, _ = _decode(io.BytesIO(mp4))
    assert [f.frame_number for f in from_bytes] == [f.frame_number for f in from_path]
    assert [f.frame_number for f in from_file] == [f.frame_number for f in from_path]


@pytest.mark.parametrize("max_fps", [1.0, 2.0, 4.0])
def test_sampling_keeps_at_most_max_fps_frames_a_second(mp4: bytes, max_fps: float) -> None:
    # Scene changes off (a distance above 1 never happens): only the rate rule keeps frames.
    limits = dataclasses.replace(LIMITS, max_fps=max_fps, scene_threshold=1.01)
    frames, video = _decode(mp4, limits)
    gaps = [b.timestamp - a.timestamp for a, b in itertools.pairwise(frames)]
    step = round(FPS / max_fps) / FPS  # the source frame closest to each 1/max_fps
    assert all(gap == pytest.approx(step, abs=1e-6) for gap in gaps)
    duration = video.info.duration_s  # type: ignore[attr-defined]
    assert len(frames) == pytest.approx(duration * max_fps, abs=1)
    assert [f.scene_change for f in frames] == [True] + [False] * (len(frames) - 1)


def test_the_motion_gate_samples_a_still_scene_once_per_refresh_and_keeps_every_cut(
    clips: dict[str, ClipTruth], tmp_path: Path
) -> None:
    # One still shot (no pan, no zoom, no noise) then a cut to another.
    still = Image.new("RGB", (160, 120), (200, 40, 40))
    other = Image.new("RGB", (160, 120), (30, 60, 200))
    path = tmp_path / "still.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    for n in range(FPS * 6):  # 4 s still, then 2 s of the other colour
        picture = still if n < FPS * 4 else other
        for packet in stream.encode(av.VideoFrame.from_image(picture)):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    gated = dataclasses.replace(LIMITS, motion_threshold=0.06, min_fps=0.5)
    frames, video = _decode(path, gated)
    # Sampled as without the gate: every half second (the time grid a track's range is read
    # off) and at the cut; analysed: the first frame, a refresh every 2 s of stillness, and the
    # cut at 4 s. The others are carried (video search repeats the last analysed frame's items).
    assert [round(f.timestamp, 2) for f in frames] == [n / 2 for n in range(12)]
    assert [(round(f.timestamp, 2), f.scene_change) for f in frames if f.analyse] == [
        (0.0, True),
        (2.0, False),
        (4.0, True),
    ]
    assert video.report.frames_analysed == 3 and video.report.frames_sampled == 12  # type: ignore[attr-defined]
    ungated, _ = _decode(path, dataclasses.replace(LIMITS, max_fps=2.0))
    assert len(ungated) == 12 and all(f.analyse for f in ungated)  # without the gate: all
    # On a real shot (slow pans and zooms, noise) the gate still analyses every cut.
    truth = clips["h264"]
    kept, _ = _decode(truth.path, dataclasses.replace(LIMITS, motion_threshold=0.06, min_fps=0.25))
    rate_only, _ = _decode(truth.path)
    numbers = {f.frame_number for f in kept if f.scene_change and f.analyse}
    assert all(round(cut * FPS) in numbers for cut in truth.cut_times())
    assert [f.frame_number for f in kept] == [f.frame_number for f in rate_only]
    assert sum(f.analyse for f in kept) < len(rate_only)


def test_a_frame_is_kept_at_each_cut_between_rate_samples(clips: dict[str, ClipTruth]) -> None:
    truth = clips["h264"]
    frames, _ = _decode(truth.path)
    kept = {f.frame_number: f for f in frames}
    for cut in truth.cut_times():
        first = round(cut * FPS)  # the new shot's first frame
        assert first in kept and kept[first].scene_change, f"no scene change at the cut {cut}"
    # Apart from the scene changes, kept frames are at least 1/max_fps apart.
    for before, frame in itertools.pairwise(frames):
        if not frame.scene_change:
            assert frame.timestamp - before.timestamp >= 0.5 - 0.5 / FPS


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_a_cross_fade_is_one_scene_change_where_it_settles_and_its_blends_are_not_analysed(
    clips: dict[str, ClipTruth], codec: str
) -> None:
    """Every frame sampled (max_fps = the clip's rate), the motion gate on: the frames that
    blend two shots are sampled (the time grid) but are no scene change and are not analysed;
    the first frame after the fade that shows the new shot alone starts the scene."""
    truth = clips[codec]
    (fade,) = [t for t in truth.transitions if t.kind == "fade"]
    limits = dataclasses.replace(LIMITS, max_fps=FPS, motion_threshold=0.10)
    frames, _ = _decode(truth.path, limits)
    blended = [f for f in frames if fade.start_s - 1e-6 <= f.timestamp < fade.end_s - 1e-6]
    assert len(blended) == round((fade.end_s - fade.start_s) * FPS)
    assert not any(f.scene_change or f.analyse for f in blended)
    after = [f for f in frames if f.timestamp >= fade.end_s - 1e-6]
    # The first frame after the fade shows the new shot alone: the next one barely differs.
    assert after[0].scene_change and after[0].analyse
    assert after[0].timestamp == pytest.approx(fade.end_s, abs=1e-3)
    # The cuts are still scene changes at their first frame.
    kept = {f.frame_number: f for f in frames}
    assert all(kept[round(cut * FPS)].scene_change for cut in truth.cut_times())


# --- caps ------------------------------------------------------------------------------------


def test_a_clip_over_the_duration_cap_is_analysed_up_to_the_cap(mp4: bytes) -> None:
    frames, video = _decode(mp4, dataclasses.replace(LIMITS, max_seconds=2.0))
    report = video.report  # type: ignore[attr-defined]
    assert report.cut_at_s == 2.0
    assert frames and max(f.timestamp for f in frames) < 2.0
    assert max(f.timestamp for f in frames) >= 2.0 - 0.5  # it did analyse up to the cap
    assert report.frames_decoded == 2 * FPS
    assert any("first 2.0 s" in note and "duration cap is 2 s" in note for note in report.notes)


def test_a_clip_within_the_duration_cap_is_not_cut(mp4: bytes) -> None:
    _, video = _decode(mp4, dataclasses.replace(LIMITS, max_seconds=60.0))
    assert video.report.cut_at_s is None  # type: ignore[attr-defined]


def test_the_frame_cap_stops_sampling_and_says_where(mp4: bytes) -> None:
    frames, video = _decode(mp4, dataclasses.replace(LIMITS, max_frames=3))
    report = video.report  # type: ignore[attr-defined]
    assert len(frames) == report.frames_sampled == 3
    assert report.cut_at_s is not None and report.cut_at_s > frames[-1].timestamp
    assert any("3 sampled frames" in note for note in report.notes)


def test_frames_over_the_pixel_cap_are_refused_from_the_header(mp4: bytes) -> None:
    pixels = 320 * 240
    failure = _failure(mp4, dataclasses.replace(LIMITS, max_pixels=pixels - 1))
    assert failure.reason is FailureReason.VIDEO_TOO_LARGE
    assert "320x240" in failure.detail and str(pixels - 1) in failure.detail
    frames, _ = _decode(mp4, dataclasses.replace(LIMITS, max_pixels=pixels))  # at the cap: fine
    assert frames


def test_sources_over_the_byte_cap_are_too_large(mp4: bytes, clips: dict[str, ClipTruth]) -> None:
    limits = dataclasses.replace(LIMITS, max_bytes=len(mp4) - 1)
    for source in (mp4, clips["h264"].path, io.BytesIO(mp4)):
        failure = _failure(source, limits)
        assert failure.reason is FailureReason.TOO_LARGE
        assert str(len(mp4)) in failure.detail
    assert _decode(mp4, dataclasses.replace(limits, max_bytes=len(mp4)))[0]


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "what"), [
    ("jpeg", "JPEG image"), ("html", "HTML"), ("text", "unrecognised"), ("empty", "empty"),
])  # fmt: skip
def test_what_is_not_a_video_is_refused(name: str, what: str) -> None:
    failure = _failure(not_a_video()[name])
    assert failure.reason is FailureReason.NOT_A_VIDEO
    assert what in failure.detail


def test_an_mp4_without_its_moov_atom_is_truncated(mp4: bytes) -> None:
    failure = _failure(drop_moov(mp4))
    assert failure.reason is FailureReason.TRUNCATED_VIDEO
    assert "moov" in failure.detail


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_a_stream_cut_mid_way_returns_the_frames_before_the_cut(
    clips: dict[str, ClipTruth], codec: str
) -> None:
    data = clips[codec].path.read_bytes()
    whole, _ = _decode(data)
    frames, video = _decode(cut_stream(data, 0.5))
    report = video.report  # type: ignore[attr-defined]
    assert report.truncated
    assert any("cut short" in note for note in report.notes)
    assert 0 < len(frames) < len(whole)
    assert frames[-1].timestamp < clips[codec].duration_s * 0.8
    # What was decoded is what the whole file holds at those times.
    assert [f.frame_number for f in frames] == [f.frame_number for f in whole[: len(frames)]]


def test_a_stream_cut_before_its_first_frame_is_truncated(mp4: bytes) -> None:
    layout = packet_layout(mp4)
    failure = _failure(mp4[: layout[0][0] + layout[0][1] // 2])  # half the first packet
    assert failure.reason is FailureReason.TRUNCATED_VIDEO
    assert "cut short" in failure.detail


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_corrupt_packets_mid_stream_are_skipped_counted_and_decoding_goes_on(
    clips: dict[str, ClipTruth], codec: str
) -> None:
    truth = clips[codec]
    data = truth.path.read_bytes()
    frames, video = _decode(corrupt_packets(data, at_s=1.0, count=3))
    report = video.report  # type: ignore[attr-defined]
    assert report.corrupt_packets >= 3
    assert f"skipped {report.corrupt_packets} corrupt packets" in report.notes[0]
    assert not report.truncated
    assert report.frames_decoded == truth.frames - report.corrupt_packets
    # Frames after the damage decode, to the end of the clip.
    assert frames[-1].timestamp > truth.duration_s - 0.6
    assert sum(f.timestamp > 1.5 for f in frames) >= 2 * (truth.duration_s - 1.5) - 1


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_a_video_with_no_decodable_frame(clips: dict[str, ClipTruth], codec: str) -> None:
    failure = _failure(undecodable(clips[codec].path.read_bytes()))
    assert failure.reason is FailureReason.NO_DECODABLE_FRAMES
    assert f"{clips[codec].frames} packets" in failure.detail


@pytest.mark.parametrize("codec", ["aac", "opus"])
def test_an_audio_only_file_has_no_video_stream(codec: str) -> None:
    failure = _failure(audio_only(codec))  # type: ignore[arg-type]
    assert failure.reason is FailureReason.NO_VIDEO_STREAM
    assert "audio" in failure.detail


def test_an_unknown_codec_is_named(mp4: bytes) -> None:
    failure = _failure(unknown_codec(mp4, b"zzzz"))
    assert failure.reason is FailureReason.UNSUPPORTED_CODEC
    assert "'zzzz'" in failure.detail


@pytest.mark.parametrize("codec", ["h264", "vp9", "gif"])
def test_no_cut_of_a_clip_lets_a_pyav_error_escape(clips: dict[str, ClipTruth], codec: str) -> None:
    data = clips[codec].path.read_bytes()
    for keep in (0.001, 0.01, 0.03, 0.1, 0.3, 0.6, 0.9, 0.99):
        try:
            frames, _ = _decode(cut_stream(data, keep))
        except VideoFailure as failure:
            assert failure.reason in {FailureReason.TRUNCATED_VIDEO,
                                      FailureReason.NO_DECODABLE_FRAMES}  # fmt: skip
        else:
            assert frames


def test_frames_can_be_iterated_only_once(mp4: bytes) -> None:
    with open_video(mp4, LIMITS) as video:
        list(video.frames())
        with pytest.raises(RuntimeError):
            video.frames()


# --- video URLs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[CatalogServer]:
    with CatalogServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def url_settings() -> Settings:
    return make_settings(max_download_bytes=64 * 1024, video_max_upload_bytes=1024 * 1024)


@pytest.fixture(scope="module")
def session(url_settings: Settings) -> Iterator[HttpClient]:
    with make_session(url_settings) as s:
        yield s


def test_a_video_url_downloads_the_clip(
    server: CatalogServer, session: HttpClient, url_settings: Settings, mp4: bytes
) -> None:
    # Bigger than the image cap (max_download_bytes), within the video cap.
    assert url_settings.max_download_bytes < len(mp4) < url_settings.video_max_upload_bytes
    url = server.serve_bytes("clip.mp4", mp4, "video/mp4")
    data = fetch_video(url, session, url_settings)
    assert data == mp4
    frames, _ = _decode(data)
    assert frames


def test_a_video_url_the_guard_blocks_is_never_connected(
    session: HttpClient, connections: list[str]
) -> None:
    failure = None
    with pytest.raises(VideoFailure) as info:
        fetch_video("http://169.254.169.254/clip.mp4", session, make_settings())
    failure = info.value
    assert failure.reason is FailureReason.BLOCKED_ADDRESS
    assert "169.254.169.254" in failure.detail
    assert connections == []


def test_loopback_is_blocked_unless_allowed(server: CatalogServer, mp4: bytes) -> None:
    url = server.serve_bytes("guarded.mp4", mp4, "video/mp4")
    settings = make_settings(allowed_networks=[])
    with make_session(settings) as s, pytest.raises(VideoFailure) as info:
        fetch_video(url, s, settings)
    assert info.value.reason is FailureReason.BLOCKED_ADDRESS


def test_html_served_as_video_mp4_is_not_a_video(
    server: CatalogServer, session: HttpClient, url_settings: Settings
) -> None:
    url = server.serve_bytes("page.mp4", not_a_video()["html"], "video/mp4")
    with pytest.raises(VideoFailure) as info:
        fetch_video(url, session, url_settings)
    assert info.value.reason is FailureReason.NOT_A_VIDEO
    assert "HTML" in info.value.detail and "video/mp4" in info.value.detail


def test_an_oversized_video_url_is_refused(
    server: CatalogServer, session: HttpClient, mp4: bytes
) -> None:
    settings = make_settings(video_max_upload_bytes=len(mp4) // 2)
    url = server.serve_bytes("big.mp4", mp4, "video/mp4")
    with pytest.raises(VideoFailure) as info:
        fetch_video(url, session, settings)
    assert info.value.reason is FailureReason.TOO_LARGE  # from Content-Length, unread
    # Without a Content-Length the cap is counted while the body streams in.
    with pytest.raises(VideoFailure) as info:
        fetch_video(server.url("fault/huge?bytes=4000000"), session, settings)
    assert info.value.reason is FailureReason.TOO_LARGE
    assert f"body exceeds {len(mp4) // 2} bytes" in info.value.detail


def test_a_missing_path_is_reported(tmp_path: Path) -> None:
    failure = _failure(tmp_path / "nope.mp4")
    assert failure.reason is FailureReason.NOT_A_VIDEO
    assert "nope.mp4" in failure.detail
