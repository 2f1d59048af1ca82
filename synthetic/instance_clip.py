"""An offline CLIP whose image vectors mean something: trained here to tell products apart.

``models.build`` makes CLIP with seeded random weights. Every tensor flows through the real code,
but the vectors carry little: on the ``base`` model every crop scores 0.97-0.99 against every
product, and a benchmark's "match" is decided by margins of a few thousandths. Recall measured
that way is chance. This module trains the last vision layers of such a model, on views of a
synthetic catalog, so that two views of one product land close and views of different
products apart (instance discrimination, the SimCLR / CLIP InfoNCE loss over products):

* a **catalog view** is a random crop of a product's packshot, as the detector crops it when
  the catalog is indexed;
* a **footage view** is the packshot placed on a shot's background, panned or zoomed, with
  sensor noise (:func:`synthetic.video.footage_frame`, the way a test clip shows it), whole or
  randomly cropped, as a detector crops a video frame.

The early layers stay as built, frozen; their outputs for a fixed pool of views are computed
once, and only the last ``layers`` encoder layers, the final layer norm and the projection are
trained on them. The text tower is untouched (its vectors stay random): the model is for image
benchmarks, image and video search. It trains on a catalog of the plan's seed: with a
benchmark's seed, the benchmark's catalog is its first products (as a fine-tune on the indexed
catalog would know them); with another seed, none. The last tenth of the products (at least 8)
is held out of training, and the report gives the top-1 accuracy of their footage views
among their catalog views before and after. The result is saved with
``save_pretrained`` beside the source's tokenizer and processor, and loads like any CLIP.

    python -m synthetic.instance_clip OUT_DIR --source DIR/clip [--products 300] [--seed 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.device import cpu_has_bf16, select_device
from models.loading import quiet_progress_bars
from synthetic.catalog import generate_catalog
from synthetic.video import footage_frame

log = logging.getLogger(__name__)


def _has_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast where the hardware has it (a CUDA card, or a CPU with bf16 units): the
    frozen pass runs twice as fast there; float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_has_bf16(device))


def _run_layers(layers: Any, hidden: torch.Tensor) -> torch.Tensor:
    """``CLIPEncoderLayer``s in turn (no attention mask), as the encoder runs them."""
    for layer in layers:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@dataclass(frozen=True)
class TrainPlan:
    products: int = 300  # in the training catalog
    seed: int = 1000  # of the training catalog and of every draw
    views: int = 12  # per product: half catalog views, half footage views
    layers: int = 2  # trained encoder layers at the top of the vision tower
    steps: int = 200
    batch: int = 64  # products per step, two views each
    lr: float = 3e-4
    temperature: float = 0.07
    frame: tuple[int, int] = (640, 360)  # footage views are rendered at this size
    catalog_size: Literal["full", "small"] = "full"  # packshot sizes (synthetic.catalog)


def catalog_view(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of the packshot, as a detector crops it: 15-80 % of its area, aspect 3:5 to 5:3,
    centred anywhere on the garment's middle."""
    width, height = image.size
    return _crop_around(
        image, rng, (0.15, 0.8), (width * 0.2, height * 0.2, width * 0.8, height * 0.8)
    )


def footage_view(
    image: Image.Image, rng: np.random.Generator, size: tuple[int, int]
) -> Image.Image:
    """The packshot in a frame of footage: a fifth of the time the whole frame (a detector that
    finds nothing), else a crop centred on the product, 8-45 % of the frame's area."""
    pixels, box = footage_frame(image, size, rng)
    frame = Image.fromarray(pixels)
    return frame if rng.random() < 0.2 else _crop_around(frame, rng, (0.08, 0.45), box)


def _crop_around(
    image: Image.Image,
    rng: np.random.Generator,
    area: tuple[float, float],
    within: tuple[float, float, float, float],
) -> Image.Image:
    """A random crop of ``area`` (share of the image) whose centre lies in ``within``."""
    width, height = image.size
    share = float(rng.uniform(*area))
    aspect = math.exp(float(rng.uniform(math.log(0.6), math.log(1 / 0.6))))
    w = min(width, max(8, round(math.sqrt(share * width * height * aspect))))
    h = min(height, max(8, round(math.sqrt(share * width * height / aspect))))
    cx = float(rng.uniform(within[0], max(within[0], within[2])))
    cy = float(rng.uniform(within[1], max(within[1], within[3])))
    x = min(max(0, round(cx - w / 2)), width - w)
    y = min(max(0, round(cy - h / 2)), height - h)
    return image.crop((x, y, x + w, y + h))


