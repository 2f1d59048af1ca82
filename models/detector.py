"""Fashion item detection: YOLOS fine-tuned on Fashionpedia, through transformers' auto classes."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from PIL import Image

from models.boxes import Detection, box_area, clamp_box
from models.device import autocast_context, select_device
from models.labels import FASHIONPEDIA_NAMES, LABELS, NUM_LABELS
from models.loading import (
    ModelLoadError,
    load_pretrained,
    model_version,
    pretrained_kwargs,
    resize_rule,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)


def _check_label_space(config: PretrainedConfig) -> None:
    """Make sure the model predicts the 46 Fashionpedia classes in flickd's order, then name them.

    The hub checkpoint's config calls its classes ``LABEL_0..LABEL_45``; a checkpoint that does
    name them must use the same names, otherwise index ``i`` would silently mean another class.
    """
    id2label = {int(k): str(v) for k, v in getattr(config, "id2label", {}).items()}
    if len(id2label) != NUM_LABELS:
        raise ModelLoadError(
            f"detector predicts {len(id2label)} classes; flickd needs the {NUM_LABELS} "
            "Fashionpedia categories"
        )
    placeholder = all(id2label[i] == f"LABEL_{i}" for i in range(NUM_LABELS))
    if not placeholder:
        mismatched = [i for i in range(NUM_LABELS) if id2label[i].lower() != FASHIONPEDIA_NAMES[i]]
        if mismatched:
            i = mismatched[0]
            raise ModelLoadError(
                f"detector class {i} is {id2label[i]!r}, expected {FASHIONPEDIA_NAMES[i]!r}"
            )
    config.id2label = dict(enumerate(FASHIONPEDIA_NAMES))
    config.label2id = {name: i for i, name in enumerate(FASHIONPEDIA_NAMES)}


class Detector:
    """A YOLOS-style object detector over the Fashionpedia categories.

    ``name_or_dir`` is a hub id or a local directory written by ``save_pretrained`` (for example by
    ``models.build``); both load through the same code. Garment parts are never returned.
    """

    def __init__(
        self,
        name_or_dir: str | Path,
        device: torch.device | str | None = None,
        threshold: float = 0.5,
        batch_size: int = 16,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.name_or_dir = str(name_or_dir)
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.threshold = threshold
        self.batch_size = batch_size
        source, kwargs = pretrained_kwargs(name_or_dir)
        model = load_pretrained(
            AutoModelForObjectDetection.from_pretrained, source, "detector", **kwargs
        )
        self.processor = load_pretrained(
            AutoImageProcessor.from_pretrained, source, "detector image processor", **kwargs
        )
        _check_label_space(model.config)
        self.model = model.to(self.device).eval()
        self.model_version = model_version(self.name_or_dir, source, self.model)

    @property
    def resize_rule(self) -> tuple[int, int | None, int]:
        """How the processor resizes (``flickd.fetching.geometry.ResizeRule``); the short side
        must keep one patch (the YOLOS processor also rounds sides down to multiples of 16)."""
        patch = int(getattr(self.model.config, "patch_size", 16) or 16)
        return resize_rule(self.processor, min_side=max(patch, 16))

    def _pixels(self, image: Image.Image, shortest_edge: int | None = None) -> torch.Tensor:
        """(3, h, w) model input for one image: resized and normalised, never padded."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        extra = {} if shortest_edge is None else {"size": self.input_size(shortest_edge)}
        return self.processor(images=[rgb], return_tensors="pt", **extra)["pixel_values"][0]

    def input_size(self, shortest_edge: int) -> dict[str, int]:
        """The processor's ``size`` for images seen at ``shortest_edge`` (never above its own
        short side): the long side cap scaled alike, so the aspect rule stays the same.

        Why a smaller input: YOLOS is a ViT over 16-pixel patches, so its cost grows with the
        pixels it sees (linearly in the MLPs, quadratically in attention). A 1280x720 frame at
        the processor's 512/864 is 30x54 = 1620 patches; at 352 it is 22x40 = 880, about half
        the compute, and a garment that fills a good part of a video frame is still many
        patches wide. Catalog images keep the processor's size (the vision stage never passes
        one)."""
        own_short, own_long, _ = self.resize_rule
        short = max(16, min(int(shortest_edge), own_short))
        size = {"shortest_edge": short}
        if own_long is not None:
            size["longest_edge"] = max(short, round(own_long * short / own_short))
        return size

    def detect(
        self,
        images: Sequence[Image.Image],
        threshold: float | None = None,
        batch_size: int | None = None,
        shortest_edge: int | None = None,
    ) -> list[list[Detection]]:
        """Detections per image, in input order, each list sorted by descending score, in the
        images' own pixels; ``shortest_edge`` resizes them for the model to that short side
        instead of the processor's (``input_size``).

        Images are batched only with images of the same resized shape. YOLOS has no pixel mask,
        so padding a small image up to a batch-mate's size would change what the model sees and
        where its relative boxes point; bucketing by shape keeps batched results identical to
        one-image-at-a-time results. Catalog images mostly share a few aspect ratios, so buckets
        stay large.
        """
        threshold = self.threshold if threshold is None else threshold
        batch_size = batch_size or self.batch_size
        pixels = [self._pixels(image, shortest_edge) for image in images]
        buckets: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, tensor in enumerate(pixels):
            buckets[tuple(tensor.shape)].append(i)
        results: list[list[Detection]] = [[] for _ in images]
        for indices in buckets.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = torch.stack([pixels[i] for i in chunk])
                sizes = [(images[i].height, images[i].width) for i in chunk]
                for i, dets in zip(chunk, self._run(batch, sizes, threshold), strict=True):
                    results[i] = dets
        return results

    def _run(
        self, batch: torch.Tensor, sizes: list[tuple[int, int]], threshold: float
    ) -> list[list[Detection]]:
        with torch.inference_mode(), autocast_context(self.device):
            out = self.model(pixel_values=batch.to(self.device, non_blocking=True))
        # Post-process in float32 on the CPU: the outputs are tiny, and softmax over bf16 logits
        # would quantise scores right where the threshold sits.
        raw = SimpleNamespace(
            logits=out.logits.float().cpu(), pred_boxes=out.pred_boxes.float().cpu()
        )
        processed = self.processor.post_process_object_detection(
            raw, threshold=threshold, target_sizes=sizes
        )
        return [
            _to_detections(result, width=w, height=h)
            for result, (h, w) in zip(processed, sizes, strict=True)
        ]


def _to_detections(result: dict[str, torch.Tensor], width: int, height: int) -> list[Detection]:
    detections = []
    for score, label_id, box in zip(
        result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist(), strict=True
    ):
        label = LABELS[int(label_id)]
        if not label.kept or label.coarse is None:
            continue  # garment parts (sleeve, zipper …) are not products
        clamped = clamp_box(box, width, height)
        if box_area(clamped) <= 0:
            continue  # predicted entirely outside the image
        detections.append(
            Detection(
                box=clamped,
                score=float(score),
                label_id=label.id,
                fine_label=label.name,
                coarse_label=label.coarse.value,
            )
        )
    detections.sort(key=lambda d: (-d.score, d.box))
    return detections
