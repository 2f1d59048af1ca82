"""producer.feeds: every feed format, every bad input a retailer sends, and a 1M-row feed."""

from __future__ import annotations

import codecs
import gzip
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.feeds import (
    FeedChunk,
    FeedColumns,
    FeedError,
    InvalidURL,
    RejectedRow,
    RejectReason,
    delimited,
    detect_format,
    estimate_rows,
    normalize_url,
    read_feed,
    url_hash,
)
from producer.feeds.dedupe import SeenHashes as _SeenHashes
from producer.feeds.urls import _check_slow_urls

HEADER = "product_id,image_url,title,brand,category,price\n"


@dataclass
class Feed:
    """Everything read_feed yielded for one file, concatenated."""

    chunks: list[FeedChunk]

    @property
    def images(self) -> pd.DataFrame:
        return pd.concat([c.images for c in self.chunks], ignore_index=True)

    @property
    def rejected(self) -> list[RejectedRow]:
        return [r for c in self.chunks for r in c.rejected]

    @property
    def notes(self) -> list[RejectedRow]:
        return [r for c in self.chunks for r in c.notes]

    @property
    def rows_read(self) -> int:
        return sum(c.rows_read for c in self.chunks)

    @property
    def duplicates(self) -> int:
        return sum(c.duplicates for c in self.chunks)

    @property
    def blank(self) -> int:
        return sum(c.blank for c in self.chunks)

    def pairs(self) -> list[tuple[int, str, str]]:
        return list(self.images[["row_number", "product_id", "url"]].itertuples(index=False))

    def reasons(self) -> list[tuple[int, str]]:
        return [(r.row_number, r.reason.value) for r in self.rejected]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def read(path: Path, **kwargs: object) -> Feed:
    return Feed(list(read_feed(path, **kwargs)))  # type: ignore[arg-type]


def read_csv_text(tmp_path: Path, text: str, **kwargs: object) -> Feed:
    return read(write(tmp_path, "feed.csv", text), **kwargs)


@pytest.fixture(params=["pyarrow", "csv-module"])
def csv_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each delimited-text reader: pyarrow (fast; lines that do not fit the
    header come through its invalid-row handler) and the csv module, which read_feed picks
    when such lines are common."""
    monkeypatch.setattr(delimited, "_MAX_MISFITS", 1.0 if request.param == "pyarrow" else -1.0)
    return str(request.param)


# --- file-level errors ----------------------------------------------------------------------


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="not found"):
        read_feed(tmp_path / "nope.csv")


def test_empty_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="empty"):
        read_feed(write(tmp_path, "feed.csv", b""))


@pytest.mark.parametrize("content", [b"\n\n  \r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n"])
def test_file_without_header_row_raises(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(FeedError, match="no header row"):
        read_feed(write(tmp_path, "feed.csv", content))


@pytest.mark.parametrize("name", ["feed.json", "feed.xls", "feed", "feed.parquet.gz"])
def test_unknown_or_unsupported_format_raises(tmp_path: Path, name: str) -> None:
    with pytest.raises(FeedError, match=r"format|not supported"):
        read_feed(write(tmp_path, name, HEADER))


def test_explicit_format_overrides_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, "export.dat", "id;url\n1;https://a.com/1.jpg\n")
    assert read(path, fmt="csv").pairs() == [(1, "1", "https://a.com/1.jpg")]
    with pytest.raises(FeedError, match="unknown feed format 'xml'"):
        read_feed(path, fmt="xml")


@pytest.mark.parametrize("content", [HEADER, HEADER.strip(), HEADER.replace("\n", "\r\n")])
def test_header_only_yields_no_rows(tmp_path: Path, content: str) -> None:
    assert read_csv_text(tmp_path, content).chunks == []


def test_missing_id_column_raises_listing_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "feed.csv", "ean,image_url,title\n1,https://a.com/1.jpg,x\n")
    # Raised by the call itself, before the caller has started recording anything.
    with pytest.raises(FeedError, match="product-id") as info:
        read_feed(path)
    assert "'ean', 'image_url', 'title'" in str(info.value)


def test_missing_url_column_raises_listing_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "feed.csv", "product_id,picture\n1,https://a.com/1.jpg\n")
    with pytest.raises(FeedError, match="image-URL") as info:
        read_feed(path)
    assert "'product_id', 'picture'" in str(info.value)


def test_garbage_parquet_raises(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="Parquet"):
        read_feed(write(tmp_path, "feed.parquet", b"PAR1 this is not parquet at all" * 10))


def test_truncated_parquet_raises(tmp_path: Path) -> None:
    path = tmp_path / "feed.parquet"
    table = pa.table(
        {"product_id": [str(i) for i in range(1000)], "image_url": ["https://a.com/x"] * 1000}
    )
    pq.write_table(table, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeedError, match="truncated Parquet"):
        list(read_feed(path))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_truncated_gzip_raises(tmp_path: Path, fmt: str) -> None:
    # Varied URLs, so that half the compressed bytes really is half the data.
    frame = pd.DataFrame(
        {
            "product_id": [str(i) for i in range(100_000)],
            "image_url": [f"https://a.com/{i * 7919 % 100_003}.jpg" for i in range(100_000)],
        }
    )
    text = (
        frame.to_csv(index=False) if fmt == "csv" else frame.to_json(orient="records", lines=True)
    )
    data = gzip.compress(text.encode())
    path = write(tmp_path, f"feed.{fmt}.gz", data[: len(data) // 2])
    with pytest.raises(FeedError, match="Truncated compressed stream"):
        list(read_feed(path))


def test_garbage_xlsx_raises(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="XLSX"):
        read_feed(write(tmp_path, "feed.xlsx", b"PK\x03\x04 not really a zip" * 20))


def test_truncated_xlsx_raises(tmp_path: Path) -> None:
    path = tmp_path / "feed.xlsx"
    write_xlsx(
        path, [["product_id", "image_url"], *([str(i), f"https://a.com/{i}"] for i in range(500))]
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeedError, match="truncated XLSX"):
        list(read_feed(path))


def test_xlsx_without_header_raises(tmp_path: Path) -> None:
    path = tmp_path / "feed.xlsx"
    write_xlsx(path, [])
    with pytest.raises(FeedError, match="no header row"):
        read_feed(path)


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        read_feed(write(tmp_path, "feed.csv", HEADER), chunk_rows=0)
    with pytest.raises(ValueError, match="url_separator"):
        FeedColumns(url_separator="")


# --- CSV dialects and encodings ---------------------------------------------------------------


def test_bom_is_stripped_from_the_first_column_name(tmp_path: Path, csv_reader: str) -> None:
    content = codecs.BOM_UTF8 + b"product_id,image_url\n1,https://a.com/1.jpg\n"
    feed = read(write(tmp_path, "feed.csv", content))
    assert feed.pairs() == [(1, "1", "https://a.com/1.jpg")]


def test_quoted_commas_and_newlines_stay_inside_their_field(
    tmp_path: Path, csv_reader: str
) -> None:
    feed = read_csv_text(
        tmp_path,
        HEADER
        + '1,https://a.com/1.jpg,"Shirt, blue","Acme\nInc.",tops,"1,299.00"\n'
        + '2,https://a.com/2.jpg,"say ""hi""",b,c,5\n',
    )
    images = feed.images
    assert list(images["title"]) == ["Shirt, blue", 'say "hi"']
    assert list(images["brand"]) == ["Acme\nInc.", "b"]
    assert list(images["price"]) == [1299.0, 5.0]
    assert list(images["row_number"]) == [1, 2]  # a record, not a line, is a row


