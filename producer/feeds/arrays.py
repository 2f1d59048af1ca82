"""Arrow helpers shared by the validation modules (URLs, prices, chunk validation)."""

from __future__ import annotations

from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NULL_TEXT: Final = pa.scalar(None, pa.string())


def true_mask(mask: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, null counting as False."""
    return np.asarray(pc.fill_null(mask, False), dtype=bool)


def is_list(arr: pa.Array) -> bool:
    return pa.types.is_list(arr.type)


def empty_mask(col: pa.Array) -> np.ndarray:
    """True where a (trimmed) value is null, "" or an empty list."""
    if is_list(col):
        lengths = pc.list_value_length(col)
        return np.asarray(pc.fill_null(pc.equal(lengths, 0), True))
    return np.asarray(pc.fill_null(pc.equal(col, ""), True))
