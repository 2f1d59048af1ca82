"""A synthetic fashion catalog that tests, benchmarks and the demo share.

It makes three things:

* **Packshot-like JPEGs** of seven coarse garment classes (:data:`CATEGORIES`), each in one of
  :data:`COLOURS`. A garment is a few polygons drawn with Pillow, then shaded with light, drape
  folds, seams, ambient occlusion and fabric grain, on a plain or faintly patterned light
  backdrop with a soft drop shadow. The garment covers roughly 35-70 % of the frame, so its colour
  is the image's dominant colour once the backdrop (which touches the border) is discounted.
* **A ground-truth manifest** (``catalog.json``): per product its category, colour, style and
  per image the garment's bounding box and coverage.
* **Feeds** in the shapes merchants send them (:func:`write_feed`), and a streaming writer for
  million-row CSV feeds with realistic junk rows (:func:`write_big_feed`).

Everything is a pure function of the seed. Product ``i`` draws from ``default_rng([seed, i])``, so
the first N products of a larger catalog equal a catalog of N products, and the bytes do not
depend on how many worker processes rendered them.

CLI: ``python -m synthetic.catalog OUT_DIR --products N --seed S --size small|full``.

The package, one job per module, each importing only those above it:

* :mod:`~synthetic.catalog.vocabulary`: colours, categories, styles, brands, prices, columns
* :mod:`~synthetic.catalog.shapes`: geometry primitives garments are drawn with
* :mod:`~synthetic.catalog.tops`, :mod:`~synthetic.catalog.dresses`,
  :mod:`~synthetic.catalog.bottoms`, :mod:`~synthetic.catalog.accessories`: the garment shapes
* :mod:`~synthetic.catalog.placement`: views, fitting into the frame, rasterising
* :mod:`~synthetic.catalog.garments`: garment styles and their normalised silhouettes
* :mod:`~synthetic.catalog.shading`: fabric, light, occlusion, mottle and grain
* :mod:`~synthetic.catalog.backdrops`: studio backdrops and drop shadows
* :mod:`~synthetic.catalog.render`: one packshot with its ground truth
* :mod:`~synthetic.catalog.records`: products, images and the ``catalog.json`` manifest
* :mod:`~synthetic.catalog.generator`: a whole catalog from a seed
* :mod:`~synthetic.catalog.feeds`: merchant feeds in every format
* :mod:`~synthetic.catalog.bigfeed`: the streaming million-row feed writer
* :mod:`~synthetic.catalog.cli` (run as ``python -m synthetic.catalog``): the command line
"""

from __future__ import annotations

from synthetic.catalog.backdrops import Background, random_background
from synthetic.catalog.bigfeed import BAD_ROW_KINDS, BigFeedStats, write_big_feed
from synthetic.catalog.cli import main
from synthetic.catalog.feeds import feed_format, feed_frame, write_feed
from synthetic.catalog.garments import GarmentStyle, sample_style
from synthetic.catalog.generator import generate_catalog
from synthetic.catalog.placement import View, random_view
from synthetic.catalog.records import Catalog, CatalogImage, Product
from synthetic.catalog.render import Rendering, frame_size, render_garment, render_garment_detailed
from synthetic.catalog.vocabulary import (
    BRANDS,
    CATEGORIES,
    COLOURS,
    FEED_COLUMNS,
    VARIANTS,
    colour_family,
    nearest_colour,
)

__all__ = [
    "BAD_ROW_KINDS",
    "BRANDS",
    "CATEGORIES",
    "COLOURS",
    "FEED_COLUMNS",
    "VARIANTS",
    "Background",
    "BigFeedStats",
    "Catalog",
    "CatalogImage",
    "GarmentStyle",
    "Product",
    "Rendering",
    "View",
    "colour_family",
    "feed_format",
    "feed_frame",
    "frame_size",
    "generate_catalog",
    "main",
    "nearest_colour",
    "random_background",
    "random_view",
    "render_garment",
    "render_garment_detailed",
    "sample_style",
    "write_big_feed",
    "write_feed",
]