def test_non_utf8_bytes_fall_back_to_cp1252_per_value(tmp_path: Path, csv_reader: str) -> None:
    content = (
        HEADER.encode()
        + b"1,https://a.com/1.jpg,caf\xe9 \x80,b,c,1\n"  # Latin-1/cp1252 bytes
        + "2,https://a.com/2.jpg,café,b,c,2\n".encode()  # proper UTF-8 in the same file
        + b"3,https://a.com/3.jpg,na\xefve\n"  # short row with a bad byte: padded, not lost
        + b"4,https://a.com/4.jpg,\xe9,b,c,4,extra\n"  # too many fields with a bad byte
    )
    feed = read(write(tmp_path, "feed.csv", content))
    assert list(feed.images["title"]) == ["café €", "café", "naïve"]
    assert feed.reasons() == [(4, "malformed_row")]
    assert feed.rejected[0].raw == {"line": "4,https://a.com/4.jpg,é,b,c,4,extra"}


def test_utf16_text_export_is_read(tmp_path: Path, csv_reader: str) -> None:
    text = "product_id\timage_url\ttitle\r\n1\thttps://a.com/1.jpg\tcafé\r\n"
    feed = read(write(tmp_path, "feed.txt", codecs.BOM_UTF16_LE + text.encode("utf-16-le")))
    assert list(feed.images["title"]) == ["café"]


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_delimiter_is_sniffed_from_the_header(tmp_path: Path, delimiter: str) -> None:
    separator = "," if delimiter == "|" else "|"  # the URL-list separator must differ
    lines = (
        ["product_id", "image_url", "title", "price"],
        ["1", "https://a.com/1.jpg", "x, y", "2,50"],
    )
    text = "".join(delimiter.join(line) + "\n" for line in lines)
    feed = read_csv_text(tmp_path, text, columns=FeedColumns(url_separator=separator))
    assert feed.pairs() == [(1, "1", "https://a.com/1.jpg")]
    assert feed.images["title"][0] == "x, y"
    assert feed.images["price"][0] == 2.5


def test_windows_and_old_mac_line_endings(tmp_path: Path, csv_reader: str) -> None:
    for newline in ("\r\n", "\r"):
        text = HEADER + "1,https://a.com/1.jpg,t,b,c,1\n\n2,https://a.com/2.jpg,t,b,c,2\n"
        feed = read_csv_text(tmp_path, text.replace("\n", newline))
        assert [row for row, _, _ in feed.pairs()] == [1, 3]
        assert feed.blank == 1


