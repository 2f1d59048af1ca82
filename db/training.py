"""What fine-tuning trains on: the analysed crops that have a prompt and a stored crop JPEG."""

from __future__ import annotations

from typing import NamedTuple, cast

from sqlalchemy import select

from db.schema import Crop, Embedding, ImageState
from db.schema import Image as ImageRow
from db.session import session_scope
from flickd.core.settings import Settings


class TrainingCrop(NamedTuple):
    crop_id: int
    product_id: int
    blob_key: str
    prompt: str
    colour_name: str | None
    fine_label: str | None
    colour_family: str | None


def training_crops(settings: Settings, model_version_id: int | None = None) -> list[TrainingCrop]:
    """Every crop of an analysed image that has a prompt and a stored crop JPEG, in crop order.

    With ``model_version_id``, only crops embedded by that model version (the catalog the model
    being fine-tuned actually indexed).
    """
    query = (
        select(
            Crop.id, ImageRow.product_id, Crop.blob_key, Crop.prompt, Crop.colour_name,
            Crop.fine_label, Crop.colour_family,
        )
        .join(ImageRow, ImageRow.id == Crop.image_id)
        .where(
            ImageRow.state == ImageState.ANALYZED.value,
            Crop.prompt.is_not(None),
            Crop.blob_key.is_not(None),
        )
        .order_by(Crop.id)
    )  # fmt: skip
    if model_version_id is not None:
        query = query.join(Embedding, Embedding.crop_id == Crop.id).where(
            Embedding.model_version_id == model_version_id
        )
    with session_scope(settings) as session:
        rows = session.execute(query).all()
    # The query keeps only crops with a prompt and a blob key, so both are str here.
    return [
        TrainingCrop(*cast("tuple[int, int, str, str, str | None, str | None, str | None]", row))
        for row in rows
    ]
