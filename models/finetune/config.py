"""How a fine-tuning run trains (``TrainConfig``) and when its model is promoted
(``PromotionRule``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.finetune.retrieval import IMAGE_TO_IMAGE, TEXT_TO_IMAGE


@dataclass
class TrainConfig:
    """How one fine-tuning run trains. Defaults suit a pretrained CLIP ViT-B/32."""

    epochs: int = 3
    batch_size: int = 64  # contrastive: more in-batch negatives per step; 64 fits any GPU in bf16
    lr: float = 1e-5  # pretrained CLIP forgets quickly above ~5e-5; random tiny models want ~1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; <= 0 turns clipping off
    eval_fraction: float = 0.2  # share of *products* held out for evaluation
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimiser steps (None: run all epochs)
    train_text_tower: bool = True
    train_vision_tower: bool = True
    frozen_vision_layers: int = 0  # patch embeddings + this many first vision layers stay fixed
    train_logit_scale: bool = True
    eval_batch_size: int = 64
    # Each step words a pair's text afresh: its shopper query ("a navy jacket") or any prompt
    # template around it, so the model learns the colour and garment words, not one sentence.
    text_variants: bool = True
    # Each step sees a random crop (at least ``augment_min_area`` of the image) of each image,
    # sometimes mirrored: never a colour change, since colour is what the text names.
    image_augment: bool = True
    augment_min_area: float = 0.7

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: a contrastive batch needs negatives")
        if self.epochs < 0 or (self.max_steps is not None and self.max_steps < 0):
            raise ValueError("epochs and max_steps must be >= 0")
        if self.lr < 0 or not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError("lr must be >= 0 and warmup_fraction in [0, 1]")
        if not 0.0 < self.augment_min_area <= 1.0:
            raise ValueError("augment_min_area must be in (0, 1]")


@dataclass(frozen=True)
class PromotionRule:
    """Promote when the mean of ``metrics`` (``(task, metric)`` pairs) on the held-out products
    rose by at least ``min_improvement`` (absolute) and strictly. A metric that has no queries
    before or after (no product with two crops, say) is left out of the mean; with none left,
    nothing is promoted."""

    metrics: tuple[tuple[str, str], ...] = (
        (TEXT_TO_IMAGE, "recall@5"),
        (IMAGE_TO_IMAGE, "recall@5"),
    )
    min_improvement: float = 0.01

    def score(self, metrics: dict[str, dict[str, Any]], usable: set[tuple[str, str]]) -> float:
        values = [
            float(metrics[task][name]) for task, name in self.metrics if (task, name) in usable
        ]
        return float(np.mean(values)) if values else float("nan")

    def decide(
        self, before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
    ) -> tuple[bool, float, float]:
        """``(promoted, score_before, score_after)``."""
        usable = {
            (task, name)
            for task, name in self.metrics
            if before.get(task, {}).get(name) is not None
            and after.get(task, {}).get(name) is not None
        }
        if not usable:
            return False, float("nan"), float("nan")
        score_before, score_after = self.score(before, usable), self.score(after, usable)
        gain = score_after - score_before
        return gain > 0 and gain >= self.min_improvement, score_before, score_after
