"""synthetic/instance_detector.py: an offline YOLOS whose heads were trained here to find garments.

Trained from the tiny random YOLOS on a small catalog, then loaded through ``Detector`` (the code
path every model takes). Checked: only the two detection heads changed; the saved model loads
and has a version of its own; and, on frames of footage of products that training never saw,
its best box lies on the garment clearly more than the random model's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.detector import Detector
from models.tracks import box_iou
from synthetic.catalog import generate_catalog
from synthetic.instance_detector import DetectorPlan, train_instance_detector
from synthetic.video import footage_frame
from tests.models_fixtures import tiny_models

__all__ = ["tiny_models"]

PLAN = DetectorPlan(
    products=40, frames=3, steps=300, batch=16, frame=(192, 108), catalog_size="small"
)
HEADS = ("class_labels_classifier.", "bbox_predictor.")


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("instance-detector") / "detector"
    report = train_instance_detector(tiny_models["detector"], out, PLAN, device="cpu")
    return out, report


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_only_the_detection_heads_change(tiny_models, trained):
    out, report = trained
    before, after = _weights(tiny_models["detector"]), _weights(out)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "training changed nothing"
    assert all(name.startswith(HEADS) for name in changed), sorted(changed)
    assert {name.split(".")[0] + "." for name in changed} == set(HEADS)
    assert report["loss_last"] < report["loss_first"]
    assert report["held_out_iou_after"] > report["held_out_iou_before"] + 0.1, report


def test_the_trained_model_loads_like_any_detector(tiny_models, trained):
    out, _ = trained
    random_model = Detector(tiny_models["detector"], device="cpu")
    loaded = Detector(out, device="cpu")
    assert loaded.model_version != random_model.model_version
    assert (out / "preprocessor_config.json").exists()
    assert (out / "flickd-detector-training.json").exists()


def _best_box_iou(detector: Detector, frames: list[tuple[np.ndarray, tuple]]) -> float:
    """Mean IoU of each frame's best-scored box with the garment's (0 where none is found)."""
    found = detector.detect([Image.fromarray(pixels) for pixels, _ in frames], threshold=0.05)
    ious = []
    for detections, (_, truth) in zip(found, frames, strict=True):
        if not detections:
            ious.append(0.0)
            continue
        ious.append(box_iou(detections[0].box, truth))
    return float(np.mean(ious))


def test_boxes_land_on_unseen_garments_better_than_the_random_model(tiny_models, trained, tmp_path):
    """Products of another seed, never seen in training: their frames of footage, through
    ``Detector.detect`` (processor, heads, post-processing), get best boxes that overlap the
    garment far more than the random model's."""
    out, _ = trained
    catalog = generate_catalog(tmp_path, 12, seed=4242, size="small", images_per_product=(1, 1))
    rng = np.random.default_rng(7)
    frames = []
    for product in catalog.products:
        record = product.images[0]
        with Image.open(catalog.image_path(record)) as opened:
            packshot = opened.convert("RGB")
        frames += [footage_frame(packshot, PLAN.frame, rng, item=record.bbox) for _ in range(2)]
    random_iou = _best_box_iou(Detector(tiny_models["detector"], device="cpu"), frames)
    trained_iou = _best_box_iou(Detector(out, device="cpu"), frames)
    print(f"best-box IoU on unseen garments: random {random_iou:.2f}, trained {trained_iou:.2f}")
    assert trained_iou > random_iou + 0.1, (random_iou, trained_iou)
