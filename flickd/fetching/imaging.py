"""Validate and decode downloaded bytes into an upright RGB image.

Everything a catalog throws at us ends as either a ``DecodedImage`` or an ``ImageFailure``
with a precise reason; nothing here mutates Pillow's process-wide settings, so decoding is
safe from many download threads at once.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import cast

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from flickd.core.reasons import FailureReason, ImageFailure
from flickd.fetching.geometry import GeometryLimits, check_geometry

# MPO is what JPEG cameras write for multi-picture files; its first frame is a plain JPEG.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
# The Pillow openers to try. MPO has no opener of its own: the JPEG one returns MPO files.
_OPENERS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Magic numbers of things that are images (or image-like documents) we do not accept. Used only
# to name the failure: Pillow is never asked to parse them (some of its plugins, EPS above all,
# do far more than read a header).
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"\xff\x0a", "JXL"),
    (b"\x00\x00\x00\x0cJXL ", "JXL"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
)
_ALLOWED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_ISO_BMFF_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC",
                    b"mif1": "HEIF", b"msf1": "HEIF", b"hevc": "HEIC"}  # fmt: skip


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # mode RGB, EXIF orientation applied
    format: str  # Pillow's format name, e.g. "JPEG"
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """Best guess at the format from magic bytes alone; None when nothing matches."""
    head = data[:64]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return _ISO_BMFF_BRANDS.get(head[8:12])
    for magic, name in _ALLOWED_MAGIC + _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return name
    text = head.lstrip().lower()
    if text.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:2048].lower():
        return "SVG"
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<")):
        return "HTML"
    return None


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode ``data`` to an upright RGB image of at most ``max_pixels`` pixels.

    Raises ImageFailure: NOT_AN_IMAGE, UNSUPPORTED_FORMAT, DECOMPRESSION_BOMB, CORRUPT_IMAGE.
    """
    with _open_checked(data, max_pixels) as im:
        _load(im)  # first frame only: Pillow opens multi-frame files positioned on frame 0
        fmt = str(im.format)
        upright = _exif_transpose(im)
    rgb = to_rgb(upright)
    return DecodedImage(image=rgb, format=fmt, width=rgb.width, height=rgb.height)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int  # upright, after EXIF orientation
    height: int


def validate_image(
    data: bytes, max_pixels: int, geometry: GeometryLimits | None = None
) -> ImageInfo:
    """The checks of ``decode_image`` at a fraction of the cost, for the download stage.

    JPEGs are decoded at 1/8 scale (``draft``): libjpeg still reads every entropy-coded byte,
    so a truncated or corrupt file fails just the same, but the inverse DCT and colour
    conversion, most of the CPU time, shrink 64-fold. Nothing is converted to RGB.
    Images too thin for the models fail BAD_GEOMETRY (``geometry``: the process settings'
    limits when not given).
    """
    with _open_checked(data, max_pixels) as im:
        width, height = im.size
        check_geometry(width, height, geometry)
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        if im.format in ("JPEG", "MPO"):
            im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        _load(im)
        fmt = str(im.format)
    if orientation in (5, 6, 7, 8):  # rotated a quarter turn: upright width is stored height
        width, height = height, width
    return ImageInfo(format=fmt, width=width, height=height)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open ``data`` and refuse empty input and over-large images before decoding a pixel."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global Pillow switch we rely on but never flip: with it on, truncated files decode
        # half grey instead of failing. Someone else turned it on; refuse loudly.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    if not data:
        raise ImageFailure(FailureReason.NOT_AN_IMAGE, "empty body")
    im = _open(data)
    try:
        _check_size(im, max_pixels)
    except ImageFailure:
        im.close()
        raise
    return im


def _open(data: bytes) -> Image.Image:
    try:
        # Restricting formats keeps Pillow's other parsers away from untrusted bytes.
        return Image.open(io.BytesIO(data), formats=_OPENERS)
    except Image.DecompressionBombError as exc:
        raise ImageFailure(FailureReason.DECOMPRESSION_BOMB, str(exc)) from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as exc:  # a recognised header that its plugin then chokes on
        raise ImageFailure(FailureReason.CORRUPT_IMAGE, f"unreadable header: {exc}") from None


def _unidentified(data: bytes) -> ImageFailure:
    sniffed = sniff_format(data)
    if sniffed is None or sniffed == "HTML":
        what = "looks like HTML" if sniffed else f"unrecognised data ({len(data)} bytes)"
        return ImageFailure(FailureReason.NOT_AN_IMAGE, what)
    if sniffed in ALLOWED_FORMATS:  # right magic, unparseable header
        return ImageFailure(FailureReason.CORRUPT_IMAGE, f"bad {sniffed} header")
    return ImageFailure(FailureReason.UNSUPPORTED_FORMAT, sniffed)


def _check_size(im: Image.Image, max_pixels: int) -> None:
    """Refuse huge images from the header, before a single pixel is decoded.

    Pillow itself only *warns* between MAX_IMAGE_PIXELS and twice that; turning the warning
    into an error would need warnings.catch_warnings, which is not thread-safe. So the same
    limit is applied here by reading (never writing) Pillow's global.
    """
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, Image.MAX_IMAGE_PIXELS)
    width, height = im.size
    if width * height > limit:
        raise ImageFailure(
            FailureReason.DECOMPRESSION_BOMB,
            f"{width}x{height} = {width * height} pixels exceeds {limit}",
        )


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageFailure(FailureReason.DECOMPRESSION_BOMB, str(exc)) from None
    except Exception as exc:  # truncated data, bad checksums, broken streams: all corrupt
        raise ImageFailure(FailureReason.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}") from None


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation; returns a new image either way (the source file is closed)."""
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:
        # Broken EXIF is common in the wild and says nothing about the pixels: keep them as is.
        return im.copy()
    return upright if upright is not None else im.copy()


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a viewer would show it."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scale_to_8bit(im).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _flatten(im.convert("RGBA"))
    try:
        # CMYK (Pillow already undid Adobe's inversion when reading), P, L, 1, YCbCr, RGBX.
        return im.convert("RGB")
    except ValueError as exc:  # e.g. LAB, which needs a colour-management profile
        raise ImageFailure(FailureReason.UNSUPPORTED_FORMAT, f"mode {mode}: {exc}") from None


def _flatten(rgba: Image.Image) -> Image.Image:
    """Composite over white: product shots with alpha are meant to sit on a white page."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """Map high-bit-depth samples into 0..255 by range, not by clipping.

    A plain convert("L") clips every 16-bit value above 255 to white.
    """
    wide = im.convert("F")
    low, high = cast("tuple[float, float]", wide.getextrema())  # one band: mode F
    if im.mode.startswith("I;16") or (im.mode == "I" and 255 < high <= 65535 and low >= 0):
        scale, offset = 255 / 65535, 0.0  # 16-bit data: keep its absolute brightness
    elif im.mode == "F" and low >= 0 and high <= 1.0:
        scale, offset = 255.0, 0.0  # normalised floats
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0
    else:  # arbitrary range: stretch what is there
        span = (high - low) or 1.0
        scale, offset = 255 / span, -low * 255 / span
    return wide.point(lambda v: v * scale + offset + 0.5).convert("L")
