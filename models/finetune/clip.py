"""The CLIP model being fine-tuned: loading it for training, embedding with it as production
does, and saving it where ``Embedder`` loads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.embedder import Embedder
from models.loading import load_pretrained, model_version, pretrained_kwargs


@dataclass
class Clip:
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


def load_clip(name: str, device: torch.device) -> Clip:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    source, kwargs = pretrained_kwargs(name)
    model = load_pretrained(CLIPModel.from_pretrained, source, "CLIP model", **kwargs)
    processor = load_pretrained(
        AutoImageProcessor.from_pretrained, source, "CLIP image processor", **kwargs
    )
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, "CLIP tokenizer", **kwargs)
    # Train in float32 whatever the checkpoint's dtype: autocast does the reduced precision.
    model = model.float().to(device)
    return Clip(
        name, source, model, processor, tokenizer, device, model_version(name, source, model)
    )


class LoadedEmbedder(Embedder):
    """An :class:`Embedder` around a model already in memory, so evaluation embeds exactly as
    production will (same preprocessing, truncation, mixed precision and normalisation)."""

    def __init__(self, clip: Clip, batch_size: int) -> None:  # no super(): nothing to load
        self.name_or_dir = clip.name
        self.device = clip.device
        self.batch_size = batch_size
        self.model = clip.model
        self.image_processor = clip.processor
        self.tokenizer = clip.tokenizer
        self.model_version = clip.version
        self._max_text_tokens = clip.max_text_tokens


def save_clip(clip: Clip, out_dir: Path) -> str:
    """Save model, processor and tokenizer so ``Embedder(out_dir)`` loads them; returns the
    version string that ``Embedder(str(out_dir))`` will compute."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clip.model.save_pretrained(out_dir)
    clip.processor.save_pretrained(out_dir)
    clip.tokenizer.save_pretrained(out_dir)
    source, _ = pretrained_kwargs(out_dir)
    return model_version(str(out_dir), source, clip.model)
