"""The catalog's records (products, their images and ground truth) and its manifest,
``catalog.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from synthetic.catalog.vocabulary import COLOURS, SizeClass, colour_family


@dataclass
class CatalogImage:
    product_id: str
    filename: str  # relative to the catalog's images/ folder, e.g. "p000123_1.jpg"
    category: str
    colour_name: str
    rgb: tuple[int, int, int]  # the garment's base colour (the named colour, lightly jittered)
    width: int
    height: int
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # garment box x0, y0, x1, y1 (exclusive)
    coverage: float = 0.0  # garment share of the frame, 0..1

    @property
    def colour_family(self) -> str:
        return colour_family(self.colour_name)


@dataclass
class Product:
    product_id: str
    title: str
    brand: str
    category: str
    price: float
    images: list[CatalogImage]
    colour_name: str = ""
    variant: str = ""  # key of VARIANTS[category]

    @property
    def colour_family(self) -> str | None:
        """The everyday family of the product's colour (None for a product without one)."""
        name = self.colour_name or (self.images[0].colour_name if self.images else "")
        return colour_family(name) if name else None


@dataclass
class Catalog:
    root: Path
    products: list[Product]
    seed: int = 0
    size: SizeClass = "full"

    MANIFEST = "catalog.json"

    @property
    def images(self) -> list[CatalogImage]:
        return [image for product in self.products for image in product.images]

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def image_path(self, image: CatalogImage) -> Path:
        return self.images_dir / image.filename

    def save(self) -> Path:
        path = self.root / self.MANIFEST
        meta = {
            "format": "flickd-synthetic-catalog",
            "version": 1,
            "seed": self.seed,
            "size": self.size,
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        }
        path.write_text(_manifest_json(meta, [asdict(p) for p in self.products]), encoding="utf-8")
        return path

    @classmethod
    def load(cls, out_dir: Path | str) -> Catalog:
        root = Path(out_dir)
        payload = json.loads((root / cls.MANIFEST).read_text(encoding="utf-8"))
        products = [_product_from_json(p) for p in payload["products"]]
        return cls(root=root, products=products, seed=payload["seed"], size=payload["size"])


def _manifest_json(meta: dict[str, Any], products: list[dict[str, Any]]) -> str:
    """JSON with one product per line: compact, yet diffs and greps stay readable."""
    head = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in meta.items()]
    rows = ",\n".join(f"  {json.dumps(p, ensure_ascii=False)}" for p in products)
    return "{\n" + "\n".join(head) + '\n "products": [\n' + rows + "\n ]\n}\n"


def _product_from_json(data: dict[str, Any]) -> Product:
    """JSON has no tuples; restore them so a loaded catalog equals the generated one."""
    images = [
        CatalogImage(**{**img, "rgb": tuple(img["rgb"]), "bbox": tuple(img["bbox"])})
        for img in data["images"]
    ]
    return Product(**{**data, "images": images})
