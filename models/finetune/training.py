"""The training loop: freeze options, the multi-positive contrastive loss, batches, augmentation
(text wordings, crops and mirrors), AdamW."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from models.device import autocast_dtype
from models.embedder import _projected
from models.finetune.clip import Clip
from models.finetune.config import TrainConfig
from models.finetune.data import Pair, same_description
from models.prompts import TEMPLATES

log = logging.getLogger(__name__)

# CLIP clamps its learned temperature so logits never exceed 100 x cosine (the paper's choice).
MAX_LOGIT_SCALE = math.log(100.0)


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
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
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


def _text(pair: Pair, config: TrainConfig, rng: random.Random) -> str:
    """The pair's prompt, or with ``text_variants`` any wording of its query: bare (as shoppers
    type it) or in one of the prompt templates."""
    if not config.text_variants or pair.query == pair.prompt:
        return pair.prompt
    wordings = ("{}", *TEMPLATES)
    return wordings[rng.randrange(len(wordings))].format(pair.query)


def _image(pair: Pair, config: TrainConfig, rng: random.Random) -> Image.Image:
    """The pair's crop, or with ``image_augment`` a random part of it (aspect kept within
    3:4..4:3), mirrored half the time. Geometry only: the colour is the label."""
    image = pair.image()
    if not config.image_augment:
        return image
    width, height = image.size
    area = rng.uniform(config.augment_min_area, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = max(1, min(width, round(width * math.sqrt(area * aspect))))
    h = max(1, min(height, round(height * math.sqrt(area / aspect))))
    x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    image = image.crop((x, y, x + w, y + h))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def _collate(pairs: Sequence[Pair], clip: Clip, config: TrainConfig, rng: random.Random) -> _Batch:
    images = [_image(p, config, rng) for p in pairs]
    pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = clip.tokenizer(
        [_text(p, config, rng) for p in pairs],
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
class StepLog:
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    epochs_run: int = 0


def _forward_loss(clip: Clip, batch: _Batch) -> torch.Tensor:
    model = clip.model
    dtype = autocast_dtype(clip.device)
    with torch.autocast(device_type="cuda", dtype=dtype, enabled=dtype is not None):
        image_embeds = _projected(model.get_image_features(pixel_values=batch.pixel_values))
        text_embeds = _projected(
            model.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        )
    return contrastive_loss(image_embeds, text_embeds, model.logit_scale, batch.positives)


def train(
    clip: Clip,
    pairs: Sequence[Pair],
    config: TrainConfig,
    progress: Callable[[int, float], None] | None = None,
) -> StepLog:
    """Optimise ``clip.model`` in place on ``pairs``; returns the loss and learning rate per step.

    AdamW, linear warm-up then cosine decay to zero, global gradient-norm clipping. On CUDA,
    autocast in bf16 (fp16 with a gradient scaler on cards without bf16); float32 on CPU, where
    autocast is slower than full precision.
    """
    from transformers import get_cosine_schedule_with_warmup

    log_ = StepLog()
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
                loss = _forward_loss(clip, _collate(pairs_batch, clip, config, rng))
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
