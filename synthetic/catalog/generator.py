"""Generating a catalog: every product planned from its own seed, rendered (optionally in
worker processes) and saved with its manifest."""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from synthetic.catalog.backdrops import Background, random_background
from synthetic.catalog.garments import GarmentStyle, sample_style
from synthetic.catalog.placement import View, random_view
from synthetic.catalog.records import Catalog, CatalogImage, Product
from synthetic.catalog.render import frame_size, render_garment_detailed
from synthetic.catalog.vocabulary import (
    _CATEGORY_WEIGHTS,
    _PRICE_RANGE,
    _TITLE_SUFFIXES,
    BRANDS,
    CATEGORIES,
    COLOURS,
    RGB,
    VARIANTS,
    SizeClass,
)

# Packshot sizes: long sides of common e-commerce exports.
_FULL_LONG_SIDES: tuple[int, ...] = (600, 720, 800, 900, 1000, 1080, 1200)
_SMALL_LONG_SIDES: tuple[int, ...] = (160, 192, 224, 256)


@dataclass(frozen=True)
class _ShotPlan:
    filename: str
    view: View
    background: Background
    render_seed: tuple[int, ...]


@dataclass(frozen=True)
class _ProductPlan:
    product: Product  # images not filled in yet
    style: GarmentStyle
    rgb: RGB
    width: int
    height: int
    quality: int
    shots: tuple[_ShotPlan, ...]


def _price(category: str, rng: np.random.Generator) -> float:
    lo, hi = _PRICE_RANGE[category]
    whole = math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    cents = (0.99, 0.0, 0.5)[int(rng.choice(3, p=[0.6, 0.25, 0.15]))]
    return round(whole + cents, 2)


def _title(colour: str, style: GarmentStyle, rng: np.random.Generator) -> str:
    title = f"{colour.title()} {VARIANTS[style.category][style.variant]}"
    if rng.uniform() < 0.12:
        title += f" – {_TITLE_SUFFIXES[int(rng.integers(len(_TITLE_SUFFIXES)))]}"
    return title


def _jittered(colour: str, rng: np.random.Generator) -> RGB:
    """The named colour moved by up to 5 levels per channel: one catalog's "navy" varies a little
    between products, far less than the distance to the next named colour."""
    jitter = rng.integers(-5, 6, 3)
    r, g, b = (int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    return (r, g, b)


def _plan_shots(
    product_id: str, n_images: int, rgb: RGB, rng: np.random.Generator, seed: tuple[int, int]
) -> tuple[_ShotPlan, ...]:
    """The canonical packshot, then alternates: turned, zoomed or mirrored, sometimes on
    another backdrop as when a retailer reshoots."""
    background = random_background(rng, rgb)
    shots = []
    for k in range(n_images):
        view = View() if k == 0 else random_view(rng)
        if k > 0 and rng.uniform() < 0.4:
            background = random_background(rng, rgb)
        shots.append(_ShotPlan(f"{product_id}_{k + 1}.jpg", view, background, (*seed, k)))
    return tuple(shots)


def _plan_product(
    seed: int,
    index: int,
    size: SizeClass,
    images_per_product: tuple[int, int],
    long_side: int | None,
) -> _ProductPlan:
    """Everything about product ``index`` except its pixels. It draws only from its own
    generator, so products do not depend on each other or on how many there are."""
    rng = np.random.default_rng([seed, index])
    category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=_CATEGORY_WEIGHTS))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    rgb = _jittered(colour, rng)
    style = sample_style(category, rng)
    sides = _SMALL_LONG_SIDES if size == "small" else _FULL_LONG_SIDES
    width, height = frame_size(style, long_side or sides[int(rng.integers(len(sides)))], rng)
    quality = int(rng.integers(80, 93))
    n_images = int(rng.integers(images_per_product[0], images_per_product[1] + 1))
    product_id = f"p{index:06d}"
    shots = _plan_shots(product_id, n_images, rgb, rng, (seed, index))
    product = Product(
        product_id=product_id,
        title=_title(colour, style, rng),
        brand=BRANDS[int(rng.integers(len(BRANDS)))],
        category=category,
        price=_price(category, rng),
        images=[],
        colour_name=colour,
        variant=style.variant,
    )
    return _ProductPlan(product, style, rgb, width, height, quality, shots)


def _render_product(plan: _ProductPlan, images_dir: Path) -> Product:
    """Render and save every shot of one product; returns the product with its images."""
    images = []
    for shot in plan.shots:
        rendering = render_garment_detailed(
            plan.style.category,
            plan.rgb,
            (plan.width, plan.height),
            np.random.default_rng(list(shot.render_seed)),
            shot.background,
            style=plan.style,
            view=shot.view,
        )
        rendering.image.save(images_dir / shot.filename, "JPEG", quality=plan.quality)
        images.append(
            CatalogImage(
                product_id=plan.product.product_id,
                filename=shot.filename,
                category=plan.style.category,
                colour_name=plan.product.colour_name,
                rgb=plan.rgb,
                width=plan.width,
                height=plan.height,
                bbox=rendering.bbox,
                coverage=round(rendering.coverage, 4),
            )
        )
    return replace(plan.product, images=images)


def generate_catalog(
    out_dir: Path | str,
    n_products: int,
    *,
    seed: int = 0,
    size: SizeClass = "full",
    images_per_product: tuple[int, int] = (1, 3),
    long_side: int | None = None,
    workers: int = 1,
) -> Catalog:
    """Render ``n_products`` products into ``out_dir/images/`` and write ``out_dir/catalog.json``.

    ``size`` picks packshot long sides (``full``: 600-1200 px, ``small``: 160-256 px) unless
    ``long_side`` fixes one. ``workers`` > 1 renders in that many processes; output is identical.
    """
    if seed < 0 or n_products < 0:
        raise ValueError("seed and n_products must be >= 0")
    lo, hi = images_per_product
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_product must satisfy 1 <= lo <= hi, got {images_per_product}")
    root = Path(out_dir)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    plans = [_plan_product(seed, i, size, images_per_product, long_side) for i in range(n_products)]
    if workers > 1 and len(plans) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            products = list(
                pool.map(_render_product, plans, [images_dir] * len(plans), chunksize=4)
            )
    else:
        products = [_render_product(plan, images_dir) for plan in plans]
    catalog = Catalog(root=root, products=products, seed=seed, size=size)
    catalog.save()
    return catalog
