"""Open a video query and sample its frames: PyAV (FFmpeg) decoding under hard caps.

``open_video`` names the container from its magic bytes and opens it with exactly that FFmpeg
demuxer: FFmpeg never probes untrusted bytes with all of its demuxers (some of which, HLS
playlists above all, open further URLs or files), and a path is read through a Python file
object, so a "path" like ``http://…`` is never handed to FFmpeg's protocols. Whatever goes
wrong ends as a :class:`VideoFailure` with a reason from :mod:`flickd.core.reasons`; no PyAV
exception leaves this module.

Sampling (:meth:`VideoStream.frames`) keeps at most ``max_fps`` frames per second, plus the
frame at each scene change: a cut, a frame that drifted ``scene_threshold`` (colour-histogram
distance of small thumbnails) from the last kept one, or the frame where a gradual transition
(a cross-fade) settles on a new picture; the frames inside a transition are no scene change
and are not analysed (``flickd/fetching/scenes.py`` says how and why). The first frame is kept
and marked a scene change (it starts the first scene). These sampled frames are the clip's
time grid: a product's time range is read off them. Only some of them are *analysed*
(``SampledFrame.analyse``; the models see those, and cost about a second each on a 2-core
CPU): every scene change, and between scene
changes a frame that moved since the last analysed frame (the mean absolute difference of the
grey thumbnails is at least ``motion_threshold``; 0 analyses every sampled frame), or that
comes ``1/min_fps`` seconds after it. The frames in between are cheap evidence that the shot
goes on: video search carries the last analysed frame's items over them
(``models.tracks.Tracker.carry``), so a product held on screen for three seconds is analysed
once yet its range still spans the shot to within one sampled frame. On the synthetic clips
(slow pans and zooms, mild noise) frames half a second apart within a shot differ by
0.013-0.06, and across a cut by 0.12-0.28. On bench/video.py's 60 s 720p clip (30 shots, 137
sampled frames, 34 scene changes) a threshold of 0.06 analyses 61 frames, 0.10 (the default)
39 and 0.15 36: a shot's pan or zoom rarely drifts 0.10 from its first frame, and analysing
fewer frames lost no recall there (0.77 at 0.10 against 0.67 with the old gate's 75 frames;
a track's mean over fewer, sharper members matched no worse). Those counts are from before
cross-fades were told from cuts; since, the clip has 134 sampled frames, 30 scene changes (one
per shot) and 35 analysed at 0.10.

Why every frame is decoded, with no keyframe seeking: a scene change can happen at any frame,
so every frame has to be looked at, and an inter-coded frame cannot be decoded without the
frames it refers to since the last keyframe anyway. Measured with PyAV 18 on an 8 s 720p x264
clip (veryfast preset, B-frames, 200 frames) on this project's 2-core machine: decoding every
frame took 0.39 s; skipping non-reference frames (``skip_frame="NONREF"`` / ``"BIDIR"``) saved
nothing (0.48-0.52 s, with a third of the frames unseen); keyframes only (``"NONKEY"``) took
0.06 s but saw 1 frame of the 200 (x264's default GOP is 250 frames), so every cut between
keyframes would be missed. What does pay is converting only the kept frames to full-size RGB
(about 9 ms a 720p frame): every other frame yields just a 48-pixel-wide thumbnail, scaled
by libswscale (about 0.5 ms).

Broken input, and what it becomes:

* bytes of no video container (a JPEG, HTML, text) -> ``not_a_video``; audio-only files ->
  ``no_video_stream``; a codec FFmpeg has no decoder for -> ``unsupported_codec``, named;
* an MP4/MOV without its ``moov`` atom (or any recognised container FFmpeg cannot open) ->
  ``truncated_video``;
* a stream that stops before the end its header promises (a cut download): the frames before
  the cut are returned and ``report.truncated`` and a note say where it stopped; when no frame
  decoded at all, ``frames()`` raises ``truncated_video``;
* packets that fail to decode mid-stream are skipped and counted (``report.corrupt_packets``,
  and a note); when no frame at all decodes, ``frames()`` raises ``no_decodable_frames``;
* a frame over ``max_pixels`` -> ``video_too_large``, from the stream header before a frame is
  decoded; frames that grow past the cap mid-stream are skipped and noted;
* more than ``max_bytes`` (a file or bytes source) -> ``too_large``; longer than
  ``max_seconds`` or more than ``max_frames`` sampled frames: analysed up to the cap,
  ``report.cut_at_s`` and a note say so.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import av
import av.error
import numpy as np
from PIL import Image

from flickd.core.reasons import FailureReason, ImageFailure
from flickd.core.settings import Settings
from flickd.fetching.fetch import HttpClient, fetch
from flickd.fetching.imaging import sniff_format
from flickd.fetching.scenes import SceneDetector, histogram, thumbnail

# A video URL is a query someone waits for: one retry, as for image URLs.
VIDEO_URL_ATTEMPTS = 2
# A stream whose last packet ends this many frame intervals (or 0.25 s, if more) before the
# duration its header declares was cut short.
TRUNCATION_SLACK_FRAMES = 2
# Past this many decoded frames the clip is cut even if its timestamps never reach
# max_seconds (a stream with broken or constant timestamps must not decode for ever).
MAX_SOURCE_FPS = 240

# FFmpeg demuxer per container magic. Only these are ever opened.
_ISO_BMFF_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1", b"hevc"}
_ISO_BMFF_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}
_AUDIO_FORMATS = frozenset({"mp3", "aac", "wav", "flac"})
# FFmpeg's own names for the demuxers (PyAV reports the short name it was asked to open).
_DEMUXER_NAMES = {"mov": "mov,mp4,m4a,3gp,3g2,mj2", "matroska": "matroska,webm"}


class VideoFailure(ImageFailure):
    """A video query cannot be analysed; ``reason`` and ``detail`` say why."""


@dataclass(frozen=True)
class VideoLimits:
    max_fps: float
    scene_threshold: float
    max_seconds: float
    max_frames: int
    max_pixels: int
    max_bytes: int
    motion_threshold: float = 0.0  # 0: every sampled frame is analysed
    min_fps: float = 0.0  # 0: no refresh; a still scene is analysed once

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoLimits:
        return cls(
            max_fps=settings.video_max_fps,
            scene_threshold=settings.video_scene_threshold,
            max_seconds=settings.video_max_seconds,
            max_frames=settings.video_max_frames,
            max_pixels=settings.video_max_pixels,
            max_bytes=settings.video_max_upload_bytes,
            motion_threshold=settings.video_motion_threshold,
            min_fps=settings.video_min_fps,
        )


@dataclass(frozen=True)
class VideoInfo:
    container: str  # PyAV's demuxer name: "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "gif"
    codec: str  # "h264", "vp9", "gif" …
    width: int
    height: int
    duration_s: float | None
    fps: float | None


@dataclass(frozen=True)
class SampledFrame:
    index: int  # 0, 1, 2 … among the sampled frames
    frame_number: int  # position of the frame among the frames the decoder produced
    timestamp: float  # seconds from the start of the stream
    image: Image.Image  # RGB
    scene_change: bool  # the first frame, and each frame that starts a new scene
    # Whether the models should see it: a scene change, or a frame that moved or aged enough
    # since the last analysed one. The others only say that the last analysed frame's items
    # are still on screen.
    analyse: bool = True


@dataclass
class DecodeReport:
    """Filled in while :meth:`VideoStream.frames` runs; complete once it is exhausted."""

    frames_decoded: int = 0
    frames_sampled: int = 0
    frames_analysed: int = 0  # sampled frames marked ``analyse``
    corrupt_packets: int = 0  # skipped, decoding went on
    cut_at_s: float | None = None  # analysis stopped at the duration/frame cap here
    notes: list[str] = field(default_factory=list)  # sentences for the user
    truncated: bool = False  # the stream stopped before the end its header declares
    scene_changes: int = 0  # sampled frames marked scene_change (the first frame included)


def sniff_container(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file starting with ``head`` (64 bytes do), or None."""
    if head[4:8] in _ISO_BMFF_BOXES:
        if head[4:8] == b"ftyp" and head[8:12] in _ISO_BMFF_IMAGE_BRANDS:
            return None  # AVIF/HEIC still images share the container
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"FLV\x01"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "mp3"
    if head[:2] in (b"\xff\xf1", b"\xff\xf9"):
        return "aac"  # ADTS
    return None


def open_video(source: str | Path | bytes | BinaryIO, limits: VideoLimits) -> VideoStream:
    """Open ``source`` (a path, the bytes, or a seekable binary file) for :meth:`frames`.

    Raises VideoFailure at once for not_a_video, truncated_video (no moov atom),
    no_video_stream (audio only), unsupported_codec, video_too_large (pixels from the stream
    header) and too_large (more than ``limits.max_bytes``).
    """
    fileobj, owned = _binary_file(source, limits.max_bytes)
    try:
        return _open(fileobj, owned, limits)
    except BaseException:
        if owned:
            fileobj.close()
        raise


def _binary_file(source: str | Path | bytes | BinaryIO, max_bytes: int) -> tuple[BinaryIO, bool]:
    """A seekable file object for ``source``, size-checked; True when we must close it."""
    if isinstance(source, bytes | bytearray | memoryview):
        size = len(source)
        fileobj: BinaryIO = io.BytesIO(bytes(source))
        owned = True
    elif isinstance(source, str | Path):
        try:
            size = os.stat(source).st_size
            fileobj = open(source, "rb")  # noqa: SIM115  # closed by VideoStream.close
        except OSError as exc:
            raise VideoFailure(FailureReason.NOT_A_VIDEO, f"cannot read {source}: {exc}") from None
        owned = True
    elif source.seekable():
        start = source.tell()
        size = source.seek(0, io.SEEK_END) - start
        source.seek(start)
        fileobj, owned = source, False
    else:  # a pipe or socket: the demuxers need to seek, so hold it in memory, capped
        data = source.read(max_bytes + 1)
        size = len(data)
        fileobj, owned = io.BytesIO(data), True
    if size > max_bytes:
        if owned:
            fileobj.close()
        raise VideoFailure(FailureReason.TOO_LARGE, f"{size} bytes exceeds {max_bytes} bytes")
    return fileobj, owned


