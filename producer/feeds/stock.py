"""Stock and listing state from a feed's ``availability`` and ``deleted`` columns.

``availability`` (the values merchant feeds use, Google Shopping's among them):

==========================================================  ==========  =============
value (case, spaces, ``_`` and ``-`` ignored)                in_stock    the product
==========================================================  ==========  =============
in stock, available, limited availability, yes, true, 1     True        listed
out of stock, sold out, unavailable, preorder, backorder,   False       listed
no, false, 0
discontinued, deleted, removed, delisted, retired           (kept)      delisted
empty                                                       None        listed
anything else                                               None        listed, with
                                                                        ``unknown_availability``
==========================================================  ==========  =============

``deleted``: true/yes/y/1/x delists the row's product, false/no/n/0 or empty does not, anything
else is ``unknown_availability`` (and does not delist). Either column may delist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_IN_STOCK: Final = frozenset(
    {"in stock", "instock", "available", "limited availability", "yes", "true", "1"}
)
_OUT_OF_STOCK: Final = frozenset(
    {
        "out of stock",
        "outofstock",
        "sold out",
        "soldout",
        "unavailable",
        "not available",
        "preorder",
        "pre order",
        "backorder",
        "back order",
        "no",
        "false",
        "0",
    }
)
_DELISTED: Final = frozenset({"discontinued", "deleted", "removed", "delisted", "retired"})
_TRUE: Final = frozenset({"true", "yes", "y", "1", "x"})
_FALSE: Final = frozenset({"false", "no", "n", "0"})


@dataclass
class Stock:
    """Per row: ``in_stock`` (object: True, False or None), ``delist`` (bool), and whether
    the ``availability`` or the ``deleted`` value is one neither table knows."""

    in_stock: np.ndarray
    delist: np.ndarray
    unknown_availability: np.ndarray
    unknown_deleted: np.ndarray


def _key(value: str) -> str:
    return re.sub(r"[\s_\-]+", " ", value.strip().lower()).strip()


def _classify(col: pa.Array, table: dict[str, int]) -> np.ndarray:
    """Each row's class (``table`` maps a value's key to one; -1: empty, -2: unknown),
    computed once per distinct value."""
    encoded = pc.dictionary_encode(col)
    classes = np.array(
        [table.get(_key(v), -2) if v and _key(v) else -1 for v in encoded.dictionary.to_pylist()]
        + [-1],
        dtype=np.int64,
    )
    indices = pc.fill_null(encoded.indices, len(classes) - 1)
    return classes[np.asarray(indices, dtype=np.int64)]


_AVAILABILITY: Final = {
    **{k: 1 for k in _IN_STOCK},
    **{k: 0 for k in _OUT_OF_STOCK},
    **{k: 2 for k in _DELISTED},
}
_DELETED: Final = {**{k: 1 for k in _TRUE}, **{k: 0 for k in _FALSE}}


def read_stock(availability: pa.Array, deleted: pa.Array) -> Stock:
    """The stock state of every row from its two (possibly all-null) text columns."""
    states = _classify(availability, _AVAILABILITY)
    flags = _classify(deleted, _DELETED)
    in_stock = np.full(len(states), None, dtype=object)
    in_stock[states == 1] = True
    in_stock[states == 0] = False
    delist = (states == 2) | (flags == 1)
    return Stock(in_stock, delist, states == -2, flags == -2)