def test_compressed_csv_is_streamed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "feed.csv.gz",
        gzip.compress((HEADER + "1,https://a.com/1.jpg,t,b,c,1\n").encode()),
    )
    assert read(path).pairs() == [(1, "1", "https://a.com/1.jpg")]


# --- rows -------------------------------------------------------------------------------------


def test_blank_rows_are_skipped_and_counted(tmp_path: Path, csv_reader: str) -> None:
    feed = read_csv_text(
        tmp_path,
        HEADER
        + "\n"  # empty line
        + ",,,,,\n"  # empty fields
        + "   \n"  # whitespace only
        + " , ,\t, , , \n"  # whitespace fields
        + "1,https://a.com/1.jpg,t,b,c,1\n",
    )
    assert feed.blank == 4
    assert feed.rejected == []
    assert feed.pairs() == [(5, "1", "https://a.com/1.jpg")]
    assert feed.rows_read == 5


def test_duplicate_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    row = "1,https://a.com/1.jpg,t,b,c,1\n"
    feed = read_csv_text(
        tmp_path, HEADER + row + row + "1,HTTPS://A.COM/1.jpg#zoom,t,b,c,1\n" + row
    )
    assert feed.pairs() == [(1, "1", "https://a.com/1.jpg")]
    assert feed.duplicates == 3  # the third spells the same URL differently
    assert feed.rows_read == 4


def test_same_url_for_two_products_is_not_a_duplicate(tmp_path: Path) -> None:
    feed = read_csv_text(tmp_path, HEADER + "1,https://a.com/x.jpg\n2,https://a.com/x.jpg\n")
    assert [pid for _, pid, _ in feed.pairs()] == ["1", "2"]
    assert feed.duplicates == 0


def test_many_rows_per_product(tmp_path: Path) -> None:
    rows = "".join(f"P1,https://a.com/{i}.jpg,t,b,c,1\n" for i in range(3))
    feed = read_csv_text(tmp_path, HEADER + rows)
    assert feed.pairs() == [(i + 1, "P1", f"https://a.com/{i}.jpg") for i in range(3)]


def test_url_list_in_one_cell_is_exploded(tmp_path: Path) -> None:
    feed = read_csv_text(
        tmp_path,
        HEADER + '1,"https://a.com/1.jpg | https://a.com/2.jpg||https://a.com/1.jpg",t,b,c,9.5\n',
    )
    assert feed.pairs() == [(1, "1", "https://a.com/1.jpg"), (1, "1", "https://a.com/2.jpg")]
    assert feed.duplicates == 1
    assert list(feed.images["price"]) == [9.5, 9.5]


def test_json_list_in_a_csv_cell(tmp_path: Path) -> None:
    cell = '"[""https://a.com/1.jpg"", ""https://a.com/2.jpg""]"'
    feed = read_csv_text(tmp_path, "product_id,image_url\n1," + cell + "\n2,https://a.com/3.jpg\n")
    assert [url for _, _, url in feed.pairs()] == [f"https://a.com/{i}.jpg" for i in (1, 2, 3)]


def test_url_separator_can_be_changed_or_disabled(tmp_path: Path) -> None:
    text = 'product_id,image_url\n1,"https://a.com/a|b.jpg;https://a.com/c.jpg"\n'
    by_semicolon = read_csv_text(tmp_path, text, columns=FeedColumns(url_separator=";"))
    assert [url for _, _, url in by_semicolon.pairs()] == [
        "https://a.com/a|b.jpg",
        "https://a.com/c.jpg",
    ]
    whole = read_csv_text(tmp_path, text, columns=FeedColumns(url_separator=None))
    assert [url for _, _, url in whole.pairs()] == ["https://a.com/a|b.jpg;https://a.com/c.jpg"]


def test_partly_bad_url_list_keeps_the_good_urls(tmp_path: Path) -> None:
    feed = read_csv_text(tmp_path, HEADER + "1,https://a.com/1.jpg|ftp://a.com/2.jpg,t,b,c,1\n")
    assert feed.pairs() == [(1, "1", "https://a.com/1.jpg")]
    assert feed.reasons() == [(1, "unsupported_scheme")]


def test_short_rows_are_padded_and_long_rows_rejected(tmp_path: Path, csv_reader: str) -> None:
    feed = read_csv_text(
        tmp_path,
        HEADER
        + "1,https://a.com/1.jpg\n"  # trailing fields left out
        + "2,https://a.com/2.jpg,t,b,c,1,surplus\n"
        + "3,https://a.com/3.jpg,t,b,c,3\n",
    )
    assert feed.pairs() == [(1, "1", "https://a.com/1.jpg"), (3, "3", "https://a.com/3.jpg")]
    assert feed.images["title"].tolist() == [None, "t"]
    assert feed.reasons() == [(2, "malformed_row")]
    assert "expected 6 fields, found 7" in feed.rejected[0].detail


