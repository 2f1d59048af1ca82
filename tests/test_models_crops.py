from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.boxes import Detection, clamp_box
from models.crops import (
    crop_image,
    iou_matrix,
    is_tiny,
    merge_duplicates,
    plan_crops,
    whole_image_crop,
)
from models.labels import label_by_name


def det(box: tuple[float, float, float, float], score: float, name: str) -> Detection:
    label = label_by_name(name)
    assert label.coarse is not None
    return Detection(box, score, label.id, label.name, label.coarse.value)


def test_clamp_box_limits_and_orders() -> None:
    assert clamp_box((-10, -5, 120, 90), 100, 80) == (0.0, 0.0, 100.0, 80.0)
    assert clamp_box((50, 60, 10, 20), 100, 80) == (10.0, 20.0, 50.0, 60.0)
    assert clamp_box((150, 10, 200, 20), 100, 80) == (100.0, 10.0, 100.0, 20.0)


def test_is_tiny() -> None:
    size = (1000, 1000)
    assert is_tiny((0, 0, 15, 300), size, min_side=16)  # too narrow
    assert is_tiny((0, 0, 300, 10), size, min_side=16)  # too short
    assert not is_tiny((0, 0, 40, 40), size, min_side=16)
    # both sides pass, area is a sliver of a huge image
    assert is_tiny((0, 0, 20, 20), (4000, 4000), min_side=16)


def test_iou_matrix() -> None:
    ious = iou_matrix(np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]]))
    assert ious[0, 0] == pytest.approx(1.0)
    assert ious[0, 1] == pytest.approx(50 / 150)
    assert ious[0, 2] == 0.0
    assert ious[3, 3] == 0.0  # empty box: no division by zero
    np.testing.assert_allclose(ious, ious.T)


def test_merge_keeps_higher_score_within_coarse_class() -> None:
    shirt = det((10, 10, 110, 110), 0.7, "shirt, blouse")
    tee = det((12, 8, 112, 108), 0.9, "top, t-shirt, sweatshirt")  # same item, other fine label
    bag = det((10, 10, 110, 110), 0.6, "bag, wallet")  # same place, different coarse class
    far = det((300, 300, 400, 400), 0.5, "shirt, blouse")
    merged = merge_duplicates([shirt, tee, bag, far], iou_threshold=0.7)
    assert merged == [tee, bag, far]


def test_merge_leaves_boxes_below_threshold() -> None:
    a = det((0, 0, 100, 100), 0.9, "skirt")
    b = det((50, 0, 150, 100), 0.8, "pants")  # IoU 1/3
    assert merge_duplicates([a, b], iou_threshold=0.7) == [a, b]
    assert merge_duplicates([a, b], iou_threshold=0.3) == [a]


def test_plan_crops_clamps_drops_tiny_and_normalises() -> None:
    dets = [
        det((-20, 10, 150, 190), 0.9, "dress"),
        det((40, 40, 50, 200), 0.8, "shoe"),  # 10 px wide: dropped
    ]
    crops = plan_crops(dets, (200, 200), min_side=16, merge_iou=0.7)
    assert len(crops) == 1
    crop = crops[0]
    assert crop.box == (0.0, 10.0, 150.0, 190.0)
    assert crop.box_norm == pytest.approx((0.0, 0.05, 0.75, 0.95))
    assert (crop.fine_label, crop.coarse_label, crop.score) == ("dress", "dress", 0.9)
    assert not crop.whole_image


def test_plan_crops_merges_after_clamping() -> None:
    # Far apart before clamping (IoU ~0.5), identical after: one item.
    a = det((0, 0, 100, 100), 0.9, "coat")
    b = det((-100, 0, 100, 100), 0.8, "jacket")
    assert len(plan_crops([a, b], (100, 100), min_side=16, merge_iou=0.7)) == 1


@pytest.mark.parametrize("detections", [None, []])
def test_fallback_is_whole_image_labelled_from_feed(detections: list | None) -> None:
    crops = plan_crops(detections, (300, 400), min_side=16, merge_iou=0.7, feed_category="Sneakers")
    assert len(crops) == 1
    crop = crops[0]
    assert crop.whole_image and crop.score is None
    assert crop.box == (0.0, 0.0, 300.0, 400.0) and crop.box_norm == (0.0, 0.0, 1.0, 1.0)
    assert (crop.fine_label, crop.coarse_label) == ("shoe", "shoes")
    assert crop.label_id == label_by_name("shoe").id


def test_fallback_when_every_detection_is_tiny() -> None:
    crops = plan_crops([det((0, 0, 5, 5), 0.99, "watch")], (300, 400), min_side=16, merge_iou=0.7)
    assert [c.whole_image for c in crops] == [True]


def test_fallback_without_known_category_is_unlabelled() -> None:
    crop = whole_image_crop((10, 20), "Gift card")
    assert (crop.label_id, crop.fine_label, crop.coarse_label) == (None, None, None)


def test_crop_image_rounds_outwards() -> None:
    image = Image.new("RGB", (100, 80))
    crops = plan_crops(
        [det((10.4, 5.6, 60.2, 70.9), 0.9, "dress")], (100, 80), min_side=16, merge_iou=0.7
    )
    assert crop_image(image, crops[0]).size == (51, 66)  # x 10..61, y 5..71
    assert crop_image(image, whole_image_crop((100, 80))).size == (100, 80)
