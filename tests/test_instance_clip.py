"""synthetic/instance_clip.py: an offline CLIP trained here to tell products apart.

Trained from the tiny random CLIP on a small catalog, then loaded through the Embedder (the
code path every model takes). Checked: only the top of the vision tower changed; the saved
model loads and has a version of its own; and, on products of another catalog that training
never saw, a frame of footage finds its own product's packshot more often than with the
random model it started from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.embedder import Embedder
from synthetic.catalog import generate_catalog
from synthetic.instance_clip import TrainPlan, train_instance_clip
from synthetic.video import footage_frame
from tests.models_fixtures import tiny_models

__all__ = ["tiny_models"]

PLAN = TrainPlan(
    products=48, views=6, layers=1, steps=300, batch=16, frame=(192, 108), catalog_size="small"
)


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("instance") / "clip"
    report = train_instance_clip(tiny_models["clip"], out, PLAN, device="cpu")
    return out, report


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_only_the_top_of_the_vision_tower_is_trained(tiny_models, trained):
    out, report = trained
    before, after = _weights(tiny_models["clip"]), _weights(out)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    last = "vision_model.encoder.layers.1."  # tiny has two layers; the plan trains one
    assert changed and all(
        name.startswith((last, "vision_model.post_layernorm.", "visual_projection."))
        for name in changed
    ), sorted(changed)
    assert any(name.startswith(last) for name in changed)
    assert any(name.startswith("visual_projection.") for name in changed)
    assert report["loss_last"] < report["loss_first"]
    assert report["held_out_products"] >= 8
    assert (out / "flickd-instance-training.json").exists()


def test_the_trained_model_loads_like_any_clip(tiny_models, trained):
    out, _ = trained
    source, model = Embedder(tiny_models["clip"], device="cpu"), Embedder(out, device="cpu")
    assert model.model_version != source.model_version
    assert model.resize_rule == source.resize_rule
    texts = ["a photo of a red dress", "a photo of blue jeans"]
    np.testing.assert_allclose(model.embed_texts(texts), source.embed_texts(texts), atol=1e-6)
    vectors = model.embed_images([Image.new("RGB", (64, 48), (200, 30, 30))])
    assert vectors.shape == (1, model.dim)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-4)


def _top1(embedder: Embedder, packshots: list[Image.Image], frames: list[Image.Image]) -> float:
    """Share of frames whose nearest packshot is their own (frame i shows packshot i % n)."""
    index = embedder.embed_images(packshots)
    queries = embedder.embed_images(frames)
    nearest = (queries @ index.T).argmax(axis=1)
    return float(np.mean(nearest == np.arange(len(frames)) % len(packshots)))


def test_footage_finds_unseen_products_better_than_the_random_model(tiny_models, trained, tmp_path):
    out, _ = trained
    # Another seed: none of these products was in the training catalog.
    catalog = generate_catalog(tmp_path / "unseen", 24, seed=77, size="small")
    packshots = [
        Image.open(catalog.image_path(p.images[0])).convert("RGB") for p in catalog.products
    ]
    rng = np.random.default_rng(3)
    frames = [
        Image.fromarray(footage_frame(packshots[i % len(packshots)], PLAN.frame, rng)[0])
        for i in range(3 * len(packshots))
    ]
    random_model = _top1(Embedder(tiny_models["clip"], device="cpu"), packshots, frames)
    trained_model = _top1(Embedder(out, device="cpu"), packshots, frames)
    assert trained_model >= random_model + 0.1, (random_model, trained_model)
