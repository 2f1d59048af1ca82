"""decode_image on every awkward input a catalog serves."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageFile

from flickd.core.reasons import FailureReason, ImageFailure
from flickd.fetching.imaging import ALLOWED_FORMATS, decode_image, sniff_format, to_rgb
from synthetic import faults

LIMIT = 50_000_000


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def _reason(data: bytes, max_pixels: int = LIMIT) -> ImageFailure:
    with pytest.raises(ImageFailure) as info:
        decode_image(data, max_pixels)
    return info.value


# --- good images -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt", "size", "color"),
    [
        (faults.jpeg((200, 40, 40), (64, 48)), "JPEG", (64, 48), (200, 40, 40)),
        (faults.png((40, 160, 40), (32, 20)), "PNG", (32, 20), (40, 160, 40)),
        (faults.tiff_image((30, 60, 90)), "TIFF", (16, 16), (30, 60, 90)),
        (faults.mpo_image(), "MPO", (24, 16), (250, 250, 0)),
    ],
)
def test_plain_images(
    data: bytes, fmt: str, size: tuple[int, int], color: tuple[int, int, int]
) -> None:
    decoded = decode_image(data, LIMIT)
    assert decoded.format == fmt and decoded.format in ALLOWED_FORMATS
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == decoded.image.size == size
    assert _close(decoded.image.getpixel((1, 1)), color)


def test_bmp() -> None:
    im = Image.new("RGB", (8, 4), (1, 2, 3))
    buf = io.BytesIO()
    im.save(buf, "BMP")
    decoded = decode_image(buf.getvalue(), LIMIT)
    assert (decoded.format, decoded.image.getpixel((0, 0))) == ("BMP", (1, 2, 3))


def test_cmyk_jpeg_colours_survive() -> None:
    # Pillow writes Adobe-style inverted CMYK; a naive reader gets the complementary colour.
    decoded = decode_image(faults.cmyk_jpeg((0, 128, 255, 0)), LIMIT)
    assert _close(decoded.image.getpixel((5, 5)), (255, 127, 0), tolerance=8)


@pytest.mark.parametrize(("value", "grey"), [(0x8000, 128), (0xFFFF, 255), (0, 0), (0x4000, 64)])
def test_16bit_png_is_scaled_not_clipped(value: int, grey: int) -> None:
    decoded = decode_image(faults.png16(value), LIMIT)
    assert _close(decoded.image.getpixel((3, 3)), (grey, grey, grey), tolerance=1)


def test_palette_transparency_becomes_white() -> None:
    image = decode_image(faults.palette_png_with_transparency((32, 32)), LIMIT).image
    assert image.getpixel((2, 2)) == (255, 255, 255)  # not the green stored under index 0
    assert image.getpixel((30, 2)) == (255, 0, 0)


def test_alpha_is_composited_over_white() -> None:
    assert decode_image(faults.rgba_png(), LIMIT).image.getpixel((0, 0)) == (255, 255, 255)
    # Black at alpha 128 over white: mid-grey.
    assert _close(decode_image(faults.la_png(), LIMIT).image.getpixel((0, 0)), (127,) * 3, 2)


def test_bilevel_and_float_modes() -> None:
    assert decode_image(faults.bilevel_png(), LIMIT).image.getpixel((0, 0)) == (255, 255, 255)
    assert _close(decode_image(faults.float_tiff(0.5), LIMIT).image.getpixel((0, 0)), (128,) * 3, 1)


@pytest.mark.parametrize(
    ("data", "first"),
    [
        (faults.animated_gif(((255, 0, 0), (0, 0, 255))), (255, 0, 0)),
        (faults.animated_webp(((0, 200, 0), (0, 0, 255))), (0, 200, 0)),
    ],
)
def test_animated_images_give_their_first_frame(data: bytes, first: tuple[int, ...]) -> None:
    assert _close(decode_image(data, LIMIT).image.getpixel((8, 8)), first, tolerance=2)


def test_exif_orientation_is_applied() -> None:
    decoded = decode_image(faults.exif_rotated_jpeg((60, 40), orientation=6), LIMIT)
    assert (decoded.width, decoded.height) == (40, 60)  # stored landscape, shown portrait
    assert _close(decoded.image.getpixel((20, 5)), (255, 0, 0), 10)  # left half went on top
    assert _close(decoded.image.getpixel((20, 55)), (0, 0, 255), 10)


def test_i_mode_with_16bit_range_is_scaled() -> None:
    im = Image.new("I", (4, 4), 0x8000)  # what some TIFF readers produce for 16-bit data
    assert _close(to_rgb(im).getpixel((0, 0)), (128,) * 3, 1)


# --- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (b"", FailureReason.NOT_AN_IMAGE, "empty body"),
        (faults.html_page(), FailureReason.NOT_AN_IMAGE, "looks like HTML"),
        (b"\x00\x01garbage" * 50, FailureReason.NOT_AN_IMAGE, "unrecognised"),
        (faults.truncated_jpeg(), FailureReason.CORRUPT_IMAGE, "truncated"),
        (faults.corrupt_png(), FailureReason.CORRUPT_IMAGE, ""),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, FailureReason.CORRUPT_IMAGE, "PNG"),
        (faults.ico_image(), FailureReason.UNSUPPORTED_FORMAT, "ICO"),
        (faults.pdf_document(), FailureReason.UNSUPPORTED_FORMAT, "PDF"),
        (b"8BPS\x00\x01" + b"\x00" * 40, FailureReason.UNSUPPORTED_FORMAT, "PSD"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", FailureReason.UNSUPPORTED_FORMAT, "EPS"),
        (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 20, FailureReason.UNSUPPORTED_FORMAT, "AVIF"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', FailureReason.UNSUPPORTED_FORMAT, "SVG"),
    ],
)
def test_bad_inputs(data: bytes, reason: FailureReason, detail: str) -> None:
    failure = _reason(data)
    assert failure.reason is reason
    assert detail in failure.detail


def test_decompression_bomb_is_refused_from_the_header() -> None:
    data = faults.decompression_bomb_png(20_000, 20_000)
    assert len(data) < 100_000  # small file, 400 M pixels
    started = time.monotonic()
    assert _reason(data).reason is FailureReason.DECOMPRESSION_BOMB
    assert time.monotonic() - started < 0.5  # nothing was decoded


def test_our_pixel_limit_applies_below_pillows() -> None:
    failure = _reason(faults.decompression_bomb_png(2000, 1000), max_pixels=1_000_000)
    assert failure.reason is FailureReason.DECOMPRESSION_BOMB
    assert "2000x1000" in failure.detail
    assert decode_image(faults.jpeg(size=(1000, 1000)), 1_000_000).width == 1000  # at the limit


def test_pillows_warning_zone_is_an_error_too() -> None:
    # Between Pillow's MAX_IMAGE_PIXELS and twice that, Pillow only warns. A caller allowing
    # more pixels than Pillow does still gets a refusal, without any global being changed.
    side = 10_000  # 100 M pixels: above 89.5 M, below 179 M
    data = faults.decompression_bomb_png(side, side)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):
        failure = _reason(data, max_pixels=10**9)
    assert failure.reason is FailureReason.DECOMPRESSION_BOMB
    assert before == Image.MAX_IMAGE_PIXELS  # read, never written


def test_truncated_images_stay_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(faults.jpeg(), LIMIT)


def test_decoding_from_many_threads() -> None:
    inputs = [
        (faults.jpeg((200, 40, 40)), None),
        (faults.truncated_jpeg(), FailureReason.CORRUPT_IMAGE),
        (faults.decompression_bomb_png(3000, 3000), FailureReason.DECOMPRESSION_BOMB),
        (faults.cmyk_jpeg(), None),
        (faults.html_page(), FailureReason.NOT_AN_IMAGE),
    ] * 8

    def outcome(data: bytes) -> FailureReason | None:
        try:
            decode_image(data, 1_000_000)
        except ImageFailure as failure:
            return failure.reason
        return None

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(outcome, [d for d, _ in inputs]))
    assert got == [expected for _, expected in inputs]


# --- sniffing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (faults.jpeg(), "JPEG"),
        (faults.png(), "PNG"),
        (faults.animated_gif(), "GIF"),
        (faults.animated_webp(), "WEBP"),
        (faults.tiff_image(), "TIFF"),
        (faults.ico_image(), "ICO"),
        (faults.pdf_document(), "PDF"),
        (faults.html_page(), "HTML"),
        (b"\x00\x00\x00\x18ftypheic", "HEIC"),
        (b"plain text", None),
        (b"", None),
    ],
)
def test_sniff_format(data: bytes, name: str | None) -> None:
    assert sniff_format(data) == name


# --- validate_image: the download stage's cheaper check must agree with decode_image --------
@pytest.mark.parametrize(
    "make",
    [
        faults.truncated_jpeg,
        faults.decompression_bomb_png,
        faults.html_page,
        faults.ico_image,
        lambda: b"",
    ],
)
def test_validate_image_rejects_what_decode_rejects(make):
    from flickd.fetching.imaging import validate_image

    data = make()
    with pytest.raises(ImageFailure) as decoded:
        decode_image(data, 50_000_000)
    with pytest.raises(ImageFailure) as validated:
        validate_image(data, 50_000_000)
    assert validated.value.reason == decoded.value.reason


@pytest.mark.parametrize(
    "make", [faults.exif_rotated_jpeg, faults.cmyk_jpeg, faults.png16, faults.animated_gif]
)
def test_validate_image_sizes_match_decode(make):
    from flickd.fetching.imaging import validate_image

    data = make()
    full = decode_image(data, 50_000_000)
    info = validate_image(data, 50_000_000)
    assert (info.format, info.width, info.height) == (full.format, full.width, full.height)


# --- validate_image checks JPEG and PNG without decoding a pixel -------------------------------
def test_header_checks_find_truncation_and_bad_crcs_without_decoding():
    from flickd.fetching.imaging import validate_image

    png = faults.png(size=(40, 30))
    cases = {
        "truncated JPEG": faults.truncated_jpeg(0.9),
        "truncated PNG": png[: len(png) - 20],
        "PNG CRC": faults.corrupt_png(),
    }
    for name, data in cases.items():
        with pytest.raises(ImageFailure) as failure:
            validate_image(data, 50_000_000)
        assert failure.value.reason is FailureReason.CORRUPT_IMAGE, name
    # Bytes after the end-of-image marker are ignored, as by every decoder.
    info = validate_image(faults.jpeg(size=(64, 48)) + b"trailing junk", 50_000_000)
    assert (info.format, info.width, info.height) == ("JPEG", 64, 48)