def _open(fileobj: BinaryIO, owned: bool, limits: VideoLimits) -> VideoStream:
    start = fileobj.tell()
    head = fileobj.read(512)
    fileobj.seek(start)
    demuxer = sniff_container(head)
    if demuxer is None:
        raise VideoFailure(FailureReason.NOT_A_VIDEO, _what_it_is(head))
    try:
        container = av.open(fileobj, mode="r", format=demuxer)
    except av.error.FFmpegError as exc:
        if demuxer in _AUDIO_FORMATS:
            raise VideoFailure(
                FailureReason.NO_VIDEO_STREAM, f"an unreadable {demuxer} audio file"
            ) from None
        hint = " (no moov atom)" if demuxer == "mov" else ""
        raise VideoFailure(
            FailureReason.TRUNCATED_VIDEO,
            f"FFmpeg cannot open this {_CONTAINER_NAMES.get(demuxer, demuxer)} file{hint}, "
            f"it is cut short or damaged: {_ffmpeg_message(exc)}",
        ) from None
    try:
        stream = _video_stream(container, fileobj, demuxer)
        info = _info(container, stream, demuxer)
        _check_pixels(info.width, info.height, limits.max_pixels)
    except BaseException:
        container.close()
        raise
    return VideoStream(container, stream, info, limits, fileobj if owned else None)


_CONTAINER_NAMES = {"mov": "MP4/MOV", "matroska": "WebM/Matroska", "gif": "GIF"}


def _what_it_is(head: bytes) -> str:
    if not head:
        return "empty file"
    sniffed = sniff_format(head)
    if sniffed == "HTML":
        return "looks like HTML, not a video"
    if sniffed is not None:
        return f"a {sniffed} image, not a video"
    return f"unrecognised data, not a video container ({head[:8]!r}…)"


def _video_stream(container: Any, fileobj: BinaryIO, demuxer: str) -> Any:
    streams = container.streams.video
    if not container.streams:  # the header lists nothing: it is cut off inside the header
        raise VideoFailure(
            FailureReason.TRUNCATED_VIDEO,
            f"this {_CONTAINER_NAMES.get(demuxer, demuxer)} file lists no streams: it is cut "
            "short or damaged",
        )
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        raise VideoFailure(
            FailureReason.NO_VIDEO_STREAM, f"the file holds {', '.join(kinds)}, no video"
        )
    for stream in streams:  # the first one we can decode (cover art in MP4s comes later)
        if stream.codec_context is not None:
            stream.thread_type = "AUTO"  # frame and slice threads, as FFmpeg sees fit
            return stream
    fourcc = _sample_entry_fourcc(fileobj) if demuxer == "mov" else None
    named = f" '{fourcc}'" if fourcc else ""
    raise VideoFailure(
        FailureReason.UNSUPPORTED_CODEC,
        f"the video codec{named} in this {_CONTAINER_NAMES.get(demuxer, demuxer)} file has no "
        "decoder in FFmpeg",
    )


