"""Column roles: which feed column holds the product id, the image URL, the title …

:class:`FeedColumns` is what a caller asks for; :func:`resolve_roles` finds those columns in a
feed's header (with a few common aliases) and calls every other column an extra.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from producer.feeds.errors import FeedError


@dataclass(frozen=True)
class FeedColumns:
    """Which feed columns hold what. Matching ignores case, surrounding whitespace and the
    difference between spaces, ``_`` and ``-``; ``id`` and ``url`` also fall back to a few
    common aliases. Optional columns set to None (or absent from the feed) come out as None."""

    id: str = "product_id"
    url: str = "image_url"
    title: str | None = "title"
    brand: str | None = "brand"
    category: str | None = "category"
    price: str | None = "price"
    # Catalog sync: the price's ISO 4217 code (when the price text names none), the stock
    # state ("in stock", "out of stock", "discontinued" …) and an explicit delete flag.
    currency: str | None = "currency"
    availability: str | None = "availability"
    deleted: str | None = "deleted"
    # A URL cell may list several images separated by this; None: one URL per cell.
    url_separator: str | None = "|"

    def __post_init__(self) -> None:
        if not self.id or not self.url:
            raise ValueError("FeedColumns.id and FeedColumns.url must be non-empty")
        if self.url_separator == "":
            raise ValueError("FeedColumns.url_separator must be None or non-empty")


_ID_ALIASES: Final = ("id", "sku", "product id")
_URL_ALIASES: Final = ("image_link", "image", "url", "image url")


@dataclass(frozen=True)
class Roles:
    """Column positions for each role (None: not in the feed) and the rest, as extras."""

    id: int | None
    url: int | None
    title: int | None
    brand: int | None
    category: int | None
    price: int | None
    currency: int | None
    availability: int | None
    deleted: int | None
    extras: tuple[int, ...]


def _name_key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


def resolve_roles(names: list[str], spec: FeedColumns, *, strict: bool) -> Roles:
    positions: dict[str, int] = {}
    for i, name in enumerate(names):
        positions.setdefault(_name_key(name), i)

    def find(wanted: str | None, aliases: tuple[str, ...] = ()) -> int | None:
        if wanted is None:
            return None
        for candidate in (wanted, *aliases):
            if (i := positions.get(_name_key(candidate))) is not None:
                return i
        return None

    id_pos, url_pos = find(spec.id, _ID_ALIASES), find(spec.url, _URL_ALIASES)
    if strict:
        for label, pos, wanted, aliases in (
            ("product-id", id_pos, spec.id, _ID_ALIASES),
            ("image-URL", url_pos, spec.url, _URL_ALIASES),
        ):
            if pos is None:
                raise FeedError(
                    f"feed has no {label} column: looked for {wanted!r} (or "
                    f"{', '.join(map(repr, aliases))}); columns found: "
                    f"{', '.join(map(repr, names)) or 'none'}"
                )
    if id_pos is not None and id_pos == url_pos:
        raise FeedError(f"the same column {names[id_pos]!r} cannot be both product id and URL")
    taken = {id_pos, url_pos}

    def optional(wanted: str | None) -> int | None:
        pos = find(wanted)
        if pos in taken:
            return None
        taken.add(pos)
        return pos

    title, brand = optional(spec.title), optional(spec.brand)
    category, price = optional(spec.category), optional(spec.price)
    currency, availability = optional(spec.currency), optional(spec.availability)
    deleted = optional(spec.deleted)
    extras = tuple(i for i in range(len(names)) if i not in taken)
    return Roles(
        id_pos, url_pos, title, brand, category, price, currency, availability, deleted, extras
    )
