"""Test videos made from catalog images, with the truth of which product is on screen when, and
the broken videos the decoder must survive.

:func:`make_clip` turns product images into a clip of shots, one per image, each one to three
seconds long: the image sits on a background of its own (a two-colour gradient whose hue is far
from the previous shot's), slowly pans or zooms, and every frame gets mild noise. Shots are
joined by hard cuts and at least one cross-fade, and encoded with PyAV to H.264 MP4 (web style:
``moov`` first), VP9 WebM, H.264 MOV or animated GIF. :class:`ClipTruth` records each shot's
time range. During a cross-fade both products are on screen (one fading out, one fading in), so
the truth counts the fade in both shots: the outgoing shot ends where the fade ends, the
incoming shot starts where it begins, and their ranges overlap by the fade.

The bad-video makers below take a good clip's bytes and break them in one precise way
(:func:`drop_moov`, :func:`cut_stream`, :func:`corrupt_packets`, :func:`undecodable`,
:func:`unknown_codec`), or make something that is no video (:func:`audio_only`,
:func:`not_a_video`). Everything is a pure function of its arguments and the seed.
"""

from __future__ import annotations

import colorsys
import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
from PIL import Image

from synthetic import faults
from synthetic.catalog import Catalog

Codec = Literal["h264", "vp9", "mov", "gif"]
TransitionKind = Literal["cut", "fade"]

# (container format, encoder, pixel format, file suffix) per codec name.
_ENCODINGS: dict[str, tuple[str, str, str, str]] = {
    "h264": ("mp4", "libx264", "yuv420p", ".mp4"),
    "vp9": ("webm", "libvpx-vp9", "yuv420p", ".webm"),
    "mov": ("mov", "libx264", "yuv420p", ".mov"),
    "gif": ("gif", "gif", "rgb8", ".gif"),  # FFmpeg's GIF encoder: 3-3-2 bit colour
}
SUFFIXES = {codec: enc[3] for codec, enc in _ENCODINGS.items()}
NOISE_SIGMA = 2.5  # grey levels: mild sensor noise
PRODUCT_HEIGHT = 0.78  # of the frame, at the start of a shot
PAN_SPAN = 0.12  # of the frame width, over a shot
ZOOM_SPAN = 0.15  # scale gained over a shot


@dataclass(frozen=True)
class Shot:
    product_id: str
    start_s: float  # first frame on screen
    end_s: float  # just after the last frame on screen (exclusive)


@dataclass(frozen=True)
class Transition:
    kind: TransitionKind
    start_s: float  # a cut: the first frame of the new shot; a fade: its first blended frame
    end_s: float  # a cut: the same; a fade: just after its last blended frame


@dataclass(frozen=True)
class ClipTruth:
    path: Path
    codec: str
    fps: float
    width: int
    height: int
    duration_s: float
    shots: tuple[Shot, ...]
    transitions: tuple[Transition, ...] = ()  # between shots i and i+1, in order
    frames: int = 0  # frames encoded

    def products_at(self, t: float) -> list[str]:
        """The products on screen at ``t`` seconds (two during a cross-fade)."""
        return [s.product_id for s in self.shots if s.start_s <= t < s.end_s]

    def cut_times(self) -> list[float]:
        return [tr.start_s for tr in self.transitions if tr.kind == "cut"]


@dataclass
class _ShotPlan:
    product_id: str
    image: Image.Image
    start: int  # frame numbers
    length: int
    background: np.ndarray  # H x W x 3 float32
    motion: Literal["pan", "zoom"]
    direction: float  # +1 or -1: pan right/left, zoom in/out


