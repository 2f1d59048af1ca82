"""Bytes of bad and awkward inputs, for tests, benchmarks and the fault server.

Each function returns a complete payload. The odd ones are what real catalogs serve: CMYK
JPEGs from print pipelines, 16-bit PNGs, camera photos with EXIF rotation, HTML error pages
labelled image/jpeg, truncated uploads, and the occasional decompression bomb.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache

from PIL import Image

RGB = tuple[int, int, int]


def jpeg(color: RGB = (200, 40, 40), size: tuple[int, int] = (64, 48), quality: int = 90) -> bytes:
    """A small valid baseline JPEG of one colour."""
    return _save(Image.new("RGB", size, color), "JPEG", quality=quality)


def png(color: RGB = (40, 160, 40), size: tuple[int, int] = (32, 32)) -> bytes:
    return _save(Image.new("RGB", size, color), "PNG")


def noisy_jpeg(size: tuple[int, int] = (256, 256), seed: int = 7) -> bytes:
    """A JPEG with real entropy-coded data (a flat colour compresses to almost nothing)."""
    return _save(_noise(size, seed), "JPEG", quality=90)


def truncated_jpeg(keep: float = 0.6) -> bytes:
    """A JPEG cut off mid-scan: the header parses, decoding runs out of data."""
    data = noisy_jpeg()
    return data[: int(len(data) * keep)]


def corrupt_png() -> bytes:
    """A PNG whose image data is garbage (valid signature and IHDR, bad zlib stream)."""
    data = bytearray(png(size=(64, 64)))
    idat = data.index(b"IDAT")
    for i in range(idat + 8, min(idat + 40, len(data) - 12)):
        data[i] ^= 0x5A
    return bytes(data)


@lru_cache(maxsize=4)
def decompression_bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A ~50 KB PNG that claims width x height pixels (400 M by default), all black.

    Written by hand: 1-bit greyscale rows of zeros compress ~1000:1, so the file stays small
    while building it never holds a decoded image in memory.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    chunks = [comp.compress(row) for _ in range(height)]
    chunks.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit, greyscale
    return _png_file(ihdr, b"".join(chunks))


def png16(value: int = 0x8000, size: tuple[int, int] = (16, 16)) -> bytes:
    """A 16-bit greyscale PNG of one value (0x8000 = mid-grey), written by hand.

    Hand-written so the file really is 16 bits per sample whatever Pillow's save path does.
    """
    width, height = size
    row = b"\x00" + struct.pack(">H", value) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return _png_file(ihdr, zlib.compress(row * height))


def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (0, 128, 255, 0), size=(32, 32)) -> bytes:
    """A CMYK JPEG. Pillow writes it Photoshop-style: Adobe APP14 marker, inverted values.

    The default (0, 128, 255, 0) is an orange, roughly RGB (255, 127, 0).
    """
    return _save(Image.new("CMYK", size, cmyk), "JPEG", quality=95)


def palette_png_with_transparency(size: tuple[int, int] = (32, 32)) -> bytes:
    """Palette PNG: left half transparent (index 0, stored as pure green), right half red.

    Decoding must show white on the left: the green must never leak through.
    """
    im = Image.new("P", size, 0)
    im.putpalette([0, 255, 0, 255, 0, 0] + [0, 0, 0] * 254)
    w, h = size
    im.paste(1, (w // 2, 0, w, h))
    return _save(im, "PNG", transparency=0)


def rgba_png(size: tuple[int, int] = (16, 16)) -> bytes:
    """Fully transparent black RGBA: composited over white it must come out white."""
    return _save(Image.new("RGBA", size, (0, 0, 0, 0)), "PNG")


def la_png(size: tuple[int, int] = (16, 16)) -> bytes:
    """Greyscale+alpha, half-transparent black: over white it is mid-grey."""
    return _save(Image.new("LA", size, (0, 128)), "PNG")


def bilevel_png(size: tuple[int, int] = (16, 16)) -> bytes:
    """A mode "1" image, all white."""
    return _save(Image.new("1", size, 1), "PNG")


def float_tiff(value: float = 0.5, size: tuple[int, int] = (8, 8)) -> bytes:
    """A 32-bit float TIFF (mode "F") with samples in 0..1, as scientific tools write them."""
    return _save(Image.new("F", size, value), "TIFF")


def animated_gif(colors: tuple[RGB, ...] = ((255, 0, 0), (0, 0, 255)), size=(16, 16)) -> bytes:
    """An animated GIF whose frames are the given colours; the first frame is what counts."""
    frames = [Image.new("RGB", size, c) for c in colors]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def animated_webp(colors: tuple[RGB, ...] = ((0, 200, 0), (0, 0, 255)), size=(16, 16)) -> bytes:
    frames = [Image.new("RGB", size, c) for c in colors]
    buf = io.BytesIO()
    frames[0].save(
        buf, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True
    )
    return buf.getvalue()


def exif_rotated_jpeg(size: tuple[int, int] = (60, 40), orientation: int = 6) -> bytes:
    """Stored landscape (60x40: left half red, right half blue) with EXIF orientation 6.

    Orientation 6 means "rotate 90° clockwise to display", so the decoded image is 40x60
    portrait with red on top and blue below.
    """
    w, h = size
    im = Image.new("RGB", size, (255, 0, 0))
    im.paste((0, 0, 255), (w // 2, 0, w, h))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation tag
    return _save(im, "JPEG", quality=95, exif=exif.tobytes())


def mpo_image(colors: tuple[RGB, ...] = ((250, 250, 0), (0, 0, 255)), size=(24, 16)) -> bytes:
    """A multi-picture JPEG (what stereo and some phone cameras write); frame 0 is the photo."""
    frames = [Image.new("RGB", size, c) for c in colors]
    buf = io.BytesIO()
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:], quality=95)
    return buf.getvalue()


def html_page() -> bytes:
    """What a CDN returns for a missing image, often with Content-Type: image/jpeg."""
    return (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
        b"<body><h1>Not Found</h1><p>The requested image is unavailable.</p></body></html>\n"
    )


def ico_image() -> bytes:
    """A favicon: a real image format, but not one a catalog photo should be."""
    return _save(Image.new("RGB", (32, 32), (10, 20, 30)), "ICO", sizes=[(32, 32)])


def pdf_document() -> bytes:
    """The start of a PDF (spec sheets get linked as product images)."""
    return b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"


def tiff_image(color: RGB = (30, 60, 90), size: tuple[int, int] = (16, 16)) -> bytes:
    return _save(Image.new("RGB", size, color), "TIFF")


# --- helpers ---------------------------------------------------------------------------------


def _save(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    # Deterministic pseudo-random bytes without numpy: a cheap LCG.
    w, h = size
    state = seed
    out = bytearray(w * h * 3)
    for i in range(len(out)):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        out[i] = state >> 23
    return Image.frombytes("RGB", size, bytes(out))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_file(ihdr: bytes, idat: bytes) -> bytes:
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )
