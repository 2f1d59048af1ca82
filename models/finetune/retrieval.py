"""Held-out retrieval metrics: text→image and image→image recall@k of an encoder.

Text→image asks what a shopper types, "a/an {colour family} {garment}" (:attr:`Pair.query`:
"a navy jacket", "a pair of black shoes"), not the crops' own prompts: a prompt is what the model
trains on ("a studio photo of a navy jacket"), and recall on the training sentence form says
little about the searches people run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from models.finetune.data import Pair, value_codes

RECALL_KS: tuple[int, ...] = (1, 5, 10)
TEXT_TO_IMAGE = "text_to_image"
IMAGE_TO_IMAGE = "image_to_image"
# Queries are ranked this many at a time, so a 20k-crop held-out set needs 1024 x 20k score and
# relevance matrices, not 20k x 20k.
QUERY_CHUNK = 1024
# Crops decoded and embedded at a time during evaluation (bounds the PIL images held in memory).
EVAL_IMAGE_CHUNK = 256


class Encoder(Protocol):
    """What evaluation needs: :class:`Embedder` and the in-training model both provide it."""

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def _first_hit_ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Per query row, the 0-based rank of its best-ranked relevant item (the gallery size when
    there is none). The sort is stable, so ties keep gallery order: a model that scores
    everything alike cannot look better than chance by luck of the sort."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(relevant, order, axis=1)
    return np.where(ranked.any(axis=1), ranked.argmax(axis=1), scores.shape[1])


def _recalls(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float | None]:
    """Share of queries with a relevant item in the top k: CLIP's R@k, where a search succeeds
    when *a* right answer is shown, however many more there are."""
    if ranks.size == 0:
        return {f"recall@{k}": None for k in ks}
    return {f"recall@{k}": float((ranks < k).mean()) for k in ks}


def text_to_image_recall(
    text_vectors: np.ndarray,
    texts: Sequence[str],
    image_vectors: np.ndarray,
    descriptions: Sequence[str],
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, Any]:
    """Queries are the *distinct* texts (a query shared by many crops is asked once, so common
    items do not dominate); the gallery is every crop; a crop is relevant to a query when its
    description equals that of the crop(s) the query was written for. ``text_vectors[i]``
    embeds ``texts[i]``, the query of crop ``i``."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    rows = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    codes = value_codes(descriptions)
    ranks = [
        _first_hit_ranks(text_vectors[q] @ image_vectors.T, codes[q, None] == codes[None, :])
        for q in np.array_split(rows, max(1, math.ceil(rows.size / QUERY_CHUNK)))
    ]
    return {
        **_recalls(np.concatenate(ranks), ks),
        "queries": int(rows.size),
        "gallery": len(descriptions),
    }


def image_to_image_recall(
    image_vectors: np.ndarray, product_ids: Sequence[int], ks: Sequence[int] = RECALL_KS
) -> dict[str, Any]:
    """Each crop whose product has another crop queries the gallery of all *other* crops; the
    relevant ones are its product's other crops (other views of the same item). Single-crop
    products ask nothing but stay in the gallery as distractors."""
    products = value_codes(product_ids)
    rows = np.flatnonzero(np.bincount(products)[products] > 1)
    ranks = []
    for q in np.array_split(rows, max(1, math.ceil(rows.size / QUERY_CHUNK))):
        scores = image_vectors[q] @ image_vectors.T
        relevant = products[q, None] == products[None, :]
        # The query leaves its own gallery: sorted last, never relevant.
        scores[np.arange(q.size), q] = -np.inf
        relevant[np.arange(q.size), q] = False
        ranks.append(_first_hit_ranks(scores, relevant))
    return {
        **_recalls(np.concatenate(ranks), ks),
        "queries": int(rows.size),
        "gallery": max(0, len(products) - 1),
    }


def evaluate_retrieval(encoder: Encoder, eval_pairs: Sequence[Pair]) -> dict[str, dict[str, Any]]:
    """Text→image (shoppers' queries, :attr:`Pair.query`) and image→image recall@1/5/10 of
    ``encoder`` over ``eval_pairs``."""
    if not eval_pairs:
        raise ValueError("no pairs to evaluate on")
    chunks = [
        eval_pairs[i : i + EVAL_IMAGE_CHUNK] for i in range(0, len(eval_pairs), EVAL_IMAGE_CHUNK)
    ]
    image_vectors = np.concatenate([encoder.embed_images([p.image() for p in c]) for c in chunks])
    texts = [pair.query for pair in eval_pairs]
    text_vectors = encoder.embed_texts(texts)
    return {
        TEXT_TO_IMAGE: text_to_image_recall(
            text_vectors, texts, image_vectors, [p.description for p in eval_pairs]
        ),
        IMAGE_TO_IMAGE: image_to_image_recall(image_vectors, [p.product_id for p in eval_pairs]),
    }