def _sample_entry_fourcc(fileobj: BinaryIO) -> str | None:
    """The codec fourcc of the first sample description in an MP4/MOV (for the message)."""
    fileobj.seek(0)
    data = fileobj.read(8 * 1024 * 1024)  # moov is at the front of web MP4s; else no name
    at = data.find(b"stsd")
    if at < 0 or at + 20 > len(data):
        return None
    code = data[at + 16 : at + 20]
    return code.decode("latin-1") if code.isascii() and code.isalnum() else None


def _info(container: Any, stream: Any, demuxer: str) -> VideoInfo:
    ctx = stream.codec_context
    duration: float | None = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return VideoInfo(
        container=_DEMUXER_NAMES.get(demuxer, demuxer),
        codec=ctx.name,
        width=int(ctx.width or 0),
        height=int(ctx.height or 0),
        duration_s=duration if duration and duration > 0 else None,
        fps=float(rate) if rate else None,
    )


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise VideoFailure(
            FailureReason.VIDEO_TOO_LARGE,
            f"{width}x{height} = {width * height} pixels a frame exceeds {max_pixels}",
        )


def _ffmpeg_message(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc)[:300]


class VideoStream:
    """An opened video: :attr:`info` now, sampled frames from :meth:`frames` (once).

    A context manager; :meth:`close` releases the container (and a file opened from a path).
    """

    def __init__(
        self,
        container: Any,
        stream: Any,
        info: VideoInfo,
        limits: VideoLimits,
        owned_file: BinaryIO | None,
    ) -> None:
        self.info = info
        self.limits = limits
        self.report = DecodeReport()
        self._container = container
        self._stream = stream
        self._owned_file = owned_file
        self._started = False

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()
        if self._owned_file is not None:
            self._owned_file.close()
            self._owned_file = None

    def frames(self) -> Iterator[SampledFrame]:
        """The sampled frames, in order. Raises VideoFailure (no_decodable_frames,
        truncated_video, video_too_large) only when no frame at all could be yielded."""
        if self._started:
            raise RuntimeError("VideoStream.frames() can be iterated only once")
        self._started = True
        return _Sampler(self._stream, self.info, self.limits, self.report).run(self._container)


@dataclass(frozen=True)
class _Pending:
    frame: Any  # the decoded PyAV frame
    number: int
    time: float
    hist: np.ndarray  # colour histogram of its thumbnail
    thumb: np.ndarray  # the thumbnail (its grey is made only for a frame kept)
    step: float  # distance from the frame decoded before


