"""An offline YOLOS whose boxes land on the garment: its heads trained here on synthetic scenes.

``models.build`` makes YOLOS with seeded random weights. Its boxes then fall anywhere (on a
1280x720 frame of footage, clusters of boxes in the right half, half of them on the background),
so crops, and every benchmark built on them, measure chance. This module trains the two
detection heads of such a model (``class_labels_classifier`` and ``bbox_predictor``, the MLPs
that read YOLOS's detection tokens) to find the one garment of a synthetic scene:

* a **packshot** of the catalog (the garment's box is in the catalog manifest), as the vision
  stage sees it when the catalog is indexed;
* a **frame of footage** (:func:`synthetic.video.footage_frame`: the packshot on a background
  of a random hue, panned or zoomed, with sensor noise), as video search sees it.

The transformer stays as built, frozen; its detection tokens for every scene are computed once,
through the same processor and resize rule ``Detector`` uses. The loss is the library's own
DETR set loss (``transformers``' ``ForObjectDetectionLoss``: Hungarian matching of the
detection tokens to the ground truth, cross-entropy with the down-weighted "no object" class,
L1 and generalised IoU on the boxes), with each scene's garment labelled by the Fashionpedia
class of its category. The last tenth of the products (at least 4) is held out; the report
gives their scenes' mean IoU between the best-scored box and the truth, and the share whose
best box is of the right coarse class, before and after. Saved with ``save_pretrained``
beside the source's processor, it loads like any detector.

Frozen random features carry little about *where* a garment is, so most of what the box head
learns is where garments sit in such scenes; that is enough for crops on the garment instead of
the background, which is what the benchmarks need.

    python -m synthetic.instance_detector OUT_DIR --source DIR/detector [--products 80]
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.device import select_device
from models.labels import label_for_feed_category
from models.loading import quiet_progress_bars
from models.tracks import box_iou
from synthetic.catalog import generate_catalog
from synthetic.instance_clip import save_beside_source, training_cli
from synthetic.video import footage_frame

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class DetectorPlan:
    products: int = 80  # in the training catalog
    seed: int = 1000  # of the training catalog and of every draw
    frames: int = 3  # frames of footage per product, beside its packshot
    steps: int = 600
    batch: int = 32  # scenes per step
    lr: float = 1e-3
    frame: tuple[int, int] = (1280, 720)  # footage is rendered at this size
    catalog_size: str = "full"  # packshot sizes (synthetic.catalog)


@dataclass
class _Scenes:
    tokens: torch.Tensor  # (scenes, detection tokens, hidden): the frozen transformer's output
    boxes: np.ndarray  # (scenes, 4) the garment's box, cx cy w h relative to the scene
    classes: np.ndarray  # (scenes,) Fashionpedia class id of the garment
    owners: np.ndarray  # (scenes,) product number


def _scenes(plan: DetectorPlan, work: Path) -> list[tuple[Image.Image, Box, int, int]]:
    """(image, garment box in its pixels, class id, product number) of every scene."""
    catalog = generate_catalog(
        work / "catalog",
        plan.products,
        seed=plan.seed,
        size=plan.catalog_size,  # type: ignore[arg-type]
        images_per_product=(1, 1),
    )
    rng = np.random.default_rng([plan.seed, 3])
    scenes = []
    for number, product in enumerate(catalog.products):
        label = label_for_feed_category(product.category)
        assert label is not None, f"no Fashionpedia class for {product.category!r}"
        packshot_record = product.images[0]
        with Image.open(catalog.image_path(packshot_record)) as opened:
            packshot = opened.convert("RGB")
        scenes.append((packshot, packshot_record.bbox, label.id, number))
        for _ in range(plan.frames):
            pixels, box = footage_frame(packshot, plan.frame, rng, item=packshot_record.bbox)
            scenes.append((Image.fromarray(pixels), box, label.id, number))
    return scenes


@torch.inference_mode()
def _tokens(detector: Any, images: list[Image.Image]) -> torch.Tensor:
    """The detection tokens YOLOS's heads read, for each image as ``Detector.detect`` feeds it
    (resized, normalised, never padded; one image at a time, as shapes differ)."""
    model = detector.model
    count = model.config.num_detection_tokens
    out = []
    for image in images:
        pixels = detector._pixels(image).unsqueeze(0).to(detector.device)
        hidden = model.vit(pixel_values=pixels).last_hidden_state
        out.append(hidden[0, -count:].float().cpu())
    return torch.stack(out)


def _relative(box: Box, size: tuple[int, int]) -> tuple[float, float, float, float]:
    width, height = size
    x0, y0, x1, y1 = box
    return ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)


def train_instance_detector(
    source: Path, out_dir: Path, plan: DetectorPlan = DetectorPlan(), device: str | None = None
) -> dict[str, Any]:
    """Train ``source`` (a YOLOS directory) as described above and save it to ``out_dir``.

    Returns the training report (also written to ``out_dir/flickd-detector-training.json``):
    the plan, the seconds taken, the loss, and the held-out mean IoU and class accuracy of the
    best-scored box before and after."""
    from models.detector import Detector

    quiet_progress_bars()
    started = time.perf_counter()
    detector = Detector(source, device=select_device(device), threshold=0.0)
    model = detector.model
    model.requires_grad_(False)
    out_dir = Path(out_dir)
    work = out_dir.parent / f".{out_dir.name}-work"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        drawn = _scenes(plan, work)
        scenes = _Scenes(
            tokens=_tokens(detector, [image for image, *_ in drawn]),
            boxes=np.asarray([_relative(box, image.size) for image, box, *_ in drawn]),
            classes=np.asarray([label for *_, label, _ in drawn]),
            owners=np.asarray([number for *_, number in drawn]),
        )
        held_out = scenes.owners >= plan.products - max(4, plan.products // 10)
        before = _evaluate(model, scenes, held_out)
        losses = _train(model, scenes, ~held_out, plan, detector.device)
        after = _evaluate(model, scenes, held_out)
    save_beside_source(model, source, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    report = {
        "plan": asdict(plan),
        "source": str(source),
        "device": str(detector.device),
        "seconds": round(time.perf_counter() - started, 1),
        "scenes": len(drawn),
        "loss_first": round(losses[0], 4),
        "loss_last": round(float(np.mean(losses[-10:])), 4),
        "held_out_scenes": int(held_out.sum()),
        "held_out_iou_before": round(before[0], 4),
        "held_out_iou_after": round(after[0], 4),
        "held_out_class_before": round(before[1], 4),
        "held_out_class_after": round(after[1], 4),
    }
    (out_dir / "flickd-detector-training.json").write_text(json.dumps(report, indent=2))
    return report


def _heads(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits and boxes (cx cy w h, relative) of the detection tokens, as
    ``YolosForObjectDetection.forward`` computes them."""
    return model.class_labels_classifier(tokens), model.bbox_predictor(tokens).sigmoid()


