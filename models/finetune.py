"""Fine-tune the CLIP embedder on the catalog's own (crop, prompt) pairs, and prove it helped.

The prototype fine-tuned blind: a random 90/10 split of *crops* (so views of one product sat on
both sides), lr 5e-7, and only a validation loss to look at. Here:

* the held-out split is by **product** (:func:`split_by_product`), so no product is seen in
  training and then "retrieved" in evaluation;
* retrieval is measured on the held-out products **before and after** training
  (:func:`evaluate_retrieval`): text→image and image→image recall@1/5/10;
* the new model is **promoted** only when those numbers improve (:class:`PromotionRule`), and
  every run is recorded as a ``model_versions`` row whose parent is the base model.

Relevance, as used for both the training targets and the metrics: two crops *describe the same
thing* when their colour name and fine label are equal (:attr:`Pair.description`). The prompt
text itself is not the unit, because its template ("a photo of …", "an image of …") is picked by
a hash of the crop, not by its content; "a photo of a navy dress" and "an image of a navy dress"
are the same query.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flickd.core.settings import Settings
from models.device import autocast_dtype, select_device
from models.embedder import Embedder, _projected
from models.loading import load_pretrained, model_version, pretrained_kwargs

log = logging.getLogger(__name__)

RECALL_KS: tuple[int, ...] = (1, 5, 10)
TEXT_TO_IMAGE = "text_to_image"
IMAGE_TO_IMAGE = "image_to_image"
# CLIP clamps its learned temperature so logits never exceed 100 x cosine (the paper's choice).
MAX_LOGIT_SCALE = math.log(100.0)
# The report lives in a sub-folder: ``fingerprint_dir`` hashes the model folder's top-level .json
# files, so a report.json beside config.json would change the version that ``Embedder`` computes.
REPORT_DIR = "training-report"


# --- configuration --------------------------------------------------------------------------------
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

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: a contrastive batch needs negatives")
        if self.epochs < 0 or (self.max_steps is not None and self.max_steps < 0):
            raise ValueError("epochs and max_steps must be >= 0")
        if self.lr < 0 or not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError("lr must be >= 0 and warmup_fraction in [0, 1]")


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


# --- data -----------------------------------------------------------------------------------------
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
    blob_dir: Path

    @property
    def description(self) -> str:
        """What the prompt says about the crop, without the template wording: equal descriptions
        mean "same colour name, same item", i.e. each crop is a right answer to the other's
        prompt. Crops with neither field (never written by the pipeline) fall back to the text."""
        if self.colour_name is None and self.fine_label is None:
            return self.prompt
        return f"{self.colour_name or ''}|{self.fine_label or ''}"

    def image(self) -> Image.Image:
        from flickd.core.blobstore import BlobStore

        with Image.open(io.BytesIO(BlobStore(self.blob_dir).get(self.blob_key))) as image:
            return image.convert("RGB")


def load_pairs(settings: Settings, model_version_id: int | None = None) -> list[Pair]:
    """Every crop of an analysed image that has a prompt and a stored crop JPEG, in crop order.

    With ``model_version_id``, only crops embedded by that model version (the catalog the model
    being fine-tuned actually indexed).
    """
    from sqlalchemy import select

    from db.schema import Crop, Embedding, ImageState
    from db.schema import Image as ImageRow
    from db.session import session_scope

    query = (
        select(
            Crop.id, ImageRow.product_id, Crop.blob_key, Crop.prompt, Crop.colour_name,
            Crop.fine_label,
        )
        .join(ImageRow, ImageRow.id == Crop.image_id)
        .where(
            ImageRow.state == ImageState.ANALYZED.value,
            Crop.prompt.is_not(None),
            Crop.blob_key.is_not(None),
        )
        .order_by(Crop.id)
    )  # fmt: skip
    if model_version_id is not None:
        query = query.join(Embedding, Embedding.crop_id == Crop.id).where(
            Embedding.model_version_id == model_version_id
        )
    blob_dir = Path(settings.blob_dir)
    with session_scope(settings) as session:
        rows = session.execute(query).all()
    return [
        Pair(r.id, r.product_id, r.blob_key, r.prompt, r.colour_name, r.fine_label, blob_dir)
        for r in rows
    ]


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


def _codes(values: Sequence[object]) -> np.ndarray:
    """Equal values, equal integer codes: comparisons of codes are cheap matrix operations."""
    return np.unique(np.asarray(values, dtype=object), return_inverse=True)[1].reshape(-1)


def same_description(descriptions: Sequence[str]) -> np.ndarray:
    """(n, n) bool: ``[i, j]`` when pairs i and j describe the same thing (diagonal included)."""
    codes = _codes(descriptions)
    return codes[:, None] == codes[None, :]


# --- evaluation -----------------------------------------------------------------------------------
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
    """Queries are the *distinct* prompt texts (a prompt shared by many crops is asked once, so
    common items do not dominate); the gallery is every crop; a crop is relevant to a query when
    its description equals that of the crop(s) the query was written for, whatever template
    either used. ``text_vectors[i]`` embeds ``texts[i]``, the prompt of crop ``i``."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    rows = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    codes = _codes(descriptions)
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
    products = _codes(product_ids)
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
    """Text→image and image→image recall@1/5/10 of ``encoder`` over ``eval_pairs``."""
    if not eval_pairs:
        raise ValueError("no pairs to evaluate on")
    chunks = [
        eval_pairs[i : i + EVAL_IMAGE_CHUNK] for i in range(0, len(eval_pairs), EVAL_IMAGE_CHUNK)
    ]
    image_vectors = np.concatenate([encoder.embed_images([p.image() for p in c]) for c in chunks])
    texts = [pair.prompt for pair in eval_pairs]
    text_vectors = encoder.embed_texts(texts)
    return {
        TEXT_TO_IMAGE: text_to_image_recall(
            text_vectors, texts, image_vectors, [p.description for p in eval_pairs]
        ),
        IMAGE_TO_IMAGE: image_to_image_recall(image_vectors, [p.product_id for p in eval_pairs]),
    }