class _Sampler:
    """One pass over the stream: demux, decode, skip what is broken, keep what is wanted."""

    def __init__(
        self, stream: Any, info: VideoInfo, limits: VideoLimits, report: DecodeReport
    ) -> None:
        self.stream = stream
        self.info = info
        self.limits = limits
        self.report = report
        self.time_base = stream.time_base
        start = stream.start_time
        self.start_s = float(start * stream.time_base) if start is not None else None
        self.frame_interval = 1.0 / info.fps if info.fps else 1 / 25
        self.min_gap = 1.0 / limits.max_fps if limits.max_fps > 0 else math.inf
        self.max_decoded = int(max(1.0, limits.max_seconds) * MAX_SOURCE_FPS)
        self.packets = 0  # with data, sent to the decoder
        self.decode_errors = 0
        self.oversized = 0
        self.last_packet_end: float | None = None
        self.last_time: float | None = None
        self.last_kept_time: float | None = None
        self.last_analysed_time: float | None = None
        self.last_analysed_grey: np.ndarray | None = None
        self.max_still = 1.0 / limits.min_fps if limits.min_fps > 0 else math.inf
        self.scenes = SceneDetector(limits.scene_threshold)  # flickd/fetching/scenes.py
        self.pending: _Pending | None = None  # the last decoded frame, judged after the next
        self.read_error: str | None = None
        self.stopped = False  # a cap ended the analysis

    # --- the pass --------------------------------------------------------------------------

    def run(self, container: Any) -> Iterator[SampledFrame]:
        packets = container.demux(self.stream)
        while not self.stopped:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as exc:  # the container breaks off (a cut download)
                self.read_error = _ffmpeg_message(exc)
                yield from self._decode(None)  # flush what the decoder holds
                break
            if packet.size:
                self.packets += 1
                self._note_packet_end(packet)
            yield from self._decode(packet)
        yield from self._flush()
        self._finish()

    def _decode(self, packet: Any) -> Iterator[SampledFrame]:
        try:
            frames = self.stream.codec_context.decode(packet)
        except av.error.FFmpegError:
            self.decode_errors += 1
            return
        for frame in frames:
            sampled = self._consider(frame)
            if sampled is not None:
                yield sampled
            if self.stopped:
                return

    def _flush(self) -> Iterator[SampledFrame]:
        """The last decoded frame, held back for its successor's step (there is none)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            sampled = self._decide(pending, None)
            if sampled is not None:
                yield sampled

    def _note_packet_end(self, packet: Any) -> None:
        if packet.pts is None or self.time_base is None:
            return
        end = float((packet.pts + (packet.duration or 0)) * self.time_base)
        if self.last_packet_end is None or end > self.last_packet_end:
            self.last_packet_end = end

    # --- one decoded frame -----------------------------------------------------------------

    def _consider(self, frame: Any) -> SampledFrame | None:
        report, limits = self.report, self.limits
        t = self._timestamp(frame)
        if t >= limits.max_seconds:
            self._cut(limits.max_seconds, "duration")
            return None
        if report.frames_decoded >= self.max_decoded:
            self._cut(t, "decoded")
            return None
        number = report.frames_decoded
        report.frames_decoded += 1
        self.last_time = t
        if frame.width * frame.height > limits.max_pixels:
            self.oversized += 1
            return None
        thumb = thumbnail(frame)
        hist = histogram(thumb)
        current = _Pending(frame, number, t, hist, thumb, self.scenes.step(hist))
        pending, self.pending = self.pending, current
        return None if pending is None else self._decide(pending, current.step)

    def _decide(self, pending: _Pending, next_step: float | None) -> SampledFrame | None:
        """Keep (or not) a decoded frame, once its successor's step is known."""
        report, limits = self.report, self.limits
        frame, number, t, hist = pending.frame, pending.number, pending.time, pending.hist
        verdict = self.scenes.judge(hist, pending.step, next_step)
        scene = verdict.scene_change
        due = self.last_kept_time is None or (
            t - self.last_kept_time >= self.min_gap - self.frame_interval / 2
        )
        if not (scene or due):
            return None
        if report.frames_sampled >= limits.max_frames:
            self._cut(t, "frames")
            return None
        grey = pending.thumb.mean(axis=2)
        # A frame inside a transition shows no scene of its own: analysed only when stale.
        analyse = scene or self._moved_or_stale(grey, t, verdict.transition)
        try:
            image = frame.to_image()  # RGB24
        except (av.error.FFmpegError, ValueError):
            self.decode_errors += 1
            return None
        sampled = SampledFrame(
            index=report.frames_sampled,
            frame_number=number,
            timestamp=t,
            image=image if image.mode == "RGB" else image.convert("RGB"),
            scene_change=scene,
            analyse=analyse,
        )
        report.frames_sampled += 1
        report.frames_analysed += int(analyse)
        report.scene_changes += int(scene)
        self.last_kept_time = t
        self.scenes.kept(hist)
        if analyse:
            self.last_analysed_time, self.last_analysed_grey = t, grey
        return sampled

    def _moved_or_stale(self, grey: np.ndarray, t: float, transition: bool) -> bool:
        """Whether a sampled frame within a scene is worth analysing: the picture moved since
        the last analysed frame (not counting frames inside a transition), or that frame is
        older than 1/min_fps."""
        threshold = self.limits.motion_threshold
        if threshold <= 0 or self.last_analysed_grey is None or self.last_analysed_time is None:
            return True
        if t - self.last_analysed_time >= self.max_still - self.frame_interval / 2:
            return True
        if transition:
            return False
        return float(np.abs(grey - self.last_analysed_grey).mean()) / 255 >= threshold

    def _timestamp(self, frame: Any) -> float:
        raw = frame.time
        if raw is None:  # no timestamps: count frames at the nominal rate
            previous = self.last_time
            return 0.0 if previous is None else previous + self.frame_interval
        if self.start_s is None:
            self.start_s = float(raw)
        return max(0.0, float(raw) - self.start_s)

    def _cut(self, at: float, cap: str) -> None:
        if self.report.cut_at_s is not None:  # a second cap, on the held-back frame
            return
        self.stopped = True
        self.report.cut_at_s = round(at, 3)
        total = f" of {self.info.duration_s:.1f} s" if self.info.duration_s else ""
        if cap == "duration":
            why = f"the duration cap is {self.limits.max_seconds:g} s"
        elif cap == "decoded":
            why = f"{self.max_decoded} frames decoded, more than {MAX_SOURCE_FPS} a second"
        else:
            why = f"the cap is {self.limits.max_frames} sampled frames"
        self.report.notes.append(f"analysed the first {at:.1f} s{total}: {why}")

    # --- the end of the stream -------------------------------------------------------------

    def _finish(self) -> None:
        report = self.report
        lost = 0
        if not self.stopped:
            # One packet, one picture, in every container we accept: packets that gave none
            # were corrupt, or depended on a frame that was (decoders drop such frames
            # silently; FFmpeg's VP9 decoder reports no error at all).
            lost = max(0, self.packets - report.frames_decoded)
        report.corrupt_packets = max(self.decode_errors, lost)
        truncated_at = self._truncation()
        if truncated_at is not None:
            report.truncated = True
        if report.frames_sampled == 0:
            self._raise_nothing_decoded(truncated_at)
        if report.corrupt_packets:
            report.notes.insert(
                0,
                f"skipped {report.corrupt_packets} corrupt packet"
                f"{'s' if report.corrupt_packets != 1 else ''} (they did not decode, or "
                "depended on one that did not); decoding went on",
            )
        if truncated_at is not None:
            report.notes.append(truncated_at)
        if self.oversized:
            report.notes.append(
                f"skipped {self.oversized} frames over the pixel cap of {self.limits.max_pixels}"
            )

    def _truncation(self) -> str | None:
        """A sentence saying where the stream breaks off, or None when it is whole."""
        if self.stopped:
            return None
        if self.read_error is not None:
            return f"the file breaks off after {self._end_s():.1f} s ({self.read_error})"
        declared = self.info.duration_s
        end = self.last_packet_end
        if declared is None or end is None:
            return None
        if self.start_s is not None:
            end -= self.start_s
        slack = max(0.25, TRUNCATION_SLACK_FRAMES * self.frame_interval)
        if end < declared - slack:
            return (
                f"the stream stops at {end:.1f} s of the {declared:.1f} s its header declares: "
                "the file is cut short"
            )
        return None

    def _end_s(self) -> float:
        return self.last_time if self.last_time is not None else 0.0

    def _raise_nothing_decoded(self, truncated_at: str | None) -> None:
        if truncated_at is not None:
            raise VideoFailure(FailureReason.TRUNCATED_VIDEO, f"no frame decoded; {truncated_at}")
        if self.oversized:
            raise VideoFailure(
                FailureReason.VIDEO_TOO_LARGE,
                f"every frame exceeds the pixel cap of {self.limits.max_pixels}",
            )
        if self.packets == 0:
            detail = "the video stream holds no frames"
        else:
            detail = f"none of the stream's {self.packets} packets decoded to a frame"
        raise VideoFailure(FailureReason.NO_DECODABLE_FRAMES, detail)


