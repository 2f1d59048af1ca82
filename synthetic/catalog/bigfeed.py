"""A streaming writer for million-row CSV/TSV feeds with realistic junk rows, built with Arrow
kernels chunk by chunk so memory stays flat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from synthetic.catalog.feeds import feed_format
from synthetic.catalog.vocabulary import (
    _PRICE_RANGE,
    BRANDS,
    CATEGORIES,
    COLOURS,
    FEED_COLUMNS,
    VARIANTS,
)

BAD_ROW_KINDS: tuple[str, ...] = (
    "missing_id",
    "missing_url",
    "ftp_scheme",
    "garbage_url",
    "duplicate",
)
_GARBAGE_URLS: tuple[str, ...] = (
    "not a url", "htp//broken.example/x.jpg", "javascript:alert(1)", "//", "image.jpg", "http://",
    "N/A", "http:///images/x.jpg", "www.example.com/no-scheme.jpg", "file:///etc/passwd",
)  # fmt: skip
_ID_PREFIXES: dict[str, str] = {
    "dress": "DR", "top": "TP", "trousers": "TR", "skirt": "SK", "jacket": "JK", "shoe": "SH",
    "bag": "BG",
}  # fmt: skip
_ID_MULTIPLIER = 7_654_321  # coprime with 10**7, so index -> number is a permutation: unique ids
_ID_SPACE = 10_000_000


@dataclass(frozen=True)
class BigFeedStats:
    path: Path
    rows: int
    products: int
    bad: dict[str, int]  # per kind in BAD_ROW_KINDS


@dataclass(frozen=True)
class _BigFeedVocabulary:
    """Per-feed lookup arrays, so each chunk builds strings with Arrow kernels instead of
    Python loops (1M rows in about a second)."""

    titles: pa.Array  # index: colour * n_styles + style
    style_category: np.ndarray  # style -> category index
    prefixes: pa.Array  # category -> id prefix
    brands: pa.Array
    price_lo: np.ndarray  # per category, log
    price_hi: np.ndarray
    image_no: pa.Array  # "1".."9"
    garbage: pa.Array


def _big_vocabulary() -> _BigFeedVocabulary:
    styles = [(c, title) for c in CATEGORIES for title in VARIANTS[c].values()]
    titles = [f"{colour.title()} {title}" for colour in COLOURS for _, title in styles]
    return _BigFeedVocabulary(
        titles=pa.array(titles),
        style_category=np.array([CATEGORIES.index(c) for c, _ in styles]),
        prefixes=pa.array([_ID_PREFIXES[c] for c in CATEGORIES]),
        brands=pa.array(BRANDS),
        price_lo=np.log([_PRICE_RANGE[c][0] for c in CATEGORIES]),
        price_hi=np.log([_PRICE_RANGE[c][1] for c in CATEGORIES]),
        image_no=pa.array([str(i) for i in range(1, 10)]),
        garbage=pa.array(_GARBAGE_URLS),
    )


def _rows_per_product(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    """1-5 rows per product (mean 3), trimmed so they sum to exactly ``n_rows``."""
    counts = rng.integers(1, 6, size=n_rows)
    ends = np.cumsum(counts)
    k = int(np.searchsorted(ends, n_rows)) + 1
    counts = counts[:k].copy()
    counts[-1] -= int(ends[k - 1]) - n_rows
    return counts


def _big_chunk(
    vocab: _BigFeedVocabulary,
    rng: np.random.Generator,
    n_rows: int,
    first_product: int,
    first_row: int,
    url_prefix: str,
    image_names: pa.Array | None,
    id_offset: int,
) -> tuple[pa.Table, int]:
    counts = _rows_per_product(rng, n_rows)
    k = len(counts)
    style = rng.integers(len(vocab.style_category), size=k)
    category = vocab.style_category[style]
    colour = rng.integers(len(COLOURS), size=k)
    number = (
        np.arange(first_product, first_product + k, dtype=np.int64) * _ID_MULTIPLIER + id_offset
    ) % _ID_SPACE
    digits = pc.utf8_lpad(pa.array(number).cast(pa.string()), width=7, padding="0")
    product_id = pc.binary_join_element_wise(vocab.prefixes.take(pa.array(category)), digits, "-")
    title = vocab.titles.take(pa.array(colour * len(vocab.style_category) + style))
    brand = vocab.brands.take(pa.array(rng.integers(len(vocab.brands), size=k)))
    log_price = rng.uniform(vocab.price_lo[category], vocab.price_hi[category])
    price = np.floor(np.exp(log_price)) + np.where(rng.uniform(size=k) < 0.7, 0.99, 0.0)

    row_product = pa.array(np.repeat(np.arange(k), counts))
    starts = np.cumsum(counts) - counts
    image_index = np.arange(n_rows) - np.repeat(starts, counts)
    row_id = product_id.take(row_product)
    if image_names is not None:
        names = image_names.take(pa.array((first_row + np.arange(n_rows)) % len(image_names)))
        url = pc.binary_join_element_wise(url_prefix, names, "")
    else:
        number_in_product = vocab.image_no.take(pa.array(np.minimum(image_index, 8)))
        url = pc.binary_join_element_wise(url_prefix, row_id, "_", number_in_product, ".jpg", "")
    table = pa.table(
        {
            "product_id": row_id,
            "image_url": url,
            "title": title.take(row_product),
            "brand": brand.take(row_product),
            "category": pa.array(np.array(CATEGORIES)[category]).take(row_product),
            "price": pa.array(np.round(price, 2)).take(row_product),
        }
    )
    return table, k


def _spoil(
    table: pa.Table,
    rng: np.random.Generator,
    fraction: float,
    vocab: _BigFeedVocabulary,
    bad: dict[str, int],
) -> pa.Table:
    """Turn about ``fraction`` of the rows into the junk real feeds carry. Spoiled rows sit at odd
    positions and duplicates copy the row before, which is never spoiled itself, so every
    duplicate is an exact copy of a good row and the per-kind counts are exact."""
    n = table.num_rows
    n_bad = min(int(rng.binomial(n, fraction)), n // 2)
    if n_bad == 0:
        return table
    positions = 2 * rng.choice(n // 2, size=n_bad, replace=False) + 1
    kinds = rng.integers(len(BAD_ROW_KINDS), size=n_bad)
    masks = {}
    for i, kind in enumerate(BAD_ROW_KINDS):
        mask = np.zeros(n, dtype=bool)
        mask[positions[kinds == i]] = True
        masks[kind] = pa.array(mask)
        bad[kind] += int(mask.sum())
    null = pa.scalar(None, pa.string())
    pid = pc.if_else(masks["missing_id"], null, table["product_id"])
    url = table["image_url"]
    url = pc.if_else(masks["missing_url"], null, url)
    url = pc.if_else(
        masks["ftp_scheme"], pc.replace_substring_regex(url, r"^https?://", "ftp://"), url
    )
    garbage = vocab.garbage.take(pa.array(rng.integers(len(vocab.garbage), size=n)))
    url = pc.if_else(masks["garbage_url"], garbage, url)
    table = table.set_column(0, "product_id", pid).set_column(1, "image_url", url)
    source = np.arange(n)
    dup = positions[kinds == BAD_ROW_KINDS.index("duplicate")]
    source[dup] = dup - 1
    return table.take(pa.array(source))


def write_big_feed(
    path: Path | str,
    n_rows: int,
    base_url: str,
    *,
    image_names: Sequence[str] | None = None,
    seed: int = 0,
    bad_fraction: float = 0.0,
    chunk_rows: int = 100_000,
) -> BigFeedStats:
    """Stream a large CSV (or ``.tsv``; ``.gz`` compresses) feed with columns
    :data:`FEED_COLUMNS`, ``chunk_rows`` at a time so memory stays flat whatever ``n_rows``.

    Products get 1-5 rows each. URLs are ``{base_url}/images/{name}``: with ``image_names`` they
    cycle over those (existing) files, otherwise each is a unique ``{product_id}_{k}.jpg``.
    ``bad_fraction`` of the rows become junk, split evenly over :data:`BAD_ROW_KINDS`.
    """
    path = Path(path)
    if not 0.0 <= bad_fraction <= 0.5:
        raise ValueError("bad_fraction must be within 0..0.5")
    fmt = feed_format(path)
    if fmt not in ("csv", "tsv"):
        raise ValueError(f"write_big_feed writes csv/tsv, not {fmt}")
    rng = np.random.default_rng(seed)
    vocab = _big_vocabulary()
    names = pa.array(list(image_names)) if image_names else None
    url_prefix = f"{base_url.rstrip('/')}/images/"
    id_offset = int(rng.integers(_ID_SPACE))
    bad = dict.fromkeys(BAD_ROW_KINDS, 0)
    schema = pa.schema([(c, pa.float64() if c == "price" else pa.string()) for c in FEED_COLUMNS])
    options = pa_csv.WriteOptions(delimiter="\t" if fmt == "tsv" else ",")
    path.parent.mkdir(parents=True, exist_ok=True)
    compression = "gzip" if path.suffix.lower() == ".gz" else None
    written = products = 0
    sink = (
        pa.CompressedOutputStream(str(path), compression)
        if compression
        else pa.OSFile(str(path), "wb")
    )
    with sink, pa_csv.CSVWriter(sink, schema, write_options=options) as writer:
        while written < n_rows:
            n = min(chunk_rows, n_rows - written)
            table, k = _big_chunk(vocab, rng, n, products, written, url_prefix, names, id_offset)
            writer.write_table(_spoil(table, rng, bad_fraction, vocab, bad).cast(schema))
            written, products = written + n, products + k
    return BigFeedStats(path=path, rows=written, products=products, bad=bad)
