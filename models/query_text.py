"""Query texts to vectors for search: CLIP's text tower in bfloat16 on a CPU that has it.

A search API embeds one short text per query, and on a CPU that forward pass is most of what a
text query costs. A copy of the text tower with its weights in bfloat16 runs on the CPU's
bf16 instructions (AVX512-BF16, AMX) about three times faster than float32 here. The vectors
stay within cosine 0.9999 of the float ones, and unlike int8 with per-call activation scales,
a text's vector does not depend on the other texts of its batch (tests/test_query_text.py).
``bench/search.py`` reports how many of the float queries' top-10 products the bf16 queries
return at 1M vectors.

Only query texts are embedded this way: the index holds float vectors of crops, fine-tuning and
its evaluation use the float model, and image queries use the float vision tower. The copy's
token and position tables stay those of the float model (shared, not copied; their output is
cast), so the copy costs the encoder layers' bf16 weights. ``auto`` picks bfloat16 only where
the CPU has bf16 instructions; elsewhere (no bf16, or CUDA, where the embedder runs in mixed
precision already) it is the embedder's own float path, as is ``float``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from models.device import cpu_has_bf16
from models.embedder import Embedder

QueryTextPrecision = Literal["auto", "float", "bfloat16"]


class TextQueryEncoder:
    """``embed(texts)``: (n, dim) float32 unit vectors of query texts, in input order."""

    def __init__(self, embedder: Embedder, precision: QueryTextPrecision = "auto") -> None:
        self.embedder = embedder
        self.precision: Literal["float", "bfloat16"] = resolve(precision, embedder.device)
        self._text_model: torch.nn.Module | None = None
        self._projection: torch.nn.Module | None = None
        if self.precision == "bfloat16":
            self._text_model, self._projection = _bf16_tower(embedder.model)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._text_model is None or self._projection is None or not texts:
            return self.embedder.embed_texts(texts)
        tokens = self.embedder.tokenize(texts)
        with torch.inference_mode():
            pooled = self._text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
            features = self._projection(pooled)
        return np.ascontiguousarray(Embedder.normalised(features), dtype=np.float32)


def _bf16_tower(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(text transformer, projection) with bf16 weights; the embeddings shared and cast."""
    text_model = model.text_model
    # deepcopy with the embeddings' parameters in its memo reuses them instead of copying.
    shared = {id(p): p for p in text_model.embeddings.parameters()}
    tower = copy.deepcopy(text_model, memo=shared)
    for name, child in tower.named_children():
        if name != "embeddings":
            child.to(torch.bfloat16)
    tower.embeddings.register_forward_hook(lambda _module, _inputs, out: out.to(torch.bfloat16))
    projection = copy.deepcopy(model.text_projection).to(torch.bfloat16)
    return tower.eval(), projection.eval()


def resolve(precision: QueryTextPrecision, device: torch.device) -> Literal["float", "bfloat16"]:
    """``auto``: bfloat16 on a CPU with bf16 instructions, float anywhere else."""
    if device.type != "cpu":
        return "float"
    if precision == "auto":
        return "bfloat16" if cpu_has_bf16() else "float"
    return precision
