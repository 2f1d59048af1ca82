"""Fine-tune the CLIP embedder on the catalog's own (crop, prompt) pairs, and prove it helped.

The prototype fine-tuned blind: a random 90/10 split of *crops* (so views of one product sat on
both sides), lr 5e-7, and only a validation loss to look at. Here:

* the held-out split is by **product** (:func:`split_by_product`), so no product is seen in
  training and then "retrieved" in evaluation;
* retrieval is measured on the held-out products **before and after** training
  (:func:`evaluate_retrieval`): text→image and image→image recall@1/5/10;
* the new model is **promoted** only when those numbers improve (:class:`PromotionRule`), and
  every run is recorded (by the caller, workers/training.py through db/versions.py) as a
  ``model_versions`` row whose parent is the base model.

Relevance, as used for both the training targets and the metrics: two crops *describe the same
thing* when their colour family and fine label are equal (:attr:`Pair.description`), i.e. each
answers the other's shopper query ("a navy jacket"). The text→image queries are those shopper
queries (:attr:`Pair.query`, "a/an {colour family} {garment}"), never the prompts trained on:
a prompt's template ("a photo of …", "an image of …") is picked by a hash of the crop, and
recall on the training sentences says little about what people type. Training words each text
afresh (bare or in any template) and crops and mirrors each image (``TrainConfig``).

The package, by job: ``data`` (pairs and the split), ``retrieval`` (the recall metrics),
``config`` (``TrainConfig``, ``PromotionRule``), ``clip`` (loading, embedding with and saving
the model), ``training`` (freezing, the loss, the loop), ``report`` (report.json and its plot)
and ``run`` (one run, step by step). It reads and writes no database: the pairs come in, a
:class:`FinetuneRun` goes out, and :func:`finish` writes the report once the caller has recorded
the run.
"""

from __future__ import annotations

from models.finetune.config import PromotionRule, TrainConfig
from models.finetune.data import Pair, same_description, split_by_product
from models.finetune.report import REPORT_DIR
from models.finetune.retrieval import (
    IMAGE_TO_IMAGE,
    RECALL_KS,
    TEXT_TO_IMAGE,
    Encoder,
    evaluate_retrieval,
    image_to_image_recall,
    text_to_image_recall,
)
from models.finetune.run import FinetuneResult, FinetuneRun, finetune, finish
from models.finetune.training import contrastive_loss, train, trainable_groups

__all__ = [
    "IMAGE_TO_IMAGE",
    "RECALL_KS",
    "REPORT_DIR",
    "TEXT_TO_IMAGE",
    "Encoder",
    "FinetuneResult",
    "FinetuneRun",
    "Pair",
    "PromotionRule",
    "TrainConfig",
    "contrastive_loss",
    "evaluate_retrieval",
    "finetune",
    "finish",
    "image_to_image_recall",
    "same_description",
    "split_by_product",
    "text_to_image_recall",
    "train",
    "trainable_groups",
]
