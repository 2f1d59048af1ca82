"""The raw chunk: what every format reader produces, before any validation.

Readers differ in how they find rows; from here on every format looks the same: header names,
one text column per name, and the source row number of each row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from producer.feeds.errors import RejectedRow


@dataclass
class RawChunk:
    names: list[str]  # unique, trimmed header names
    # One array per name: pa.string(), or pa.list_(pa.string()) for Parquet list columns.
    columns: list[pa.Array]
    row_numbers: np.ndarray  # int64, one per row of the columns
    malformed: list[RejectedRow] = field(default_factory=list)
    blank_lines: int = 0  # whitespace-only lines the parser dropped

    @property
    def rows_read(self) -> int:
        return len(self.row_numbers) + len(self.malformed) + self.blank_lines


@dataclass
class Source:
    names: list[str] | None  # the header; None when the format has none (JSON Lines)
    chunks: Iterator[RawChunk]
    close: Callable[[], None] = lambda: None


def unique_names(header: Iterable[object]) -> list[str]:
    """Trimmed header names; blanks become ``column_N`` and repeats get ``_2``, ``_3``…"""
    names: list[str] = []
    seen: set[str] = set()
    for i, value in enumerate(header, start=1):
        name = "" if value is None else str(value).strip().lstrip("\ufeff").strip()
        name = name or f"column_{i}"
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate)
        names.append(candidate)
    return names