def catalog_images(
    catalog: Catalog, product_ids: Sequence[str] | None = None
) -> list[tuple[str, Image.Image]]:
    """``(product_id, first image)`` of each product (or of ``product_ids``, in that order),
    as :func:`make_clip` takes them."""
    by_id = {p.product_id: p for p in catalog.products}
    chosen = [by_id[pid] for pid in product_ids] if product_ids is not None else catalog.products
    return [(p.product_id, _load(catalog.image_path(p.images[0]))) for p in chosen]


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def make_clip(
    images: Sequence[tuple[str, Image.Image]],
    path: Path,
    *,
    codec: str = "h264",
    fps: float = 12,
    size: tuple[int, int] = (320, 240),
    shot_seconds: tuple[float, float] = (1.0, 3.0),
    crossfade_s: float = 0.5,
    seed: int = 0,
    transitions: Sequence[TransitionKind] | None = None,
    keyframe_interval: int | None = None,
) -> ClipTruth:
    """Encode one shot per ``(product_id, image)`` into ``path`` and return the truth.

    ``codec``: "h264" (MP4), "vp9" (WebM), "mov" (H.264 in MOV) or "gif"; ``path`` is written
    as given (:data:`SUFFIXES` holds the usual suffix). ``transitions`` picks cut or fade between
    each pair of shots; by default the second is a fade and the others cuts (the only one is a
    fade for two shots). ``keyframe_interval`` (frames; default two seconds) bounds how far a
    corrupt packet's damage reaches.
    """
    if codec not in _ENCODINGS:
        raise ValueError(f"codec must be one of {sorted(_ENCODINGS)}, got {codec!r}")
    if not images:
        raise ValueError("make_clip needs at least one image")
    width, height = size[0] - size[0] % 2, size[1] - size[1] % 2  # yuv420p needs even sides
    rng = np.random.default_rng(seed)
    kinds = _transition_kinds(len(images), transitions, crossfade_s)
    fade = max(1, round(crossfade_s * fps))
    plans = _plan_shots(images, kinds, fade, fps, (width, height), shot_seconds, rng)
    total = plans[-1].start + plans[-1].length
    frames = (_render_frame(plans, n, rng) for n in range(total))
    _encode(frames, path, codec, fps, (width, height), keyframe_interval or round(2 * fps))
    return ClipTruth(
        path=path,
        codec=codec,
        fps=fps,
        width=width,
        height=height,
        duration_s=total / fps,
        shots=tuple(Shot(p.product_id, p.start / fps, (p.start + p.length) / fps) for p in plans),
        transitions=tuple(
            Transition(
                kind,
                nxt.start / fps,
                (prev.start + prev.length) / fps if kind == "fade" else nxt.start / fps,
            )
            for kind, prev, nxt in zip(kinds, plans[:-1], plans[1:], strict=True)
        ),
        frames=total,
    )


def _transition_kinds(
    shots: int, given: Sequence[TransitionKind] | None, crossfade_s: float
) -> list[TransitionKind]:
    if given is not None:
        if len(given) != shots - 1:
            raise ValueError(f"{shots} shots need {shots - 1} transitions, got {len(given)}")
        return list(given)
    if crossfade_s <= 0:
        return ["cut"] * (shots - 1)
    fade_at = 1 if shots >= 3 else 0
    return ["fade" if i == fade_at else "cut" for i in range(shots - 1)]


