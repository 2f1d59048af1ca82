"""Price parsing (vectorised): feed price text to float64, NaN when it is not a price."""

from __future__ import annotations

from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from producer.feeds.arrays import NULL_TEXT, empty_mask, true_mask

_PLAIN_NUMBER: Final = r"^\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_CURRENCY: Final = r"^(?:[A-Za-z]{3}|\p{Sc})\s*|\s*(?:[A-Za-z]{3}|\p{Sc})$"
_THOUSANDS_COMMA: Final = r"^[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?$"  # 1,299.00
_DECIMAL_COMMA: Final = r"^[0-9]{1,3}(?:\.[0-9]{3})+(?:,[0-9]+)?$|^[0-9]+,[0-9]+$"  # 1.299,00


def parse_prices(col: pa.Array) -> np.ndarray:
    """float64 per row; NaN where empty or not a finite number >= 0."""
    plain = true_mask(pc.match_substring_regex(col, _PLAIN_NUMBER))
    prices = _to_float(col, plain)
    odd = np.flatnonzero(~plain & ~empty_mask(col))
    if len(odd):
        # "19.99 USD", "$1,299.00", "12,50 €": strip the currency, settle the separators.
        text = pc.replace_substring_regex(col.take(pa.array(odd)), _CURRENCY, "")
        thousands = pc.fill_null(pc.match_substring_regex(text, _THOUSANDS_COMMA), False)
        decimal = pc.fill_null(pc.match_substring_regex(text, _DECIMAL_COMMA), False)
        text = pc.if_else(thousands, pc.replace_substring(text, ",", ""), text)
        european = pc.replace_substring(pc.replace_substring(text, ".", ""), ",", ".")
        text = pc.if_else(decimal, european, text)
        prices[odd] = _to_float(text, true_mask(pc.match_substring_regex(text, _PLAIN_NUMBER)))
    prices[~np.isfinite(prices)] = np.nan
    return prices


def _to_float(col: pa.Array, valid: np.ndarray) -> np.ndarray:
    text = pc.if_else(pa.array(valid), col, NULL_TEXT)
    values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.float64)  # a writable copy; nulls arrive as NaN
