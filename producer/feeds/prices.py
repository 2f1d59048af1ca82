"""Price parsing: feed price text to a number and, when the text names one, its currency.

Plain numbers ("19.99") are parsed on the whole Arrow column at once; anything else ("€1.234,50",
"12,99 EUR", "$1,299.00", "free") goes through :func:`parse_price`, one value at a time (few
rows are like that). No installed library parses prices, so this is a small table-tested
parser: a currency symbol or ISO 4217 code before or after the number, thousands separators
(",", ".", space, apostrophe) and a decimal comma or point, and the words that mean zero.

A price text that is there but is not a price (negative, "call us", "12abc34") is *unreadable*:
the row keeps its image, gets no price, and the feed reports it (``unreadable_price``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from producer.feeds.arrays import NULL_TEXT, empty_mask, true_mask

_PLAIN_NUMBER: Final = r"^\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
# Symbols shoppers see, longest first so "US$" wins over "$".
_SYMBOLS: Final = {
    "US$": "USD",
    "CA$": "CAD",
    "C$": "CAD",
    "AU$": "AUD",
    "A$": "AUD",
    "NZ$": "NZD",
    "HK$": "HKD",
    "R$": "BRL",
    "€": "EUR",
    "$": "USD",
    "£": "GBP",
    "¥": "JPY",
    "₹": "INR",
    "₩": "KRW",
    "₽": "RUB",
    "₺": "TRY",
    "₪": "ILS",
    "zł": "PLN",
    "Kč": "CZK",
}
_FREE: Final = frozenset({"free", "gratis", "gratuit", "kostenlos", "free of charge"})
_SYMBOL_RE: Final = "|".join(re.escape(s) for s in sorted(_SYMBOLS, key=len, reverse=True))
_CURRENCY_AT_START: Final = re.compile(
    rf"^(?:(?P<code>[A-Z]{{3}})(?![A-Za-z])|(?P<sym>{_SYMBOL_RE}))\s*"
)
_CURRENCY_AT_END: Final = re.compile(
    rf"\s*(?:(?<![A-Za-z])(?P<code>[A-Z]{{3}})|(?P<sym>{_SYMBOL_RE}))$"
)
_NUMBER: Final = re.compile(r"^\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")
_THOUSANDS_COMMA: Final = re.compile(r"^[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?$")  # 1,299.00
_DECIMAL_COMMA: Final = re.compile(r"^[0-9]{1,3}(?:\.[0-9]{3})+(?:,[0-9]+)?$|^[0-9]+,[0-9]+$")
_GROUPING: Final = re.compile(r"(?<=[0-9])[\s'\u00a0\u202f\u2009](?=[0-9]{3}\b)")  # 1 299 / 1'299


@dataclass
class Prices:
    """Per row: ``values`` (float64, NaN when absent or unreadable), ``currencies`` (ISO 4217
    code or None) and ``unreadable`` (a price text was there but is not a price)."""

    values: np.ndarray
    currencies: np.ndarray
    unreadable: np.ndarray


def parse_price(text: str) -> tuple[float, str | None] | None:
    """``(value, currency or None)`` for one price text; None when it is not a price."""
    text = text.strip()
    if text.lower() in _FREE:
        return 0.0, None
    currency = None
    for pattern in (_CURRENCY_AT_START, _CURRENCY_AT_END):
        found = pattern.search(text)
        if found:
            currency = found["code"] or _SYMBOLS[found["sym"]]
            text = (text[: found.start()] + text[found.end() :]).strip()
            break
    text = _GROUPING.sub("", text)
    if _THOUSANDS_COMMA.match(text):
        text = text.replace(",", "")
    elif _DECIMAL_COMMA.match(text):
        text = text.replace(".", "").replace(",", ".")
    if not _NUMBER.match(text):
        return None
    value = float(text)
    if not np.isfinite(value):
        return None
    return value, currency


def parse_prices(col: pa.Array) -> Prices:
    """Every row's price; see :class:`Prices`."""
    n = len(col)
    plain = true_mask(pc.match_substring_regex(col, _PLAIN_NUMBER))
    values = _to_float(col, plain)
    currencies = np.full(n, None, dtype=object)
    unreadable = np.zeros(n, dtype=bool)
    odd = np.flatnonzero(~plain & ~empty_mask(col))
    seen: dict[str, tuple[float, str | None] | None] = {}  # a feed repeats its price texts
    for row, text in zip(odd, col.take(pa.array(odd, pa.int64())).to_pylist(), strict=True):
        if text not in seen:
            seen[text] = parse_price(text)
        parsed = seen[text]
        if parsed is None:
            unreadable[row] = True
        else:
            values[row], currencies[row] = parsed
    bad = ~np.isfinite(values) & ~np.isnan(values)  # 1e999: a plain number, not a price
    unreadable |= bad
    values[bad] = np.nan
    return Prices(values, currencies, unreadable)


def _to_float(col: pa.Array, valid: np.ndarray) -> np.ndarray:
    text = pc.if_else(pa.array(valid), col, NULL_TEXT)
    values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.float64)  # a writable copy; nulls arrive as NaN
