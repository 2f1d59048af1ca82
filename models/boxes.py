"""Box geometry shared by detection and crop planning: boxes, clamping, areas, detections."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[float, float, float, float]  # x0, y0, x1, y1


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected item; ``box`` is x0, y0, x1, y1 in original-image pixels, clamped to it."""

    box: Box
    score: float
    label_id: int
    fine_label: str
    coarse_label: str

    def with_box(self, box: Box) -> Detection:
        return dataclasses.replace(self, box=box)


def clamp_box(box: Sequence[float], width: int, height: int) -> Box:
    """``box`` limited to the image; coordinates reordered so that x0 <= x1 and y0 <= y1."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return (
        min(max(x0, 0.0), float(width)),
        min(max(y0, 0.0), float(height)),
        min(max(x1, 0.0), float(width)),
        min(max(y1, 0.0), float(height)),
    )


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