class _LoadedEmbedder(Embedder):
    """An :class:`Embedder` around a model already in memory, so evaluation embeds exactly as
    production will (same preprocessing, truncation, mixed precision and normalisation)."""

    def __init__(self, clip: _Clip, batch_size: int) -> None:  # no super(): nothing to load
        self.name_or_dir = clip.name
        self.device = clip.device
        self.batch_size = batch_size
        self.model = clip.model
        self.image_processor = clip.processor
        self.tokenizer = clip.tokenizer
        self.model_version = clip.version
        self._max_text_tokens = clip.max_text_tokens


# --- model ----------------------------------------------------------------------------------------
@dataclass
class _Clip:
    name: str
    source: str  # where it was loaded from (resolved directory or hub id)
    model: Any  # CLIPModel
    processor: Any
    tokenizer: Any
    device: torch.device
    version: str

    @property
    def max_text_tokens(self) -> int:
        return min(
            int(self.tokenizer.model_max_length),
            int(self.model.config.text_config.max_position_embeddings),
        )


def _load_clip(name: str, device: torch.device) -> _Clip:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    source, kwargs = pretrained_kwargs(name)
    model = load_pretrained(CLIPModel.from_pretrained, source, "CLIP model", **kwargs)
    processor = load_pretrained(
        AutoImageProcessor.from_pretrained, source, "CLIP image processor", **kwargs
    )
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, "CLIP tokenizer", **kwargs)
    # Train in float32 whatever the checkpoint's dtype: autocast does the reduced precision.
    model = model.float().to(device)
    return _Clip(
        name, source, model, processor, tokenizer, device, model_version(name, source, model)
    )


