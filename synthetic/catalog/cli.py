"""The command line, ``python -m synthetic.catalog OUT_DIR --products N --seed S --size
small|full``: generate a catalog and optionally write its feed."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from synthetic.catalog.feeds import write_feed
from synthetic.catalog.generator import generate_catalog
from synthetic.catalog.vocabulary import SizeClass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m synthetic.catalog",
        description="Generate a synthetic fashion catalog.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=get_args(SizeClass), default="full")
    parser.add_argument("--images", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--feed", type=Path, help="also write a feed (format from the suffix)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    catalog = generate_catalog(
        args.out_dir, args.products, seed=args.seed, size=args.size,
        images_per_product=tuple(args.images), workers=args.workers,
    )  # fmt: skip
    feed = f", feed {write_feed(catalog, args.feed, args.base_url)}" if args.feed else ""
    n_bytes = sum(catalog.image_path(img).stat().st_size for img in catalog.images)
    seconds = time.perf_counter() - start
    print(
        f"catalog {catalog.root}: {len(catalog.products)} products, {len(catalog.images)} images "
        f"({args.size}, seed {args.seed}, {n_bytes / 1e6:.1f} MB) in {seconds:.1f}s{feed}"
    )
    return 0
