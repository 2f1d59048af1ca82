from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.embedder import Embedder, _projected
from models.labels import label_by_name
from models.prompts import make_prompt
from tests.models_fixtures import (
    product_photos,
    tiny_embedder,
    tiny_models,
    torch_single_thread,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PHOTOS = product_photos(10, seed=2)
TEXTS = [
    "a photo of a navy blue cardigan",
    "a pair of black shoes",
    "olive green pants",
    "an orange dress on a plain background",
    "x",
    "a very long prompt " + "with many many words " * 30,  # beyond 77 tokens: truncated
]


def _assert_unit_rows(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim) and vectors.dtype == np.float32
    assert vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_image_embeddings(tiny_embedder: Embedder) -> None:
    vectors = tiny_embedder.embed_images(PHOTOS)
    _assert_unit_rows(vectors, len(PHOTOS), tiny_embedder.dim)
    assert tiny_embedder.dim == 32
    # Different images, different vectors (the random model still sees its input).
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3


def test_text_embeddings(tiny_embedder: Embedder) -> None:
    vectors = tiny_embedder.embed_texts(TEXTS)
    _assert_unit_rows(vectors, len(TEXTS), tiny_embedder.dim)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3


def test_image_batching_matches_unbatched(tiny_embedder: Embedder) -> None:
    batched = tiny_embedder.embed_images(PHOTOS, batch_size=4)
    single = np.concatenate([tiny_embedder.embed_images([im]) for im in PHOTOS])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_text_batching_matches_unbatched(tiny_embedder: Embedder) -> None:
    # Padding to the longest text in a batch must not change any text's embedding.
    batched = tiny_embedder.embed_texts(TEXTS, batch_size=4)
    single = np.concatenate([tiny_embedder.embed_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_empty_inputs(tiny_embedder: Embedder) -> None:
    assert tiny_embedder.embed_images([]).shape == (0, tiny_embedder.dim)
    assert tiny_embedder.embed_texts([]).shape == (0, tiny_embedder.dim)


def test_mode_conversion(tiny_embedder: Embedder) -> None:
    image = PHOTOS[0]
    np.testing.assert_allclose(
        tiny_embedder.embed_images([image.convert("RGBA")]),
        tiny_embedder.embed_images([image]),
        atol=1e-6,
    )


def test_prompt_words_are_whole_tokens(tiny_embedder: Embedder) -> None:
    """The offline tokenizer's learned merges cover flickd's own prompt vocabulary."""
    tokenizer = tiny_embedder.tokenizer
    prompt = make_prompt(label_by_name("cardigan"), "navy blue", "k:0")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert tokens[1:-1] == [f"{word}</w>" for word in prompt.split()]
    # Unknown text still tokenizes (byte fallback), with no unknown tokens.
    ids = tokenizer("Ünïcödé 42 ✓")["input_ids"]
    assert tokenizer.unk_token_id not in ids[1:-1]


def test_projected_handles_both_transformers_apis() -> None:
    tensor = torch.ones(2, 3)
    assert _projected(tensor) is tensor  # transformers 4: the tensor itself

    class Output:  # transformers 5: BaseModelOutputWithPooling
        pooler_output = tensor

    assert _projected(Output()) is tensor
    with pytest.raises(TypeError):
        _projected(object())


def test_model_version_identifies_weights(
    tiny_embedder: Embedder,
    tiny_models: dict[str, Path],
) -> None:
    again = Embedder(tiny_models["clip"], device="cpu")
    assert again.model_version == tiny_embedder.model_version
    assert tiny_embedder.model_version.startswith(str(tiny_models["clip"]))
    assert len(tiny_embedder.model_version.rsplit("@", 1)[1]) == 12