def _plan_shots(
    images: Sequence[tuple[str, Image.Image]],
    kinds: list[TransitionKind],
    fade: int,
    fps: float,
    size: tuple[int, int],
    shot_seconds: tuple[float, float],
    rng: np.random.Generator,
) -> list[_ShotPlan]:
    plans: list[_ShotPlan] = []
    hue = float(rng.random())
    start = 0
    for i, (product_id, image) in enumerate(images):
        length = max(2, round(float(rng.uniform(*shot_seconds)) * fps))
        if i > 0:
            previous = plans[-1]
            overlap = fade if kinds[i - 1] == "fade" else 0
            # A fade takes at most half of either shot, so each shot has frames of its own.
            overlap = min(overlap, previous.length // 2, length // 2)
            start = previous.start + previous.length - overlap
            hue = (hue + float(rng.uniform(0.3, 0.7))) % 1.0  # far round the colour wheel
        plans.append(
            _ShotPlan(
                product_id=product_id,
                image=image.convert("RGB"),
                start=start,
                length=length,
                background=_background(size, hue, rng),
                motion="pan" if rng.random() < 0.5 else "zoom",
                direction=1.0 if rng.random() < 0.5 else -1.0,
            )
        )
    return plans


def _background(size: tuple[int, int], hue: float, rng: np.random.Generator) -> np.ndarray:
    """A diagonal two-tone gradient around ``hue``: saturated enough to tell shots apart."""
    width, height = size
    sat, val = float(rng.uniform(0.45, 0.8)), float(rng.uniform(0.45, 0.85))
    a = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255
    b = np.array(colorsys.hsv_to_rgb((hue + 0.06) % 1.0, sat * 0.8, min(1.0, val + 0.1))) * 255
    ys, xs = np.mgrid[0:height, 0:width]
    mix = ((xs / width + ys / height) / 2)[..., None]
    return (a * (1 - mix) + b * mix).astype(np.float32)


def footage_frame(
    image: Image.Image,
    size: tuple[int, int],
    rng: np.random.Generator,
    item: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One frame of a shot of ``image`` as :func:`make_clip` renders it, drawn at random (a
    background of a random hue, a pan or a zoom at a random point of the shot, sensor noise),
    and the product's box in it (x0, y0, x1, y1): the whole image's, or where ``item`` (a box
    in the image's pixels, such as the garment's ``CatalogImage.bbox``) lands."""
    plan = _ShotPlan(
        product_id="",
        image=image.convert("RGB"),
        start=0,
        length=100,
        background=_background(size, float(rng.random()), rng),
        motion="pan" if rng.random() < 0.5 else "zoom",
        direction=1.0 if rng.random() < 0.5 else -1.0,
    )
    frame, box = _placed(plan, int(rng.integers(0, 100)), item)
    return _with_noise(frame, rng), box


def _render_frame(plans: list[_ShotPlan], n: int, rng: np.random.Generator) -> np.ndarray:
    visible = [(i, p) for i, p in enumerate(plans) if p.start <= n < p.start + p.length]
    frame = _shot_frame(visible[-1][1], n)
    if len(visible) == 2:  # a cross-fade: the newer shot comes in over the older one
        (_, old), (_, new) = visible
        overlap = old.start + old.length - new.start
        alpha = (n - new.start + 1) / (overlap + 1)
        frame = _shot_frame(old, n) * (1 - alpha) + frame * alpha
    return _with_noise(frame, rng)


def _with_noise(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``frame`` (float) with mild sensor noise, as 8-bit pixels."""
    noisy = frame + rng.normal(0.0, NOISE_SIGMA, frame.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _shot_frame(plan: _ShotPlan, n: int) -> np.ndarray:
    """The shot's background with its product placed for frame ``n`` of the clip."""
    return _placed(plan, n)[0]


def _placed(
    plan: _ShotPlan, n: int, item: tuple[int, int, int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """:func:`_shot_frame` and where the product lies in it (x0, y0, x1, y1, clipped): the
    whole image, or ``item`` (a box in the image's pixels)."""
    height, width = plan.background.shape[:2]
    progress = (n - plan.start) / max(1, plan.length - 1)  # 0 .. 1 over the shot
    scale = 1.0
    shift = 0.0
    if plan.motion == "zoom":
        grow = progress if plan.direction > 0 else 1 - progress
        scale = 1.0 + ZOOM_SPAN * grow
    else:
        shift = plan.direction * PAN_SPAN * (progress - 0.5) * width
    image = plan.image
    fit = min(PRODUCT_HEIGHT * height / image.height, 0.8 * width / image.width) * scale
    w, h = max(1, round(image.width * fit)), max(1, round(image.height * fit))
    product = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    x0 = round((width - w) / 2 + shift)
    y0 = round((height - h) / 2)
    frame = plan.background.copy()
    # Paste what falls inside the frame (a zoomed product may overhang the edges).
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(width, x0 + w), min(height, y0 + h)
    frame[fy0:fy1, fx0:fx1] = product[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    if item is not None:
        ix0, iy0 = x0 + round(item[0] * w / image.width), y0 + round(item[1] * h / image.height)
        ix1, iy1 = x0 + round(item[2] * w / image.width), y0 + round(item[3] * h / image.height)
        fx0, fy0 = max(fx0, ix0), max(fy0, iy0)
        fx1, fy1 = max(fx0, min(fx1, ix1)), max(fy0, min(fy1, iy1))
    return frame, (fx0, fy0, fx1, fy1)


def _encode(
    frames: Any, path: Path, codec: str, fps: float, size: tuple[int, int], gop: int
) -> None:
    fmt, encoder, pix_fmt, _suffix = _ENCODINGS[codec]
    options = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format=fmt, options=options) as container:
        stream: Any = container.add_stream(encoder, rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        if encoder == "libx264":
            stream.options = {"preset": "veryfast", "crf": "20", "g": str(gop)}
        elif encoder == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "g": str(gop)}
            stream.bit_rate = 800_000
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# --- broken videos ---------------------------------------------------------------------------


def top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each top-level ISO-BMFF box of an MP4/MOV."""
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:  # 64-bit size follows
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:  # to the end of the file
            size = len(data) - pos
        if size < 8:
            break
        boxes.append((kind, pos, min(len(data), pos + size)))
        pos += size
    return boxes


def drop_moov(mp4: bytes) -> bytes:
    """The MP4/MOV without its ``moov`` atom: ``ftyp`` and the sample data, no index."""
    boxes = top_level_boxes(mp4)
    if not any(kind == b"moov" for kind, _, _ in boxes):
        raise ValueError("no moov atom to drop")
    return b"".join(mp4[start:end] for kind, start, end in boxes if kind != b"moov")


def cut_stream(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` of the bytes: a download cut off mid-way. For make_clip's MP4s
    (``moov`` first) and WebMs, the frames before the cut still decode."""
    return data[: int(len(data) * keep)]


def packet_layout(data: bytes) -> list[tuple[int, int, bool, float]]:
    """(byte offset of the coded frame, size, is keyframe, seconds) of each video packet.

    The offset is that of the packet's own bytes: in an MP4 the sample itself, in a WebM the
    frame inside its SimpleBlock (the demuxer's ``pos`` is the block's, and overwriting the
    block header would break the container rather than the frame)."""
    layout = []
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        base = stream.time_base or Fraction(1, 1)
        for p in container.demux(stream):
            if not p.size or p.pos is None or p.pos < 0 or p.pts is None:
                continue
            offset = data.find(bytes(p)[:64], p.pos)
            if offset < 0:
                raise ValueError(f"packet at {p.pts * base:.2f} s not found in the bytes")
            layout.append((offset, int(p.size), bool(p.is_keyframe), float(p.pts * base)))
    return layout


def corrupt_packets(data: bytes, at_s: float = 0.5, count: int = 3) -> bytes:
    """``count`` packets from the first non-key packet at or after ``at_s`` overwritten with
    0xFF bytes at their start (an impossible H.264 NAL length, an invalid VP9 frame marker):
    they fail to decode, frames that refer to them are damaged or lost, and decoding recovers
    at the next keyframe."""
    layout = packet_layout(data)
    first = next(i for i, (_, _, key, t) in enumerate(layout) if t >= at_s and not key)
    broken = bytearray(data)
    for pos, size, key, _t in layout[first : first + count]:
        if key:
            break  # keep the next keyframe: later frames must decode
        broken[pos : pos + min(size, 16)] = b"\xff" * min(size, 16)
    return bytes(broken)


def undecodable(data: bytes) -> bytes:
    """Every video packet overwritten as :func:`corrupt_packets` does: the container is whole,
    not one frame decodes."""
    broken = bytearray(data)
    for pos, size, _key, _t in packet_layout(data):
        broken[pos : pos + min(size, 16)] = b"\xff" * min(size, 16)
    return bytes(broken)


def unknown_codec(mp4: bytes, fourcc: bytes = b"zzzz") -> bytes:
    """The MP4 with its video sample entry renamed to a codec FFmpeg does not know."""
    at = mp4.find(b"stsd")
    if at < 0:
        raise ValueError("no sample description (stsd) box")
    return mp4[: at + 16] + fourcc + mp4[at + 20 :]


def audio_only(codec: Literal["aac", "opus"] = "aac", seconds: float = 1.0) -> bytes:
    """A tone with no video stream: AAC in an M4A (MP4) file, or Opus in a WebM."""
    fmt, encoder, sample_fmt = ("ipod", "aac", "fltp") if codec == "aac" else (
        "webm", "libopus", "s16")  # fmt: skip
    rate = 48_000
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream: Any = container.add_stream(encoder, rate=rate)
        stream.layout = "mono"
        chunk = stream.codec_context.frame_size or 960
        done = 0
        while done < seconds * rate:
            t = (np.arange(chunk) + done) / rate
            tone = 0.2 * np.sin(2 * np.pi * 440 * t)
            samples = tone.astype(np.float32) if sample_fmt == "fltp" else (
                tone * 32767).astype(np.int16)  # fmt: skip
            frame = av.AudioFrame.from_ndarray(samples[None, :], format=sample_fmt, layout="mono")
            frame.sample_rate = rate
            frame.pts = done
            for packet in stream.encode(frame):
                container.mux(packet)
            done += chunk
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def not_a_video() -> dict[str, bytes]:
    """Payloads that are no video at all, by name."""
    return {
        "jpeg": faults.jpeg(),
        "html": faults.html_page(),
        "text": b"ceci n'est pas une video\n" * 20,
        "empty": b"",
    }