def _train(
    model: Any, scenes: _Scenes, chosen: np.ndarray, plan: DetectorPlan, device: torch.device
) -> list[float]:
    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    rows = np.flatnonzero(chosen)
    heads = [model.class_labels_classifier, model.bbox_predictor]
    parameters = [p for head in heads for p in head.parameters()]
    for head in heads:
        head.train().requires_grad_(True)
    optimiser = torch.optim.AdamW(parameters, lr=plan.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=plan.lr, total_steps=plan.steps, pct_start=0.1
    )
    rng = np.random.default_rng([plan.seed, 4])
    batch = min(plan.batch, len(rows))
    losses = []
    for step in range(plan.steps):
        picked = rng.choice(rows, size=batch, replace=False)
        logits, boxes = _heads(model, scenes.tokens[picked].to(device))
        labels = [
            {
                "class_labels": torch.tensor([int(scenes.classes[i])], device=device),
                "boxes": torch.as_tensor(
                    scenes.boxes[i : i + 1], dtype=torch.float32, device=device
                ),
            }
            for i in picked
        ]
        loss, _, _ = ForObjectDetectionLoss(logits, labels, device, boxes, model.config)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == plan.steps - 1:
            log.info("detector training step %d/%d loss %.3f", step + 1, plan.steps, losses[-1])
    for head in heads:
        head.eval().requires_grad_(False)
    return losses


@torch.inference_mode()
def _evaluate(model: Any, scenes: _Scenes, rows: np.ndarray) -> tuple[float, float]:
    """Mean IoU of each scene's best-scored box (over the kept classes' probabilities, as the
    processor scores them) with the truth, and the share of scenes where that box's class has
    the truth's coarse class."""
    from models.labels import LABELS

    device = next(model.parameters()).device
    logits, boxes = _heads(model, scenes.tokens[rows].to(device))
    probs = logits.float().softmax(-1)[..., :-1]
    scores, classes = probs.max(-1)
    best = scores.argmax(-1)
    picked = torch.arange(len(best))
    predicted = boxes[picked, best].cpu().numpy()
    ious = [
        box_iou(_corners(p), _corners(t))
        for p, t in zip(predicted, scenes.boxes[rows], strict=True)
    ]
    coarse = [
        LABELS[int(c)].coarse == LABELS[int(t)].coarse
        for c, t in zip(classes[picked, best].tolist(), scenes.classes[rows], strict=True)
    ]
    return float(np.mean(ious)), float(np.mean(coarse))


def _corners(box: np.ndarray) -> tuple[float, float, float, float]:
    """A cx cy w h box as x0 y0 x1 y1."""
    cx, cy, w, h = (float(v) for v in box)
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def main(argv: list[str] | None = None) -> None:
    fields = ("products", "seed", "frames", "steps", "batch")
    training_cli(
        argv, __doc__, DetectorPlan, fields, "a YOLOS model directory", train_instance_detector
    )


if __name__ == "__main__":
    main()