def _views(plan: TrainPlan, work: Path) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """The pool: ``plan.views`` views per product; their product numbers and kinds (0 catalog,
    1 footage)."""
    catalog = generate_catalog(
        work / "catalog",
        plan.products,
        seed=plan.seed,
        size=plan.catalog_size,
        images_per_product=(1, 1),
    )
    rng = np.random.default_rng([plan.seed, 1])
    images: list[Image.Image] = []
    owners: list[int] = []
    kinds: list[int] = []
    for number, product in enumerate(catalog.products):
        with Image.open(catalog.image_path(product.images[0])) as opened:
            packshot = opened.convert("RGB")
        for v in range(plan.views):
            footage = v % 2
            view = (
                footage_view(packshot, rng, plan.frame) if footage else catalog_view(packshot, rng)
            )
            images.append(view)
            owners.append(number)
            kinds.append(footage)
    return images, np.asarray(owners), np.asarray(kinds)


class _Top(torch.nn.Module):
    """The trained part: the last encoder layers, the final layer norm and the projection, as
    ``CLIPVisionTransformer`` and ``get_image_features`` run them."""

    def __init__(self, model: Any, layers: int) -> None:
        super().__init__()
        vision = model.vision_model
        self.layers = torch.nn.ModuleList(vision.encoder.layers[-layers:])
        self.norm = vision.post_layernorm
        self.projection = model.visual_projection

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = _run_layers(self.layers, hidden)
        return F.normalize(self.projection(self.norm(hidden[:, 0])).float(), dim=-1)


@torch.inference_mode()
def _frozen_features(
    model: Any, processor: Any, images: list[Image.Image], layers: int, device: torch.device
) -> torch.Tensor:
    """The hidden states entering the trained layers, for every view, kept on the CPU side in
    the dtype the trained layers take: bf16 under bf16 autocast (half the memory), else
    float32 (a float32 layer refuses bf16 inputs)."""
    vision = model.vision_model
    frozen = vision.encoder.layers[: len(vision.encoder.layers) - layers]
    chunks = []
    for start in range(0, len(images), 32):
        pixels = processor(images=images[start : start + 32], return_tensors="pt")["pixel_values"]
        with _autocast(device):
            hidden = vision.pre_layrnorm(vision.embeddings(pixels.to(device)))
            hidden = _run_layers(frozen, hidden)
        chunks.append(hidden.to("cpu", torch.bfloat16 if _has_bf16(device) else torch.float32))
    return torch.cat(chunks)


