"""Bytes to text: opening (possibly compressed) feed files, decoding, and values as text.

Every value a feed holds is read as text, whatever the format stored it as, so that "007"
stays "007" and one set of validation rules covers every format.
"""

from __future__ import annotations

import codecs
import json
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Final

import pyarrow as pa

from producer.feeds.errors import FeedError

# --------------------------------------------------------------------------------------------
# Compressed and plain input streams
# --------------------------------------------------------------------------------------------

COMPRESSIONS: Final = {"gz": "gzip", "gzip": "gzip", "bz2": "bz2", "zst": "zstd"}
PREFIX_BYTES: Final = 1 << 20  # enough for any sane header line and delimiter sniffing


def open_input(path: Path, compression: str | None) -> pa.NativeFile:
    try:
        return pa.input_stream(str(path), compression=compression)
    except (OSError, pa.ArrowException) as exc:
        raise FeedError(f"cannot open feed file {path}: {exc}") from exc


def read_prefix(path: Path, compression: str | None) -> bytes:
    with open_input(path, compression) as stream:
        try:
            return stream.read(PREFIX_BYTES)
        except (OSError, pa.ArrowException) as exc:
            raise FeedError(f"cannot read feed file {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Text decoding: UTF-8 with a per-byte legacy fallback
# --------------------------------------------------------------------------------------------
# Feeds exported from Windows tools are often cp1252 (or a mix: a UTF-8 file with a few pasted
# Latin-1 rows). Decoding every byte sequence that is valid UTF-8 as UTF-8 and only the invalid
# bytes as cp1252 (latin-1 for the 5 bytes cp1252 leaves undefined) keeps both kinds of rows
# intact and never fails. pyarrow takes only a codec *name* for transcoding, so the scheme is
# registered as a codec.

_LEGACY_ERRORS: Final = "flickd-cp1252-fallback"
SAFE_UTF8: Final = "flickd_utf8_cp1252"
UTF16: Final = "utf-16"  # BOM-detected; Excel's "Unicode text" export


def _legacy_bytes(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    chars = []
    for byte in bad:
        try:
            chars.append(bytes([byte]).decode("cp1252"))
        except UnicodeDecodeError:
            chars.append(chr(byte))  # latin-1
    return "".join(chars), exc.end


class _SafeUtf8Decoder(codecs.BufferedIncrementalDecoder):
    def _buffer_decode(self, input: Any, errors: str, final: bool) -> tuple[str, int]:
        return codecs.utf_8_decode(input, _LEGACY_ERRORS, final)


def _find_codec(name: str) -> codecs.CodecInfo | None:
    if name.replace("-", "_") != SAFE_UTF8:
        return None
    return codecs.CodecInfo(
        name=SAFE_UTF8,
        encode=codecs.utf_8_encode,
        decode=lambda data, errors="strict": codecs.utf_8_decode(data, _LEGACY_ERRORS, True),
        incrementaldecoder=_SafeUtf8Decoder,
    )


codecs.register_error(_LEGACY_ERRORS, _legacy_bytes)
codecs.register(_find_codec)


def decode(data: bytes) -> str:
    return data.decode("utf-8", _LEGACY_ERRORS)


def decode_array(arr: pa.Array) -> pa.Array:
    """A binary Arrow array as text, with the same fallback."""
    try:
        return arr.cast(pa.string())  # valid UTF-8: no copy through Python
    except pa.ArrowInvalid:
        return pa.array([None if v is None else decode(v) for v in arr.to_pylist()], pa.string())


# --------------------------------------------------------------------------------------------
# Python values as text (JSON Lines records, Parquet fallbacks, XLSX cells)
# --------------------------------------------------------------------------------------------


def json_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    # Lists (e.g. several image URLs) and objects stay JSON text; the URL column parses lists.
    return json.dumps(value, ensure_ascii=False)


def python_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return decode(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list | dict | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return json_text(value)