# --- video URLs ------------------------------------------------------------------------------


def fetch_video(url: str, session: HttpClient, settings: Settings) -> bytes:
    """Download a video query through the SSRF guard and the image fetch code
    (:func:`flickd.fetching.fetch.fetch`), capped at ``video_max_upload_bytes`` while it
    streams in. Bytes that are no video container (HTML served as video/mp4, an image) are
    refused as not_a_video from their magic bytes, whatever the Content-Type said.

    Raises VideoFailure: the fetch's reasons (blocked_address, invalid_url, too_large,
    http_error, timeout, connection_error …) and not_a_video.
    """
    capped = settings.model_copy(
        update={
            "max_download_bytes": settings.video_max_upload_bytes,
            "max_attempts": min(settings.max_attempts, VIDEO_URL_ATTEMPTS),
        }
    )
    try:
        result = fetch(url, session, capped)
    except ImageFailure as failure:
        raise VideoFailure(
            failure.reason,
            failure.detail,
            retryable=failure.retryable,
            retry_after=failure.retry_after,
        ) from None
    content = result.content
    demuxer = sniff_container(content[:512])
    if demuxer is None:
        served = result.content_type or "no Content-Type"
        raise VideoFailure(
            FailureReason.NOT_A_VIDEO, f"{_what_it_is(content[:512])} (served as {served})"
        )
    return content