def _set_trainable(model: Any, config: TrainConfig) -> None:
    """Apply the freeze options. A "tower" is its encoder plus its projection."""
    towers = {
        "vision": (config.train_vision_tower, (model.vision_model, model.visual_projection)),
        "text": (config.train_text_tower, (model.text_model, model.text_projection)),
    }
    for trainable, modules in towers.values():
        for module in modules:
            module.requires_grad_(trainable)
    if config.train_vision_tower and config.frozen_vision_layers > 0:
        vision = model.vision_model
        vision.embeddings.requires_grad_(False)
        vision.pre_layrnorm.requires_grad_(False)
        for layer in vision.encoder.layers[: config.frozen_vision_layers]:
            layer.requires_grad_(False)
    model.logit_scale.requires_grad_(config.train_logit_scale)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying biases, LayerNorm gains, embeddings or the
    temperature pulls them towards 0, which is not "simpler", just wrong."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or "embedding" in name or name == "logit_scale"
        (no_decay if plain else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def trainable_groups(model: Any, config: TrainConfig) -> list[dict[str, Any]]:
    """Apply the freeze options to ``model``; the optimiser's parameter groups."""
    _set_trainable(model, config)
    groups = _param_groups(model, config.weight_decay)
    if not groups:
        raise ValueError("the freeze options leave no parameter to train")
    return groups


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets.

    ``positives[i, j]`` marks text j as a right answer for image i. CLIP's own loss assumes only
    the diagonal is; in a catalog batch, many crops share one description ("a photo of a black
    dress"), and pushing crop i away from crop j's identical description would teach the model
    that black dresses are unlike black dresses. So each row's target is spread evenly over all
    its positives (and likewise per column). The loss is the KL divergence to those targets:
    the soft-label cross-entropy minus the targets' own entropy, same gradients, but 0 for a
    perfect model whatever the share of duplicates in the batch, so losses stay comparable.
    Computed in float32 whatever the autocast dtype: the log-softmax of bf16 logits loses the
    small differences training depends on.
    """
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    logits = logit_scale.float().exp() * image_embeds @ text_embeds.T
    targets = positives.float()

    def kl(rows: torch.Tensor, row_targets: torch.Tensor) -> torch.Tensor:
        row_targets = row_targets / row_targets.sum(dim=1, keepdim=True)
        return F.kl_div(F.log_softmax(rows, dim=1), row_targets, reduction="batchmean")

    return (kl(logits, targets) + kl(logits.T, targets.T)) / 2


# --- training -------------------------------------------------------------------------------------
@dataclass
class _Batch:
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positives: torch.Tensor


def _batches(pairs: Sequence[Pair], batch_size: int, rng: random.Random) -> Iterator[list[Pair]]:
    """One epoch in a fresh shuffled order; a last batch of one is dropped (a single pair has no
    negatives, so its loss is zero and its step only moves the schedule)."""
    order = list(pairs)
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if len(batch) > 1:
            yield batch


def _steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    full, rest = divmod(n_pairs, batch_size)
    return full + (1 if rest > 1 else 0)


def _collate(pairs: Sequence[Pair], clip: _Clip) -> _Batch:
    pixels = clip.processor(images=[p.image() for p in pairs], return_tensors="pt")["pixel_values"]
    tokens = clip.tokenizer(
        [p.prompt for p in pairs],
        padding=True,
        truncation=True,
        max_length=clip.max_text_tokens,
        return_tensors="pt",
    )
    positives = torch.from_numpy(same_description([p.description for p in pairs]))
    device = clip.device
    return _Batch(
        pixels.to(device, non_blocking=True),
        tokens["input_ids"].to(device),
        tokens["attention_mask"].to(device),
        positives.to(device),
    )


@dataclass
class _StepLog:
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    epochs_run: int = 0


def _forward_loss(clip: _Clip, batch: _Batch) -> torch.Tensor:
    model = clip.model
    dtype = autocast_dtype(clip.device)
    with torch.autocast(device_type="cuda", dtype=dtype, enabled=dtype is not None):
        image_embeds = _projected(model.get_image_features(pixel_values=batch.pixel_values))
        text_embeds = _projected(
            model.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        )
    return contrastive_loss(image_embeds, text_embeds, model.logit_scale, batch.positives)


def train(
    clip: _Clip,
    pairs: Sequence[Pair],
    config: TrainConfig,
    progress: Callable[[int, float], None] | None = None,
) -> _StepLog:
    """Optimise ``clip.model`` in place on ``pairs``; returns the loss and learning rate per step.

    AdamW, linear warm-up then cosine decay to zero, global gradient-norm clipping. On CUDA,
    autocast in bf16 (fp16 with a gradient scaler on cards without bf16); float32 on CPU, where
    autocast is slower than full precision.
    """
    from transformers import get_cosine_schedule_with_warmup

    log_ = _StepLog()
    per_epoch = _steps_per_epoch(len(pairs), config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    if total <= 0:
        return log_
    model = clip.model
    groups = trainable_groups(model, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=int(config.warmup_fraction * total), num_training_steps=total
    )
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(clip.device) == torch.float16)
    params = [p for group in groups for p in group["params"]]
    rng = random.Random(config.seed)
    model.train()
    try:
        while len(log_.losses) < total:
            for pairs_batch in _batches(pairs, config.batch_size, rng):
                loss = _forward_loss(clip, _collate(pairs_batch, clip))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                log_.lrs.append(float(scheduler.get_last_lr()[0]))
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
                log_.losses.append(float(loss.detach()))
                if progress is not None:
                    progress(len(log_.losses), log_.losses[-1])
                if len(log_.losses) >= total:
                    break
            log_.epochs_run += 1
            recent = log_.losses[-per_epoch:]
            log.info("epoch %d: mean loss %.4f", log_.epochs_run, sum(recent) / len(recent))
    finally:
        model.eval()
    return log_


# --- report, promotion and records --------------------------------------------------------------
@dataclass
class FinetuneResult:
    out_dir: Path
    report_json: Path
    report_png: Path
    version_id: int  # the new model_versions row
    version: str
    parent_version_id: int
    promoted: bool
    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    score_before: float
    score_after: float
    train_pairs: int
    eval_pairs: int
    losses: list[float]


def _plot_report(path: Path, report: dict[str, Any]) -> None:
    """Loss per step, and every recall before/after as paired bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure with an Agg canvas: no pyplot, so no global backend switch and no GUI.
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, bar_ax = figure.subplots(1, 2)
    losses = report["training"]["losses"]
    loss_ax.plot(range(1, len(losses) + 1), losses, lw=1)
    loss_ax.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    labels, before, after = [], [], []
    for task in (TEXT_TO_IMAGE, IMAGE_TO_IMAGE):
        for k in RECALL_KS:
            labels.append(f"{'t→i' if task == TEXT_TO_IMAGE else 'i→i'} R@{k}")
            before.append(report["eval_before"][task][f"recall@{k}"] or 0.0)
            after.append(report["eval_after"][task][f"recall@{k}"] or 0.0)
    x = np.arange(len(labels))
    bar_ax.bar(x - 0.2, before, 0.4, label="before")
    bar_ax.bar(x + 0.2, after, 0.4, label="after")
    bar_ax.set_xticks(x, labels, rotation=30)
    bar_ax.set(ylim=(0, 1), ylabel="recall", title="held-out retrieval")
    bar_ax.legend()
    promoted = "promoted" if report["promotion"]["promoted"] else "not promoted"
    figure.suptitle(f"{report['base_model']} → {report['out_dir']} ({promoted})", fontsize=9)
    figure.savefig(path, dpi=100)


def record_model_version(
    settings: Settings,
    *,
    name: str,
    version: str,
    parent_name: str,
    parent_version: str,
    metrics: dict[str, Any],
    promoted: bool,
    activate: bool = True,
) -> tuple[int, int]:
    """All of fine-tuning's database writes, in one transaction: the parent's row (created if
    this base model never embedded anything), the new row (updated when a deterministic re-run
    produced the same weights), and on promotion the switch of the active embedder.
    Returns ``(new_id, parent_id)``."""
    from sqlalchemy import select

    from db.schema import ModelVersion, utcnow
    from db.session import session_scope
    from db.versions import activate_embedder, embedder_version_id

    with session_scope(settings) as session:
        parent_id = embedder_version_id(session.connection(), parent_name, parent_version)
        row = session.scalar(
            select(ModelVersion).where(
                ModelVersion.kind == "embedder", ModelVersion.version == version
            )
        )
        if row is None:
            row = ModelVersion(kind="embedder", version=version, active=False, created_at=utcnow())
            session.add(row)
        row.name, row.parent_id, row.metrics = name, parent_id, metrics
        session.flush()
        if promoted and activate:
            activate_embedder(session, row.id)
        return row.id, parent_id


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _save(clip: _Clip, out_dir: Path) -> str:
    """Save model, processor and tokenizer so ``Embedder(out_dir)`` loads them; returns the
    version string that ``Embedder(str(out_dir))`` will compute."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clip.model.save_pretrained(out_dir)
    clip.processor.save_pretrained(out_dir)
    clip.tokenizer.save_pretrained(out_dir)
    source, _ = pretrained_kwargs(out_dir)
    return model_version(str(out_dir), source, clip.model)


def _write_report(report_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    report_json, report_png = report_dir / "report.json", report_dir / "report.png"
    report_json.write_text(json.dumps(report, indent=2, default=_json_default))
    _plot_report(report_png, report)
    return report_json, report_png


def _check_out_dir(base_model: str, out_dir: Path) -> None:
    """Saving over the base model's own directory would change the weights its version row (and
    every embedding made with it) stands for."""
    base = Path(base_model).expanduser()
    if base.is_dir() and out_dir.exists() and base.resolve() == out_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the base model's directory; pick a new one")


# --- the whole run --------------------------------------------------------------------------------
def finetune(
    settings: Settings,
    base_model: str,
    out_dir: Path,
    config: TrainConfig,
    *,
    promote_if: PromotionRule | None = None,
    pairs: Sequence[Pair] | None = None,
    progress: Callable[[int, float], None] | None = None,
    activate: bool = True,
) -> FinetuneResult:
    """Fine-tune ``base_model`` (hub id or directory) on the catalog, evaluate it on held-out
    products before and after, save it to ``out_dir`` (loadable with ``Embedder(out_dir)``),
    write ``out_dir/training-report/report.{json,png}``, and record and maybe promote it.

    ``pairs`` overrides :func:`load_pairs` (all analysed crops). ``progress(step, loss)`` is
    called after each optimiser step. ``activate=False`` records a promoted version without
    making it the active embedder yet (the final task activates it once the catalog has been
    re-embedded and its index built).
    """
    rule = promote_if or PromotionRule()
    out_dir = Path(out_dir)
    _check_out_dir(base_model, out_dir)
    timings: dict[str, float] = {}
    clock = time.perf_counter

    started = clock()
    all_pairs = list(pairs) if pairs is not None else load_pairs(settings)
    train_pairs, eval_pairs = split_by_product(all_pairs, config.eval_fraction, config.seed)
    clip = _load_clip(base_model, select_device(settings.device))
    clip.model.eval()
    timings["load_s"] = clock() - started

    started = clock()
    before = evaluate_retrieval(_LoadedEmbedder(clip, config.eval_batch_size), eval_pairs)
    timings["eval_before_s"] = clock() - started

    started = clock()
    # Same seed, same batches and dropout masks: a re-run reproduces the run (on CPU bit for bit).
    # The caller's random state is restored afterwards.
    cuda = [clip.device.index or 0] if clip.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        steps = train(clip, train_pairs, config, progress)
    timings["train_s"] = clock() - started

    started = clock()
    after = evaluate_retrieval(_LoadedEmbedder(clip, config.eval_batch_size), eval_pairs)
    timings["eval_after_s"] = clock() - started

    started = clock()
    version = _save(clip, out_dir)
    timings["save_s"] = clock() - started

    promoted, score_before, score_after = rule.decide(before, after)
    promotion = {
        "promoted": promoted,
        "score_before": _finite(score_before),
        "score_after": _finite(score_after),
        "rule": asdict(rule),
    }
    version_id, parent_id = record_model_version(
        settings,
        name=str(out_dir),
        version=version,
        parent_name=clip.name,
        parent_version=clip.version,
        metrics={
            "before": before,
            "after": after,
            "base_model": base_model,
            "train_pairs": len(train_pairs),
            "eval_pairs": len(eval_pairs),
            "catalog_crops": len(all_pairs),
            **promotion,
        },
        promoted=promoted,
        activate=activate,
    )
    log.info(
        "fine-tune %s -> %s: score %.3f -> %.3f, %s",
        base_model, out_dir, score_before, score_after,
        "promoted" if promoted else "not promoted",
    )  # fmt: skip

    report = {
        "base_model": base_model,
        "base_version": clip.version,
        "out_dir": str(out_dir),
        "version": version,
        "version_id": version_id,
        "parent_version_id": parent_id,
        "device": str(clip.device),
        "precision": str(autocast_dtype(clip.device) or torch.float32).removeprefix("torch."),
        "config": asdict(config),
        "split": _split_sizes(train_pairs, eval_pairs),
        "eval_before": before,
        "eval_after": after,
        "promotion": promotion,
        "training": {"steps": len(steps.losses), "epochs_run": steps.epochs_run,
                     "losses": steps.losses, "lrs": steps.lrs},
        "timings": timings,
    }  # fmt: skip
    report_json, report_png = _write_report(out_dir / REPORT_DIR, report)

    return FinetuneResult(
        out_dir=out_dir,
        report_json=report_json,
        report_png=report_png,
        version_id=version_id,
        version=version,
        parent_version_id=parent_id,
        promoted=promoted,
        before=before,
        after=after,
        score_before=score_before,
        score_after=score_after,
        train_pairs=len(train_pairs),
        eval_pairs=len(eval_pairs),
        losses=steps.losses,
    )


def _split_sizes(train_pairs: Sequence[Pair], eval_pairs: Sequence[Pair]) -> dict[str, int]:
    return {
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "train_products": len({p.product_id for p in train_pairs}),
        "eval_products": len({p.product_id for p in eval_pairs}),
        "train_descriptions": len({p.description for p in train_pairs}),
        "eval_descriptions": len({p.description for p in eval_pairs}),
    }