def test_trailing_delimiter_on_every_row(tmp_path: Path, csv_reader: str) -> None:
    rows = "".join(f"{i},https://a.com/{i}.jpg,t,b,c,{i},\n" for i in range(1, 5))
    feed = read_csv_text(tmp_path, HEADER + rows)
    assert [row for row, _, _ in feed.pairs()] == [1, 2, 3, 4]
    assert feed.images["price"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert feed.rejected == []


def messy_csv(rows: int, seed: int) -> str:
    """Good rows mixed with every kind of line that does not fit the header."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(7, size=rows, p=[0.9, 0.02, 0.02, 0.02, 0.01, 0.02, 0.01])
    lines = []
    for i, kind in enumerate(kinds):
        good = f"{i},https://a.com/{i}.jpg,Title {i},b,c,{i}"
        lines.append(
            [
                good,
                f"{i},https://a.com/{i}.jpg",  # short: recovered
                good + ",surplus",  # long: rejected
                good + ",,",  # empty surplus: recovered
                "   ",  # whitespace only: blank
                f'{i},https://a.com/{i}.jpg,"two\nlines",b,c,{i}',
                f"{i},ftp://a.com/{i}.jpg,t,b,c,1",  # fits, but a bad URL
            ][kind]
        )
    return HEADER + "\n".join(lines) + "\n"


def test_both_csv_readers_agree_on_a_messy_multi_block_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ~3 MB: several pyarrow blocks, so rows are numbered across its read-ahead.
    path = write(tmp_path, "feed.csv", messy_csv(60_000, seed=1))
    monkeypatch.setattr(delimited, "_MAX_MISFITS", 1.0)
    fast = read(path, chunk_rows=7_000)
    monkeypatch.setattr(delimited, "_MAX_MISFITS", -1.0)
    slow = read(path, chunk_rows=7_000)
    assert fast.pairs() == slow.pairs()
    assert fast.reasons() == slow.reasons()
    assert (fast.rows_read, fast.blank, fast.duplicates) == (slow.rows_read, slow.blank, 0)
    assert fast.rows_read == 60_000
    # Every row is accounted for once: as an image, a rejection or a blank.
    numbers = [row for row, _, _ in fast.pairs()] + [row for row, _ in fast.reasons()]
    assert len(set(numbers)) == len(numbers) == 60_000 - fast.blank


def test_a_long_run_of_misfit_lines_switches_to_the_csv_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    switched_at: list[int] = []
    original = delimited._csv_module_chunks

    def spy(spec: object, *, done: int) -> object:
        switched_at.append(done)
        return original(spec, done=done)  # type: ignore[arg-type]

    monkeypatch.setattr(delimited, "_csv_module_chunks", spy)
    # A clean first MiB (so pyarrow is picked), then 15,000 short rows, then clean again.
    good = [f"{i},https://a.com/{i}.jpg,Title {i},b,c,{i}" for i in range(30_000)]
    short = [f"{i},https://a.com/{i}.jpg" for i in range(30_000, 45_000)]
    tail = [f"{i},https://a.com/{i}.jpg,t,b,c,{i}" for i in range(45_000, 46_000)]
    path = write(tmp_path, "feed.csv", HEADER + "\n".join(good + short + tail) + "\n")
    feed = read(path, chunk_rows=5_000)
    assert len(switched_at) == 1 and 0 < switched_at[0] <= 30_000
    assert [row for row, _, _ in feed.pairs()] == list(range(1, 46_001))
    assert feed.rows_read == 46_000
    assert max(c.rows_read for c in feed.chunks) <= 5_000


def test_values_are_trimmed_and_extras_collected(tmp_path: Path) -> None:
    feed = read_csv_text(
        tmp_path,
        "product_id,image_url,title,color,size,gtin\n"
        + " 007 ,  https://a.com/1.jpg , Shirt ,red,, 0042\n"
        + "8,https://a.com/2.jpg,,,,\n",
    )
    images = feed.images
    assert images["product_id"].tolist() == ["007", "8"]  # text, never numbers: zeros stay
    assert images["title"].tolist() == ["Shirt", None]
    assert images["brand"].tolist() == [None, None]  # no such column
    assert math.isnan(images["price"][0])
    assert images["extra"].tolist() == [{"color": "red", "gtin": "0042"}, None]


def test_column_names_ignore_case_spacing_and_accept_aliases(tmp_path: Path) -> None:
    feed = read_csv_text(tmp_path, " SKU , Image_Link ,Title,BRAND\n1,https://a.com/1.jpg,t,acme\n")
    assert feed.pairs() == [(1, "1", "https://a.com/1.jpg")]
    assert feed.images["brand"][0] == "acme"
    spaced = read_csv_text(tmp_path, "Product ID,Image URL\n1,https://a.com/1.jpg\n")
    assert spaced.pairs() == [(1, "1", "https://a.com/1.jpg")]


def test_custom_column_names(tmp_path: Path) -> None:
    columns = FeedColumns(id="item", url="pictures", title="name", price=None, brand=None)
    feed = read_csv_text(
        tmp_path, "item,pictures,name,price\nA,https://a.com/1.jpg,Hat,12\n", columns=columns
    )
    images = feed.images
    assert images[["product_id", "title"]].values.tolist() == [["A", "Hat"]]
    assert math.isnan(images["price"][0])  # not mapped, so it is an extra
    assert images["extra"][0] == {"price": "12"}


# --- rejection reasons ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason", "detail"),
    [
        ("", "missing_url", "'image_url' is empty"),
        (" | ", "missing_url", "is empty"),
        ("ftp://a.com/1.jpg", "unsupported_scheme", "not http or https"),
        ("data:image/png;base64,AAAA", "unsupported_scheme", "not http or https"),
        ("javascript:alert(1)", "unsupported_scheme", "not http or https"),
        ("www.a.com/1.jpg", "malformed_url", "no scheme"),
        ("https://", "malformed_url", "no host"),
        ("https:///1.jpg", "malformed_url", "no host"),
        ("http:/a.com/1.jpg", "malformed_url", "cannot be parsed"),
        # A space in the path is encoded when fetched (tests/test_fetchable_urls.py); in the
        # host nothing can encode it.
        ("https://my photo.com/1.jpg", "malformed_url", "whitespace or control"),
        ("https://a.com/\x01.jpg", "malformed_url", "whitespace or control"),
        ("https://a.com/\u200b.jpg", "malformed_url", "whitespace or control"),
        ("https://a..com/1.jpg", "malformed_url", "invalid host"),
        ("https://a.com:99999/1.jpg", "malformed_url", "invalid port"),
        ("https://a.com:8o/1.jpg", "malformed_url", "cannot be parsed"),
        ("https://[::1/1.jpg", "malformed_url", "cannot be parsed"),
        ("https://a_b\\c.com/1.jpg", "malformed_url", "invalid host"),
        ("https://a.com/" + "x" * 2100, "url_too_long", "limit 2048"),
    ],
)
def test_each_bad_url_is_rejected_with_its_reason(
    tmp_path: Path, url: str, reason: str, detail: str
) -> None:
    feed = read_csv_text(tmp_path, HEADER + f'P1,"{url}",Hat,b,c,1\n')
    assert feed.images.empty
    assert feed.reasons() == [(1, reason)]
    rejected = feed.rejected[0]
    assert detail in rejected.detail
    assert rejected.raw["product_id"] == "P1"
    assert rejected.raw["title"] == "Hat"


def test_missing_id_is_rejected(tmp_path: Path) -> None:
    feed = read_csv_text(tmp_path, HEADER + "  ,https://a.com/1.jpg,Hat,b,c,1\n")
    assert feed.reasons() == [(1, "missing_id")]
    assert feed.rejected[0].raw["image_url"] == "https://a.com/1.jpg"


def test_url_length_limit_is_configurable(tmp_path: Path) -> None:
    text = HEADER + "1,https://a.com/1234567890.jpg,t,b,c,1\n"
    assert read_csv_text(tmp_path, text, max_url_length=27).reasons() == [(1, "url_too_long")]
    assert read_csv_text(tmp_path, text, max_url_length=28).reasons() == []  # 28 characters


def test_rejections_come_in_row_order_with_counts_adding_up(tmp_path: Path) -> None:
    feed = read_csv_text(
        tmp_path,
        HEADER
        + "1,ftp://a/1.jpg,t,b,c,1\n"
        + ",https://a.com/2.jpg,t,b,c,1\n"
        + "3,,t,b,c,1\n"
        + "4,https://a.com/4.jpg,t,b,c,1\n"
        + "\n",
    )
    assert feed.reasons() == [(1, "unsupported_scheme"), (2, "missing_id"), (3, "missing_url")]
    assert feed.rows_read == 5 == len(feed.rejected) + len(feed.images) + feed.blank


# --- URL normalisation and hashing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://cdn.a.com/p/1.jpg", "https://cdn.a.com/p/1.jpg"),
        ("  HTTPS://CDN.A.COM/P/Img.JPG?Size=L  ", "https://cdn.a.com/P/Img.JPG?Size=L"),
        ("http://a.com:80/1.jpg", "http://a.com/1.jpg"),
        ("https://a.com:443/1.jpg", "https://a.com/1.jpg"),
        ("https://a.com:8443/1.jpg", "https://a.com:8443/1.jpg"),
        ("http://a.com:443/1.jpg", "http://a.com:443/1.jpg"),
        ("https://a.com/1.jpg#zoom", "https://a.com/1.jpg"),
        ("//cdn.a.com/1.jpg", "https://cdn.a.com/1.jpg"),
        ("https://User:PW@A.com/1.jpg", "https://User:PW@a.com/1.jpg"),
        ("https://BÜCHER.de/ä.jpg", "https://bücher.de/ä.jpg"),
        ("https://[2001:DB8::1]:443/x", "https://[2001:db8::1]/x"),
        ("https://a.com", "https://a.com"),
        ("https://a.com/%7Euser/a%20b.jpg", "https://a.com/%7Euser/a%20b.jpg"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


def test_reader_emits_normalized_urls(tmp_path: Path) -> None:
    feed = read_csv_text(tmp_path, HEADER + "1,HTTP://A.com:80/X.jpg#f|//b.com/y\n")
    assert [url for _, _, url in feed.pairs()] == ["http://a.com/X.jpg", "https://b.com/y"]


def test_normalize_url_raises_invalid_url_with_reason() -> None:
    with pytest.raises(InvalidURL) as info:
        normalize_url("ftp://a.com/x")
    assert info.value.reason is RejectReason.UNSUPPORTED_SCHEME
    with pytest.raises(InvalidURL, match="missing_url"):
        normalize_url("   ")


def test_fast_path_urls_are_unchanged_by_the_full_check() -> None:
    # The fast regex only vouches for URLs the full parser would accept unchanged.
    urls = [
        "https://a.com",
        "http://a-b_c.example.co.uk/p/1.jpg?x=1&y=%20",
        "https://a.com?q",
        "https://x/!$&'()*+,;=:@~",
    ]
    normalized, problems = _check_slow_urls(pa.array(urls))
    assert problems.tolist() == [0] * len(urls)
    assert normalized.to_pylist() == urls


def test_url_hash_is_stable_hex() -> None:
    key = url_hash("https://a.com/1.jpg")
    assert key == url_hash("https://a.com/1.jpg")
    assert len(key) == 32 and int(key, 16) >= 0
    assert key != url_hash("https://a.com/2.jpg")
    # Pinned: it is a database key, so it must never change between releases.
    assert url_hash("https://example.com/a.jpg") == "dd4257994460d48e33163edfa5ffcda6"


# --- prices -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "expected", "currency"),
    [
        ("19.99", 19.99, None),
        ("19", 19.0, None),
        (".5", 0.5, None),
        ("19.99 USD", 19.99, "USD"),
        ("EUR 5", 5.0, "EUR"),
        ("$1,299.00", 1299.0, "USD"),
        ("1,299", 1299.0, None),
        ("12,50 €", 12.5, "EUR"),
        ("1.299,00", 1299.0, None),
        ("€1.234,50", 1234.5, "EUR"),
        ("12,99 EUR", 12.99, "EUR"),
        ("1 299,00 €", 1299.0, "EUR"),
        ("1'299.00 CHF", 1299.0, "CHF"),
        ("£7", 7.0, "GBP"),
        ("US$ 10", 10.0, "USD"),
        ("free", 0.0, None),
        ("FREE", 0.0, None),
        ("", math.nan, None),
    ],
)
def test_price_parsing(tmp_path: Path, price: str, expected: float, currency: str | None) -> None:
    feed = read_csv_text(tmp_path, HEADER + f'1,https://a.com/1.jpg,t,b,c,"{price}"\n')
    assert feed.rejected == [] and feed.notes == []
    got = feed.images["price"][0]
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)
    assert feed.images["currency"][0] == currency


@pytest.mark.parametrize("price", ["-5", "1e999", "12abc34", "call us", "12 abc", "1.2.3"])
def test_unreadable_price_keeps_the_row_with_a_note(tmp_path: Path, price: str) -> None:
    feed = read_csv_text(tmp_path, HEADER + f'1,https://a.com/1.jpg,t,b,c,"{price}"\n')
    assert feed.rejected == []  # a bad price is not a reason to drop the image
    assert math.isnan(feed.images["price"][0])
    (note,) = feed.notes
    assert (note.row_number, note.reason) == (1, RejectReason.UNREADABLE_PRICE)
    assert repr(price) in note.detail and "kept without a price" in note.detail


def test_currency_column_applies_when_the_price_names_none(tmp_path: Path) -> None:
    feed = read_csv_text(
        tmp_path,
        "product_id,image_url,price,currency\n"
        "1,https://a.com/1.jpg,9.5,eur\n"
        "2,https://a.com/2.jpg,£3,EUR\n"  # the price's own symbol wins
        "3,https://a.com/3.jpg,4,euros\n",  # not a code: none
    )
    assert list(feed.images["currency"]) == ["EUR", "GBP", None]
    assert "currency" not in (feed.images["extra"][0] or {})


def test_availability_and_deleted_columns(tmp_path: Path) -> None:
    feed = read_csv_text(
        tmp_path,
        "product_id,image_url,availability,deleted\n"
        "1,https://a.com/1.jpg,In Stock,\n"
        "2,https://a.com/2.jpg,out_of_stock,no\n"
        "3,https://a.com/3.jpg,discontinued,\n"
        "4,https://a.com/4.jpg,,TRUE\n"
        "5,https://a.com/5.jpg,,\n"
        "6,https://a.com/6.jpg,on the moon,maybe\n",
    )
    images = feed.images
    assert list(images["in_stock"]) == [True, False, None, None, None, None]
    assert list(images["delist"]) == [False, False, True, True, False, False]
    assert [(n.row_number, n.reason) for n in feed.notes] == [
        (6, RejectReason.UNKNOWN_AVAILABILITY),
        (6, RejectReason.UNKNOWN_AVAILABILITY),
    ]
    assert "'on the moon'" in feed.notes[0].detail + feed.notes[1].detail


# --- chunking and de-duplication state --------------------------------------------------------


def test_dedup_across_chunk_boundaries(tmp_path: Path, csv_reader: str) -> None:
    rows = [f"{i % 3},https://a.com/{i % 3}.jpg,t,b,c,1\n" for i in range(9)]  # 3 unique
    rows.insert(4, "\n")
    feed = read_csv_text(tmp_path, HEADER + "".join(rows), chunk_rows=2)
    assert [c.rows_read for c in feed.chunks] == [2, 2, 2, 2, 2]  # the blank line is a row
    assert feed.pairs() == [
        (1, "0", "https://a.com/0.jpg"),
        (2, "1", "https://a.com/1.jpg"),
        (3, "2", "https://a.com/2.jpg"),
    ]
    assert feed.duplicates == 6
    assert feed.blank == 1


def test_row_numbers_survive_chunking_with_rejected_rows(tmp_path: Path, csv_reader: str) -> None:
    # Every third row has a surplus field: pyarrow leaves those lines out of its batches.
    rows = [f"{i},https://a.com/{i}.jpg{',t,b,c,1,x' * (i % 3 == 2)}\n" for i in range(1, 13)]
    feed = read_csv_text(tmp_path, HEADER + "".join(rows), chunk_rows=3)
    assert [row for row, _, _ in feed.pairs()] == [1, 3, 4, 6, 7, 9, 10, 12]
    assert [row for row, _ in feed.reasons()] == [2, 5, 8, 11]
    assert feed.rows_read == 12


def test_seen_hashes_behaves_like_a_set_in_8_bytes_an_entry() -> None:
    rng = np.random.default_rng(7)
    seen, reference = _SeenHashes(), set()
    for _ in range(40):
        batch = rng.integers(0, 30_000, size=2_000).astype(np.int64)
        fresh = seen.add(batch)
        expected = []
        for value in batch.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert fresh.tolist() == expected
    assert len(seen) == len(reference)
    big = _SeenHashes()
    for start in range(0, 1_000_000, 50_000):
        big.add(np.arange(start, start + 50_000, dtype=np.int64) * 7919)
    assert len(big) == 1_000_000
    assert big.nbytes == 8_000_000  # a Python set of 1M ints would need ~70 MB


# --- other formats ----------------------------------------------------------------------------

RECORDS = [
    {
        "product_id": "A1",
        "image_url": "https://a.com/1.jpg",
        "title": "Hat",
        "price": "9.5",
        "color": "red",
    },
    {
        "product_id": "A1",
        "image_url": "https://a.com/2.jpg",
        "title": "Hat",
        "price": "9.5",
        "color": "",
    },
    {
        "product_id": "B2",
        "image_url": "ftp://a.com/3.jpg",
        "title": "Cap",
        "price": "",
        "color": "",
    },
    {
        "product_id": "A1",
        "image_url": "https://a.com/1.jpg",
        "title": "Hat",
        "price": "9.5",
        "color": "red",
    },
]


def write_xlsx(path: Path, rows: list[list[object]]) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    for row in rows:
        sheet.append(row)
    book.save(path)


def write_records(path: Path, fmt: str) -> None:
    frame = pd.DataFrame(RECORDS)
    if fmt in ("csv", "csv.gz"):
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt in ("jsonl", "ndjson", "jsonl.gz"):
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "xlsx":
        write_xlsx(path, [list(frame.columns), *frame.values.tolist()])


@pytest.mark.parametrize(
    "fmt", ["csv", "tsv", "jsonl", "ndjson", "parquet", "xlsx", "csv.gz", "jsonl.gz"]
)
def test_every_format_round_trips(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"feed.{fmt}"
    write_records(path, fmt)
    feed = read(path)
    images = feed.images
    assert images[["row_number", "product_id", "url", "title"]].values.tolist() == [
        [1, "A1", "https://a.com/1.jpg", "Hat"],
        [2, "A1", "https://a.com/2.jpg", "Hat"],
    ]
    assert images["price"].tolist() == [9.5, 9.5]
    assert images["extra"].tolist() == [{"color": "red"}, None]
    assert feed.reasons() == [(3, "unsupported_scheme")]
    assert feed.duplicates == 1
    assert feed.rows_read == 4
    assert detect_format(path) == {"ndjson": "jsonl", "csv.gz": "csv", "jsonl.gz": "jsonl"}.get(
        fmt, fmt
    )


def test_jsonl_bad_lines_are_rejected_not_fatal(tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {"id": 7, "image_url": ["https://a.com/1.jpg", "https://a.com/2.jpg"], "price": 9.5}
        ),
        "",
        "{not json",
        "[1, 2]",
        json.dumps(
            {"id": 8, "image_url": "https://a.com/3.jpg", "in_stock": True, "meta": {"a": 1}}
        ),
        json.dumps({"id": None, "image_url": "https://a.com/4.jpg"}),
    ]
    feed = read(write(tmp_path, "feed.jsonl", "\n".join(lines)))
    assert feed.pairs() == [
        (1, "7", "https://a.com/1.jpg"),
        (1, "7", "https://a.com/2.jpg"),
        (5, "8", "https://a.com/3.jpg"),
    ]
    assert feed.images["price"].tolist()[:2] == [9.5, 9.5]
    assert feed.images["extra"][2] == {"in_stock": "true", "meta": '{"a": 1}'}
    assert feed.reasons() == [(3, "malformed_row"), (4, "malformed_row"), (6, "missing_id")]
    assert feed.blank == 1


def test_jsonl_without_id_key_raises(tmp_path: Path) -> None:
    path = write(
        tmp_path, "feed.jsonl", json.dumps({"ean": 1, "image_url": "https://a.com/1.jpg"}) + "\n"
    )
    with pytest.raises(FeedError, match="columns found: 'ean', 'image_url'"):
        list(read_feed(path))


def test_parquet_typed_and_list_columns(tmp_path: Path) -> None:
    path = tmp_path / "feed.parquet"
    table = pa.table(
        {
            "product_id": pa.array([1, 2, 3], pa.int64()),
            "image_url": pa.array(
                [["https://a.com/1.jpg", "https://a.com/2.jpg"], [], None], pa.list_(pa.string())
            ),
            "price": pa.array([1.5, None, 3.0]),
            "title": pa.array(["a", None, "c"]).dictionary_encode(),
            "tags": pa.array([["x"], ["y"], None], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, path)
    feed = read(path, chunk_rows=2)
    assert feed.pairs() == [(1, "1", "https://a.com/1.jpg"), (1, "1", "https://a.com/2.jpg")]
    assert feed.images["price"].tolist() == [1.5, 1.5]
    assert feed.images["extra"][0] == {"tags": '["x"]'}
    assert feed.reasons() == [(2, "missing_url"), (3, "missing_url")]


def test_xlsx_numbers_gaps_and_stray_cells(tmp_path: Path) -> None:
    path = tmp_path / "feed.xlsx"
    write_xlsx(
        path,
        [
            [],  # the header need not be on the first sheet row
            ["SKU", "Image", "Price", None],
            [12345, "https://x.com/a.jpg", 19.99],
            [None, None],
            [7.0, "https://x.com/b.jpg", 5, None, "right of the header"],
        ],
    )
    feed = read(path)
    assert feed.pairs() == [(1, "12345", "https://x.com/a.jpg"), (3, "7", "https://x.com/b.jpg")]
    assert feed.images["price"].tolist() == [19.99, 5.0]
    assert feed.blank == 1


# --- estimates --------------------------------------------------------------------------------


def test_estimate_rows(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "feed.csv", HEADER + "1,https://a.com/1.jpg\n" * 10)
    assert estimate_rows(csv_path) == 10
    parquet_path = tmp_path / "feed.parquet"
    write_records(parquet_path, "parquet")
    assert estimate_rows(parquet_path) == len(RECORDS)
    xlsx_path = tmp_path / "feed.xlsx"
    write_records(xlsx_path, "xlsx")
    assert estimate_rows(xlsx_path) == len(RECORDS)
    assert estimate_rows(write(tmp_path, "feed.csv.gz", gzip.compress(HEADER.encode()))) is None
    assert estimate_rows(tmp_path / "missing.csv") is None


# --- a 1M-row feed ----------------------------------------------------------------------------

MILLION_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import pyarrow as pa
    from producer.feeds import read_feed

    path, warm, chunk_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    list(read_feed(warm))  # import and initialise everything before the baseline
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    chunks = rows = images = duplicates = rejected = biggest = 0
    for chunk in read_feed(path, chunk_rows=chunk_rows):
        chunks += 1
        rows += chunk.rows_read
        biggest = max(biggest, chunk.rows_read)
        images += len(chunk.images)
        duplicates += chunk.duplicates
        rejected += len(chunk.rejected)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "chunks": chunks, "rows": rows, "biggest": biggest, "images": images,
        "duplicates": duplicates, "rejected": rejected, "seconds": seconds,
        "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
        "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
    }))
    """
)


