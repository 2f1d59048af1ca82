"""The training data: (crop, prompt) pairs, their split by product, and "same description"."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from models.colour import family_of
from models.labels import label_by_name
from models.prompts import noun_phrase

if TYPE_CHECKING:
    from flickd.core.blobstore import BlobStore


@dataclass(frozen=True)
class Pair:
    """One analysed crop and the prompt written for it; pixels are read from the blob store only
    when asked for (:meth:`image`), so a large catalog's pairs cost a few bytes each."""

    crop_id: int
    product_id: int
    blob_key: str
    prompt: str
    colour_name: str | None
    fine_label: str | None
    blob_dir: Path | BlobStore  # a local blob directory, or the storage's blob store
    colour_family: str | None = None  # crops.colour_family; None: the fine name's family

    @property
    def family(self) -> str | None:
        """The everyday colour word a shopper would use for the crop ("navy", "multicolour")."""
        return self.colour_family or family_of(self.colour_name)

    @property
    def description(self) -> str:
        """What a shopper's query says about the crop: equal descriptions mean "same colour
        family, same item", i.e. each crop is a right answer to the other's query ("a navy
        jacket"), whatever its fine colour name ("marine", "navy blue") or prompt template.
        Crops with neither field (never written by the pipeline) fall back to the text."""
        if self.colour_name is None and self.fine_label is None and self.colour_family is None:
            return self.prompt
        return f"{self.family or ''}|{self.fine_label or ''}"

    @property
    def query(self) -> str:
        """The shopper's query this crop answers: "a navy jacket", "a pair of black shoes"
        (the prompt's noun phrase, without a template). Crops without a label or colour fall
        back to their prompt."""
        if self.fine_label is None and self.family is None:
            return self.prompt
        label = label_by_name(self.fine_label) if self.fine_label else None
        return noun_phrase(label, self.family)

    def image(self) -> Image.Image:
        from flickd.core.blobstore import BlobStore

        store = self.blob_dir if isinstance(self.blob_dir, BlobStore) else BlobStore(self.blob_dir)
        with Image.open(io.BytesIO(store.get(self.blob_key))) as image:
            return image.convert("RGB")


def _unit_hash(seed: int, product_id: int) -> float:
    digest = hashlib.sha256(f"{seed}:{product_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_product(
    pairs: Sequence[Pair], eval_fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """``(train, eval)``: every crop of a product lands on the same side.

    A product is held out when a hash of ``(seed, product_id)`` falls below ``eval_fraction``.
    Its side therefore never depends on which other products exist: when the catalog grows, or a
    fine-tuned model is fine-tuned again with the same seed, no product that earlier runs trained
    on moves into the evaluation set. The held-out share is ``eval_fraction`` on average (about
    ±4 products in 100).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), not {eval_fraction}")
    held_out = {p.product_id for p in pairs if _unit_hash(seed, p.product_id) < eval_fraction}
    train = [p for p in pairs if p.product_id not in held_out]
    evaluation = [p for p in pairs if p.product_id in held_out]
    if not train or not evaluation:
        n_products = len({p.product_id for p in pairs})
        raise ValueError(
            f"{n_products} products give an empty {'training' if not train else 'evaluation'} "
            f"side at eval_fraction={eval_fraction}, seed={seed}; fine-tuning needs both"
        )
    return train, evaluation


def value_codes(values: Sequence[object]) -> np.ndarray:
    """Equal values, equal integer codes: comparisons of codes are cheap matrix operations."""
    return np.unique(np.asarray(values, dtype=object), return_inverse=True)[1].reshape(-1)


def same_description(descriptions: Sequence[str]) -> np.ndarray:
    """(n, n) bool: ``[i, j]`` when pairs i and j describe the same thing (diagonal included)."""
    codes = value_codes(descriptions)
    return codes[:, None] == codes[None, :]
