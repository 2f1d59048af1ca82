"""The query text encoder (models/query_text.py): a bf16 text tower, close to the float one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.device import cpu_has_bf16
from models.embedder import Embedder
from models.query_text import TextQueryEncoder, resolve
from tests.models_fixtures import tiny_embedder, tiny_models, torch_single_thread
from tests.test_models_embedder import TEXTS, _assert_unit_rows

pytestmark = pytest.mark.usefixtures("torch_single_thread")

__all__ = ["tiny_embedder", "tiny_models", "torch_single_thread"]


def test_auto_is_bf16_only_on_a_cpu_with_bf16_instructions() -> None:
    assert resolve("auto", torch.device("cpu")) == ("bfloat16" if cpu_has_bf16() else "float")
    assert resolve("auto", torch.device("cuda")) == "float"
    assert resolve("bfloat16", torch.device("cuda")) == "float"  # CUDA has its own autocast
    assert resolve("float", torch.device("cpu")) == "float"
    assert resolve("bfloat16", torch.device("cpu")) == "bfloat16"  # asked for: given


def test_bf16_vectors_are_unit_and_close_to_the_float_ones(tiny_embedder: Embedder) -> None:
    encoder = TextQueryEncoder(tiny_embedder, "bfloat16")
    assert encoder.precision == "bfloat16"
    fast = encoder.embed(TEXTS)
    _assert_unit_rows(fast, len(TEXTS), tiny_embedder.dim)
    exact = tiny_embedder.embed_texts(TEXTS)
    cosines = (fast * exact).sum(axis=1)
    assert cosines.min() >= 0.999, cosines
    # It is another computation, not the float one under a new name.
    assert np.abs(fast - exact).max() > 1e-5
    assert np.array_equal((fast @ exact.T).argmax(axis=1), np.arange(len(TEXTS)))


def test_a_text_alone_and_in_a_batch_get_nearly_the_same_vector(tiny_embedder: Embedder) -> None:
    encoder = TextQueryEncoder(tiny_embedder, "bfloat16")
    together = encoder.embed(TEXTS)  # padded to the longest, the 77-token one
    alone = np.concatenate([encoder.embed([text]) for text in TEXTS])
    # bf16 rounds differently for another padded length, and that is all: no batch statistics
    agreement = (together * alone).sum(axis=1)
    assert agreement.min() >= 0.9995, agreement
    assert encoder.embed([]).shape == (0, tiny_embedder.dim)


def test_the_float_model_is_left_as_it_was(tiny_embedder: Embedder) -> None:
    before = tiny_embedder.embed_texts(TEXTS)
    encoder = TextQueryEncoder(tiny_embedder, "bfloat16")
    encoder.embed(TEXTS)
    np.testing.assert_array_equal(tiny_embedder.embed_texts(TEXTS), before)
    assert {p.dtype for p in tiny_embedder.model.parameters()} == {torch.float32}
    # The copy shares the token table instead of holding its own.
    table = tiny_embedder.model.text_model.embeddings.token_embedding.weight
    assert encoder._text_model is not None
    assert encoder._text_model.embeddings.token_embedding.weight is table
    assert {p.dtype for p in encoder._text_model.encoder.parameters()} == {torch.bfloat16}
    float_encoder = TextQueryEncoder(tiny_embedder, "float")
    np.testing.assert_array_equal(float_encoder.embed(TEXTS), before)