@pytest.mark.slow
def test_million_row_csv_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "million.csv"
    n = 1_000_000
    with path.open("w") as out:
        out.write(HEADER)
        for start in range(0, n, 100_000):
            # Every 100th row repeats the pair of the row before it: a duplicate.
            pairs = ((i, i - (i % 100 == 99)) for i in range(start, start + 100_000))
            out.write(
                "".join(
                    f"P{j // 2},https://cdn.shop.com/i/{j}.jpg,"
                    f"Item {i},B{i % 50},C{i % 20},{i % 1000}.99\n"
                    for i, j in pairs
                )
            )
    warm = write(tmp_path, "warm.csv", HEADER + "1,https://a.com/1.jpg,t,b,c,1\n")
    chunk_rows = 20_000
    result = subprocess.run(
        [sys.executable, "-c", MILLION_SCRIPT, str(path), str(warm), str(chunk_rows)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    stats = json.loads(result.stdout)
    print(f"\n1M-row CSV: {stats}; {n / stats['seconds']:,.0f} rows/s")
    assert stats["rows"] == n
    assert stats["duplicates"] == n // 100
    assert stats["images"] == n - n // 100
    assert stats["rejected"] == 0
    assert stats["chunks"] == n // chunk_rows  # read in chunks …
    assert stats["biggest"] == chunk_rows
    # … and memory tracks the chunk, not the file (86 MB of CSV; pandas.read_csv of it grows
    # the process by ~300 MB, pyarrow's read_all holds ~100 MB of Arrow buffers).
    assert stats["rss_growth_mb"] < 200
    assert stats["arrow_peak_mb"] < 64
