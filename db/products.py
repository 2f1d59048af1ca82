"""Read a product with its images and crops, for `flickd show` and the API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.schema import Image, Product


def product_details(
    session: Session, external_id: str, catalog: str = "default"
) -> dict[str, Any] | None:
    product = session.scalars(
        select(Product)
        .where(Product.catalog == catalog, Product.external_id == external_id)
        .options(selectinload(Product.images).selectinload(Image.crops))
    ).one_or_none()
    if product is None:
        return None
    return {
        "product_id": product.external_id,
        "catalog": product.catalog,
        "title": product.title,
        "brand": product.brand,
        "category": product.category,
        "price": product.price,
        "currency": product.currency,
        "attributes": product.attributes,
        "listed": product.listed,
        "delisted_at": _iso(product.delisted_at),
        "in_stock": product.in_stock,
        "updated_at": _iso(product.updated_at),
        "images": [
            {
                "image_id": image.id,
                "url": image.url,
                "state": image.state,
                "superseded_at": _iso(image.superseded_at),
                "retired_at": _iso(image.retired_at),
                "failure_reason": image.failure_reason,
                "failure_detail": image.failure_detail,
                "width": image.width,
                "height": image.height,
                "crops": [
                    {
                        "crop_id": crop.id,
                        "index": crop.crop_index,
                        "fine_label": crop.fine_label,
                        "coarse_label": crop.coarse_label,
                        "whole_image": crop.whole_image,
                        "detail": crop.detail,
                        "colour": crop.colour_name,
                        "colour_rgb": crop.colour_rgb,
                        "prompt": crop.prompt,
                        "score": crop.score,
                        "box": [crop.x0, crop.y0, crop.x1, crop.y1],
                        "box_norm": [crop.nx0, crop.ny0, crop.nx1, crop.ny1],
                    }
                    for crop in image.crops
                ],
            }
            for image in sorted(product.images, key=lambda i: i.id)
        ],
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None
