"""Search filters as a shopper gives them: checked once, the same way for the API, the CLI and
the web page, then applied by the live index (``models/index/live.py``) and re-checked on the
database rows of every hit.

Outcomes of bad filters:

* a colour outside the everyday vocabulary (``models.colour.COLOUR_FAMILIES``): refused
  (``FilterError``, HTTP 422 ``unknown_colour``) with the accepted words: the vocabulary is
  closed and small, so a wrong word is a mistake worth telling;
* a price range with min above max, a negative or non-finite price: refused (422
  ``bad_price_range``);
* a catalog, brand or category that no indexed crop has: not an error. A shopper's filter
  from a link or a stale page may name a brand the store no longer carries; the honest answer
  is "no products", and the response says which value matched nothing (``notes``), so a typo
  is visible too.
"""

from __future__ import annotations

import math
from typing import Any

from models.colour import COLOUR_FAMILIES
from models.index.live import CropFilter, word


class FilterError(ValueError):
    """A filter refused before searching: ``reason`` is a machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


ACCEPTED_COLOURS = ", ".join(COLOUR_FAMILIES)


def make_filter(
    *,
    catalog: str | None = None,
    category: str | None = None,
    brand: str | None = None,
    colour: str | None = None,
    min_price: float | None = None,
    max_price: float | None = None,
    in_stock: bool | None = None,
) -> CropFilter:
    """A checked ``CropFilter``; FilterError for a value that can never match sensibly."""
    family = None
    if colour is not None and word(colour) is not None:
        family = word(colour)
        if family not in COLOUR_FAMILIES:
            raise FilterError(
                "unknown_colour",
                f"colour {colour!r} is not a colour family; use one of: {ACCEPTED_COLOURS}",
            )
    for name, value in (("min_price", min_price), ("max_price", max_price)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise FilterError(
                "bad_price_range", f"{name} must be a price of 0 or more, not {value}"
            )
    if min_price is not None and max_price is not None and min_price > max_price:
        raise FilterError(
            "bad_price_range",
            f"min_price ({min_price:g}) is above max_price ({max_price:g}): no price is in that "
            "range",
        )
    return CropFilter(
        catalog=_text(catalog),
        category=_text(category),
        brand=_text(brand),
        colour_family=family,
        min_price=min_price,
        max_price=max_price,
        in_stock=in_stock,
    )


def _text(value: str | None) -> str | None:
    return value.strip() if value is not None and value.strip() else None


def describe(wanted: CropFilter) -> dict[str, Any]:
    """The filters in force, by their API names (for the response)."""
    names = {
        "catalog": wanted.catalog,
        "category": wanted.category,
        "brand": wanted.brand,
        "colour": wanted.colour_family,
        "min_price": wanted.min_price,
        "max_price": wanted.max_price,
        "in_stock": wanted.in_stock,
    }
    return {k: v for k, v in names.items() if v is not None}


def passes(wanted: CropFilter, row: Any) -> bool:
    """Whether a hit's database row (``search._CropRow``) is inside ``wanted``: the final word,
    so a filter never leaks even when the live index is a poll behind the database."""
    if not row.served:
        return False

    def same(a: str | None, b: str | None) -> bool:
        return word(a) == word(b)

    if wanted.catalog is not None and not same(row.catalog, wanted.catalog):
        return False
    if wanted.brand is not None and not same(row.brand, wanted.brand):
        return False
    if wanted.colour_family is not None and not same(row.colour_family, wanted.colour_family):
        return False
    if wanted.category is not None and not any(
        same(v, wanted.category) for v in (row.category, row.label, row.coarse_label)
    ):
        return False
    price = row.price
    if wanted.min_price is not None and (price is None or price < wanted.min_price):
        return False
    if wanted.max_price is not None and (price is None or price > wanted.max_price):
        return False
    return wanted.in_stock is None or (
        row.in_stock is not None and bool(row.in_stock) == wanted.in_stock
    )


def notes_for(unknown: dict[str, str]) -> list[str]:
    """Plain sentences for the filter values no indexed crop has."""
    return [f"no indexed product has {name} {value!r}" for name, value in unknown.items()]