def _pairs(
    views: list[tuple[np.ndarray, np.ndarray]], batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` distinct products, for each a catalog view and a footage view of it;
    ``views[product]`` holds its catalog and its footage views' rows."""
    products = rng.choice(len(views), size=batch, replace=False)
    first, second = [], []
    for product in products:
        catalog, footage = views[product]
        first.append(int(rng.choice(catalog)))
        second.append(int(rng.choice(footage)))
    return np.asarray(first), np.asarray(second)


def train_instance_clip(
    source: Path, out_dir: Path, plan: TrainPlan = TrainPlan(), device: str | None = None
) -> dict[str, Any]:
    """Train ``source`` (a CLIP directory) as described above and save it to ``out_dir``.

    Returns the training report (also written to ``out_dir/flickd-instance-training.json``):
    the plan, the seconds taken, and the loss and the held-out top-1 accuracy (a footage view
    finding its product among the catalog views) before and after.
    """
    from transformers import AutoImageProcessor, CLIPModel

    quiet_progress_bars()
    started = time.perf_counter()
    chosen = select_device(device)
    out_dir = Path(out_dir)
    work = out_dir.parent / f".{out_dir.name}-work"
    if work.exists():
        shutil.rmtree(work)
    model = CLIPModel.from_pretrained(source).to(chosen).eval()  # type: ignore[arg-type]
    processor = AutoImageProcessor.from_pretrained(source)
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        images, owners, kinds = _views(plan, work)
        features = _frozen_features(model, processor, images, plan.layers, chosen)
        held_out = owners >= plan.products - max(8, plan.products // 10)
        top = _Top(model, plan.layers).to(chosen)
        before = _accuracy(top, features[held_out], owners[held_out], kinds[held_out], chosen)
        losses = _train(top, features[~held_out], owners[~held_out], kinds[~held_out], plan, chosen)
        after = _accuracy(top, features[held_out], owners[held_out], kinds[held_out], chosen)
    save_beside_source(model, source, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    report = {
        "plan": asdict(plan),
        "source": str(source),
        "device": str(chosen),
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first": round(losses[0], 4),
        "loss_last": round(float(np.mean(losses[-10:])), 4),
        "held_out_products": len(set(owners[held_out].tolist())),
        "held_out_top1_before": round(before, 4),
        "held_out_top1_after": round(after, 4),
    }
    (out_dir / "flickd-instance-training.json").write_text(json.dumps(report, indent=2))
    return report


def _train(
    top: _Top,
    features: torch.Tensor,
    owners: np.ndarray,
    kinds: np.ndarray,
    plan: TrainPlan,
    device: torch.device,
) -> list[float]:
    views = [
        (np.flatnonzero((owners == p) & (kinds == 0)), np.flatnonzero((owners == p) & (kinds == 1)))
        for p in np.unique(owners)
    ]
    rng = np.random.default_rng([plan.seed, 2])
    top.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(top.parameters(), lr=plan.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=plan.lr, total_steps=plan.steps, pct_start=0.1
    )
    batch = min(plan.batch, len(views))
    losses = []
    for step in range(plan.steps):
        first, second = _pairs(views, batch, rng)
        hidden = features[np.concatenate([first, second])].to(device)
        with _autocast(device):
            vectors = top(hidden)
        a, b = vectors[:batch], vectors[batch:]
        logits = a @ b.T / plan.temperature
        target = torch.arange(batch, device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == plan.steps - 1:
            log.info("instance training step %d/%d loss %.3f", step + 1, plan.steps, losses[-1])
    top.eval().requires_grad_(False)
    return losses


@torch.inference_mode()
def _accuracy(
    top: _Top, features: torch.Tensor, owners: np.ndarray, kinds: np.ndarray, device: torch.device
) -> float:
    """Share of footage views whose nearest catalog view belongs to their own product."""
    top.eval()
    vectors = []
    for start in range(0, len(features), 64):
        with _autocast(device):
            vectors.append(top(features[start : start + 64].to(device)).cpu())
    all_vectors = torch.cat(vectors)
    catalog, footage = kinds == 0, kinds == 1
    scores = all_vectors[footage] @ all_vectors[catalog].T
    nearest = owners[catalog][scores.argmax(dim=1).numpy()]
    return float(np.mean(nearest == owners[footage]))


def save_beside_source(model: Any, source: Path, out_dir: Path) -> None:
    """The trained weights, with the source's other files (tokenizer, processor) beside them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(source).iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy2(item, out_dir / item.name)
    model.to("cpu").save_pretrained(out_dir)


def training_cli(
    argv: list[str] | None,
    doc: str,
    plan_type: Any,
    fields: tuple[str, ...],
    source_help: str,
    train: Any,
) -> None:
    """``OUT_DIR --source DIR [--FIELD N ...] [--device D]``: ``train(source, out_dir, plan,
    device)`` with a ``plan_type`` whose integer ``fields`` the flags set; prints its report."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source", type=Path, required=True, help=source_help)
    defaults = plan_type()
    for name in fields:
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = plan_type(**{name: getattr(args, name) for name in fields})
    print(json.dumps(train(args.source, args.out_dir, plan, args.device), indent=2))


def main(argv: list[str] | None = None) -> None:
    fields = ("products", "seed", "views", "layers", "steps", "batch")
    training_cli(argv, __doc__, TrainPlan, fields, "a CLIP model directory", train_instance_clip)


if __name__ == "__main__":
    main()
