"""Validate and decode downloaded bytes into an upright RGB image.

Everything a catalog throws at us ends as either a ``DecodedImage`` or an ``ImageFailure``
with a precise reason; nothing here mutates Pillow's process-wide settings, so decoding is
safe from many download threads at once.
"""

from __future__ import annotations

import io
import zlib
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

    Format, dimensions, orientation and the pixel cap come from the header. JPEG and PNG, the
    formats of nearly every catalog, are then checked without decoding a pixel: a JPEG must end
    its scan with the end-of-image marker (a truncated download does not), a PNG's chunks must
    all be present with matching CRCs up to IEND. Damage that only a decode can find (a
    corrupt scan of the right length) is found by the vision stage, which decodes every image
    anyway, and ends in the same reason, ``corrupt_image``. Other formats are decoded.
    Images too thin for the models fail BAD_GEOMETRY (``geometry``: the process settings'
    limits when not given).
    """
    with _open_checked(data, max_pixels) as im:
        width, height = im.size
        check_geometry(width, height, geometry)
        fmt = str(im.format)
        if fmt in ("JPEG", "MPO"):
            _check_jpeg_complete(data)
        elif fmt == "PNG":
            _check_png_chunks(data)  # before EXIF: reading a PNG's eXIf walks its chunks
        else:
            _load(im)
        orientation = _orientation(im)
    if orientation in (5, 6, 7, 8):  # rotated a quarter turn: upright width is stored height
        width, height = height, width
    return ImageInfo(format=fmt, width=width, height=height)


def _orientation(im: Image.Image) -> int:
    # Broken EXIF is common in the wild and says nothing about the pixels: upright, then.
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1


_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length


def _check_jpeg_complete(data: bytes) -> None:
    """Walk the JPEG's segments to its first scan; an end-of-image marker must follow it."""
    size = len(data)
    pos = 2  # past SOI
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            raise ImageFailure(FailureReason.CORRUPT_IMAGE, f"bad JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: the entropy-coded data follows its header
            scan = pos + 2 + length
            if scan <= size and data.rfind(b"\xff\xd9", scan) != -1:
                return
            break
        if length < 2:
            raise ImageFailure(FailureReason.CORRUPT_IMAGE, f"bad JPEG segment at byte {pos}")
        pos += 2 + length
    raise ImageFailure(FailureReason.CORRUPT_IMAGE, "truncated JPEG: the scan has no end marker")


def _check_png_chunks(data: bytes) -> None:
    """Every chunk complete with a matching CRC, up to IEND (zlib.crc32 runs in C)."""
    pos, size = 8, len(data)
    while pos + 12 <= size:
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > size:
            break
        kind = data[pos + 4 : pos + 8]
        if zlib.crc32(memoryview(data)[pos + 4 : end]) != int.from_bytes(
            data[end : end + 4], "big"
        ):
            raise ImageFailure(
                FailureReason.CORRUPT_IMAGE, f"PNG chunk {kind.decode('latin-1')} fails its CRC"
            )
        if kind == b"IEND":
            return
        pos = end + 4
    raise ImageFailure(FailureReason.CORRUPT_IMAGE, "truncated PNG: no IEND chunk")


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
