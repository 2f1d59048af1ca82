"""Writing a catalog as a merchant feed, in each format merchants send: CSV, TSV, JSON Lines,
Parquet and XLSX."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, cast, get_args

import pandas as pd

from producer.feeds import detect_format
from synthetic.catalog.records import Catalog
from synthetic.catalog.vocabulary import FEED_COLUMNS

FeedFormat = Literal["csv", "tsv", "jsonl", "parquet", "xlsx"]
FeedLayout = Literal["rows", "list"]


# The suffixes feed_format accepts, after an optional compression suffix. The suffix -> format
# mapping itself is producer.feeds.detect_format's (the reader's), but the names differ a
# little: the reader also reads .txt and .xlsm and knows .gzip, not .xz; it refuses compressed
# Parquet or XLSX, which this writer writes when asked. Hence a thin wrapper that keeps its own
# list of names and asks detect_format only for the format of a bare suffix.
_FEED_SUFFIXES: frozenset[str] = frozenset(
    (".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".parquet", ".pq", ".xlsx")
)
_COMPRESSION_SUFFIXES: tuple[str, ...] = (".gz", ".bz2", ".xz", ".zst")


def feed_format(path: Path | str) -> FeedFormat:
    """The feed format a file name implies; a trailing compression suffix (.gz...) is skipped."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _FEED_SUFFIXES:
        return cast(FeedFormat, detect_format(f"feed{suffixes[-1]}"))
    raise ValueError(
        f"cannot tell the feed format of {path}; pass fmt= one of {get_args(FeedFormat)}"
    )


def feed_frame(catalog: Catalog, base_url: str, layout: FeedLayout = "rows") -> pd.DataFrame:
    """The catalog as a feed table with columns :data:`FEED_COLUMNS`."""
    base = base_url.rstrip("/")
    rows = []
    for p in catalog.products:
        urls = [f"{base}/images/{img.filename}" for img in p.images]
        common = {"title": p.title, "brand": p.brand, "category": p.category, "price": p.price}
        if layout == "list":
            rows.append({"product_id": p.product_id, "image_url": "|".join(urls), **common})
        elif layout == "rows":
            rows += [{"product_id": p.product_id, "image_url": url, **common} for url in urls]
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return pd.DataFrame(rows, columns=list(FEED_COLUMNS))


def write_feed(
    catalog: Catalog,
    path: Path | str,
    base_url: str,
    fmt: FeedFormat | None = None,
    layout: FeedLayout = "rows",
) -> Path:
    """Write the catalog as a merchant feed; the format comes from ``fmt`` or the file suffix.

    ``layout="rows"``: one row per image (product fields repeated); ``"list"``: one row per
    product with its image URLs joined by ``|``. URLs are ``{base_url}/images/{filename}``.
    """
    path = Path(path)
    fmt = fmt or feed_format(path)
    frame = feed_frame(catalog, base_url, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        frame.to_parquet(path, index=False, engine="pyarrow")
    elif fmt == "xlsx":
        frame.to_excel(path, index=False, engine="openpyxl", sheet_name="products")
    else:
        raise ValueError(f"unknown feed format {fmt!r}")
    return path
