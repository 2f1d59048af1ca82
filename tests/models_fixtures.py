"""Shared fixtures and image helpers for the ``models`` tests.

Import the fixtures you use into a test module (``from tests.models_fixtures import tiny_models``).
Each importing module registers its own copy of a fixture, so the expensive build is memoised
here as well: the tiny models are built once per test session however many modules use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

_built: dict[str, dict[str, Path]] = {}
_loaded: dict[str, object] = {}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"detector": dir, "clip": dir}`` of tiny random models built with seed 0."""
    if "tiny" not in _built:
        from models.build import build_offline_models

        _built["tiny"] = build_offline_models(tmp_path_factory.mktemp("tiny-models"), "tiny", 0)
    return _built["tiny"]


@pytest.fixture(scope="session")
def tiny_detector(tiny_models: dict[str, Path]):
    if "detector" not in _loaded:
        from models.detector import Detector

        _loaded["detector"] = Detector(tiny_models["detector"], device="cpu", threshold=0.5)
    return _loaded["detector"]


@pytest.fixture(scope="session")
def tiny_embedder(tiny_models: dict[str, Path]):
    if "embedder" not in _loaded:
        from models.embedder import Embedder

        _loaded["embedder"] = Embedder(tiny_models["clip"], device="cpu", batch_size=4)
    return _loaded["embedder"]


RGB = tuple[int, int, int]


def garment_image(
    colour: RGB,
    background: RGB,
    size: tuple[int, int] = (300, 400),
    scale: float = 0.5,
    noise: float = 0.0,
    seed: int = 0,
) -> Image.Image:
    """A t-shirt silhouette of ``colour`` on ``background``; ``scale`` is the body width as a
    fraction of the image width (above ~1 the garment runs off the edges, like a tight crop).
    ``noise`` adds Gaussian pixel noise (std in 0..255 units) for fabric-like texture."""
    width, height = size
    image = Image.new("RGB", size, background)
    cx, half = width / 2, width * scale / 2
    sleeve = width * scale * 0.9
    outline = [
        (cx - half, height * 0.2),
        (cx - sleeve, height * 0.35),
        (cx - sleeve * 0.8, height * 0.47),
        (cx - half, height * 0.4),
        (cx - half, height * 0.88),
        (cx + half, height * 0.88),
        (cx + half, height * 0.4),
        (cx + sleeve * 0.8, height * 0.47),
        (cx + sleeve, height * 0.35),
        (cx + half, height * 0.2),
    ]
    ImageDraw.Draw(image).polygon(outline, fill=colour)
    if noise:
        rng = np.random.default_rng(seed)
        pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, noise, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def product_photos(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` varied catalog-like photos: light backdrops, a dark item, mixed sizes and ratios."""
    rng = np.random.default_rng(seed)
    # A few shared sizes, so that some images share a batch and others do not.
    sizes = [(200, 300), (300, 300), (300, 200), (160, 240)]
    photos = []
    for _ in range(n):
        width, height = sizes[int(rng.integers(len(sizes)))]
        background = tuple(int(v) for v in rng.integers(180, 256, 3))
        colour = tuple(int(v) for v in rng.integers(0, 180, 3))
        photos.append(
            garment_image(colour, background, (width, height), float(rng.uniform(0.3, 0.9)))
        )
    return photos


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread, restoring the previous setting after.

    The tiny models' ops are microseconds long; on a small, busy CI box OpenMP's thread
    hand-offs cost more than the ops (a 45x32 layer norm: 6 µs on one thread, 1 ms on two).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
