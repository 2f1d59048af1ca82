"""CLIP embeddings of crops and prompts, L2-normalised float32, in one shared space."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.device import autocast_context, select_device
from models.loading import (
    ModelLoadError,
    load_pretrained,
    model_version,
    pretrained_kwargs,
    resize_rule,
)

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

log = logging.getLogger(__name__)


def _projected(output: object) -> torch.Tensor:
    """The projected embeddings out of ``get_image_features``/``get_text_features``.

    transformers 4 returns the projected tensor itself; transformers 5 returns a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` has been replaced by the projection
    (its ``last_hidden_state`` is the unprojected encoder output, not what we want).
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"unexpected CLIP feature output {type(output).__name__}")
    return pooled


class Embedder:
    """A CLIP model whose image and text embeddings are comparable by dot product."""

    def __init__(
        self,
        name_or_dir: str | Path,
        device: torch.device | str | None = None,
        batch_size: int = 32,
        files: Path | None = None,
    ) -> None:
        """``files``: a local copy of the model to load, when ``name_or_dir`` names it
        elsewhere (a model version in the storage); its version still says ``name_or_dir``."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.name_or_dir = str(name_or_dir)
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.batch_size = batch_size
        source, kwargs = pretrained_kwargs(files if files is not None else name_or_dir)
        model = load_pretrained(CLIPModel.from_pretrained, source, "CLIP model", **kwargs)
        self.image_processor = load_pretrained(
            AutoImageProcessor.from_pretrained, source, "CLIP image processor", **kwargs
        )
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, source, "CLIP tokenizer", **kwargs
        )
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self
        self.model_version = model_version(self.name_or_dir, source, self.model)
        # Prompts beyond the position table would crash the text encoder; truncate instead.
        # CLIPConfig turns its text_config (a dict, or None) into a CLIPTextConfig when built.
        text_config = cast("CLIPTextConfig", model.config.text_config)
        self._max_text_tokens = min(
            int(self.tokenizer.model_max_length),
            int(text_config.max_position_embeddings),
        )
        if self.dim <= 0:  # pragma: no cover - a config without a projection is not CLIP
            raise ModelLoadError(f"{self.name_or_dir} has no projection dimension")

    @property
    def resize_rule(self) -> tuple[int, int | None, int]:
        """How the image processor resizes (``flickd.fetching.geometry.ResizeRule``)."""
        return resize_rule(self.image_processor)

    @property
    def dim(self) -> int:
        """Length of every embedding vector."""
        return int(self.model.config.projection_dim)

    def embed_images(
        self, images: Sequence[Image.Image], batch_size: int | None = None
    ) -> np.ndarray:
        """(n, dim) float32 unit vectors, one per image, in input order."""
        batch_size = batch_size or self.batch_size
        chunks = []
        for start in range(0, len(images), batch_size):
            rgb = [
                im if im.mode == "RGB" else im.convert("RGB")
                for im in images[start : start + batch_size]
            ]
            pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
            with torch.inference_mode(), autocast_context(self.device):
                out = self.model.get_image_features(
                    pixel_values=pixels.to(self.device, non_blocking=True)
                )
            chunks.append(self.normalised(out))
        return self._stack(chunks)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(n, dim) float32 unit vectors, one per text, in input order."""
        batch_size = batch_size or self.batch_size * 8  # text encoding is far cheaper per item
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start : start + batch_size])
            with torch.inference_mode(), autocast_context(self.device):
                out = self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                )
            chunks.append(self.normalised(out))
        return self._stack(chunks)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of ``texts`` (padded to the longest, truncated to what
        the text encoder's position table holds), on the CPU."""
        return dict(
            self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=self._max_text_tokens,
                return_tensors="pt",
            )
        )

    @staticmethod
    def normalised(output: object) -> np.ndarray:
        # Normalise in float32: under autocast the features arrive in bf16/fp16, whose norm
        # would carry ~3 significant digits into every cosine similarity.
        features = _projected(output).float()
        return F.normalize(features, dim=-1).cpu().numpy()

    def _stack(self, chunks: list[np.ndarray]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
