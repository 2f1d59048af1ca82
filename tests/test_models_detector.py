from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.crops import plan_crops
from models.detector import Detector
from models.labels import LABELS, label_by_id
from models.loading import ModelLoadError
from tests.models_fixtures import (
    product_photos,
    tiny_detector,
    tiny_models,
    torch_single_thread,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PHOTOS = product_photos(12, seed=1)


def test_detections_are_clamped_kept_and_mapped(tiny_detector: Detector) -> None:
    results = tiny_detector.detect(PHOTOS)
    assert len(results) == len(PHOTOS)
    # Random weights, but the real forward pass at the production threshold: some items found.
    assert sum(len(r) for r in results) > 0
    for image, detections in zip(PHOTOS, results, strict=True):
        assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
        for d in detections:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            assert d.score > 0.5
            label = label_by_id(d.label_id)
            assert label.kept and d.fine_label == label.name
            assert label.coarse is not None and d.coarse_label == label.coarse.value


def test_garment_parts_are_predicted_and_dropped(tiny_detector: Detector) -> None:
    """The filter is really exercised: the raw model does predict parts above threshold."""
    raw_labels: set[int] = set()
    for image in PHOTOS:
        pixels = tiny_detector._pixels(image)[None]
        with torch.inference_mode():
            out = tiny_detector.model(pixel_values=pixels)
        probs = out.logits.softmax(-1)[0, :, :-1]
        scores, labels = probs.max(-1)
        raw_labels |= set(labels[scores > 0.5].tolist())
    assert any(not LABELS[i].kept for i in raw_labels)
    detected = {d.label_id for dets in tiny_detector.detect(PHOTOS) for d in dets}
    assert detected and all(LABELS[i].kept for i in detected)
    assert detected <= raw_labels


def test_batching_matches_one_at_a_time(tiny_detector: Detector) -> None:
    batched = tiny_detector.detect(PHOTOS, batch_size=5)
    assert batched == tiny_detector.detect(PHOTOS, batch_size=5)  # deterministic
    single = [tiny_detector.detect([im])[0] for im in PHOTOS]
    assert len({im.size for im in PHOTOS}) > 1  # several shape buckets
    for a, b in zip(batched, single, strict=True):
        assert [d.label_id for d in a] == [d.label_id for d in b]
        for da, db in zip(a, b, strict=True):
            assert da.score == pytest.approx(db.score, abs=1e-4)
            assert da.box == pytest.approx(db.box, abs=1e-2)


def test_threshold(tiny_detector: Detector) -> None:
    loose = tiny_detector.detect(PHOTOS, threshold=0.3)
    strict = tiny_detector.detect(PHOTOS, threshold=0.7)
    assert sum(map(len, loose)) > sum(map(len, strict))
    for lo, hi in zip(loose, strict, strict=True):
        assert set(hi) <= set(lo)
        assert all(d.score > 0.7 for d in hi)


def test_detections_feed_crop_planning(tiny_detector: Detector) -> None:
    for image, dets in zip(PHOTOS, tiny_detector.detect(PHOTOS), strict=True):
        crops = plan_crops(dets, image.size, min_side=16, merge_iou=0.7, feed_category="dress")
        assert crops and len(crops) <= max(1, len(dets))
        if crops[0].whole_image:
            assert crops[0].fine_label == "dress"
        else:
            assert all(0 <= v <= 1 for c in crops for v in c.box_norm)


def test_greyscale_and_rgba_inputs(tiny_detector: Detector) -> None:
    image = PHOTOS[0]
    expected = tiny_detector.detect([image])
    assert tiny_detector.detect([image.convert("RGBA")]) == expected
    assert len(tiny_detector.detect([image.convert("L")])) == 1
    assert tiny_detector.detect([]) == []


def test_placeholder_label_names_are_replaced(
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The hub checkpoint names its classes LABEL_0..LABEL_45; flickd supplies the names."""
    model_dir = tmp_path / "hub-like"
    shutil.copytree(tiny_models["detector"], model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(46)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(46)}
    config_path.write_text(json.dumps(config))
    detector = Detector(model_dir, device="cpu")
    assert detector.model.config.id2label[23] == "shoe"


def test_wrong_label_space_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "other"
    shutil.copytree(tiny_models["detector"], model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["id2label"]["0"], config["id2label"]["1"] = "top, t-shirt, sweatshirt", "shirt, blouse"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="class 0"):
        Detector(model_dir, device="cpu")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Detector(tmp_path / "nope", device="cpu")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        Detector(tmp_path, device="cpu")


def test_a_smaller_input_size_shrinks_what_the_model_sees_not_the_boxes_frame(
    tiny_detector: Detector,
) -> None:
    """``shortest_edge`` (video frames, FLICKD_VIDEO_DETECTOR_SHORTEST_EDGE) resizes the input
    to that short side with the long-side cap scaled alike, never above the processor's own;
    boxes still come back in the image's own pixels."""
    own_short, own_long, _ = tiny_detector.resize_rule
    assert own_long is not None
    half = own_short // 2
    assert tiny_detector.input_size(half) == {
        "shortest_edge": half,
        "longest_edge": round(own_long * half / own_short),
    }
    assert tiny_detector.input_size(own_short * 4) == {
        "shortest_edge": own_short,
        "longest_edge": own_long,
    }
    image = PHOTOS[0]
    full = tiny_detector._pixels(image)
    small = tiny_detector._pixels(image, half)
    assert min(full.shape[1:]) > min(small.shape[1:]) >= 16
    assert small.shape[1] * small.shape[2] < full.shape[1] * full.shape[2] / 2
    results = tiny_detector.detect(PHOTOS, shortest_edge=half)
    assert len(results) == len(PHOTOS) and sum(len(r) for r in results) > 0
    for photo, detections in zip(PHOTOS, results, strict=True):
        for d in detections:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height
    # The processor's own size is the default: passing it changes nothing.
    assert [
        [d.box for d in r] for r in tiny_detector.detect(PHOTOS[:3], shortest_edge=own_short)
    ] == [[d.box for d in r] for r in tiny_detector.detect(PHOTOS[:3])]
