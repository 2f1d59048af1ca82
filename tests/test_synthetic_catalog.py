"""The synthetic catalog: images look like their ground truth, output is deterministic, feeds
round-trip through pandas, and the big-feed writer is fast and memory-bounded."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synthetic.catalog import (
    BAD_ROW_KINDS,
    BRANDS,
    CATEGORIES,
    COLOURS,
    FEED_COLUMNS,
    VARIANTS,
    Background,
    Catalog,
    GarmentStyle,
    View,
    feed_format,
    generate_catalog,
    main,
    render_garment,
    render_garment_detailed,
    write_big_feed,
    write_feed,
)
from tests.conftest import catalog_fixture

# NaN or overflow in the shading maths shows up as RuntimeWarnings before it shows up as pixels
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

BASE_URL = "http://127.0.0.1:8000"
APPAREL = {"dress", "top", "trousers", "skirt", "jacket"}


# --- helpers, deliberately independent of the module's own code --------------------------------


def nearest_name(rgb) -> str:
    return min(COLOURS, key=lambda n: float(np.linalg.norm(np.subtract(COLOURS[n], rgb))))


def srgb_to_lab(rgb) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (m @ lin) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def dominant_colour(image: Image.Image, q: int = 16) -> np.ndarray:
    """Mean colour of the most common quantised colour among bins that never touch the image
    border (the backdrop does)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int64)
    codes = (pixels // q) @ np.array([65536, 256, 1])
    border = np.concatenate([codes[:3].ravel(), codes[-3:].ravel()])
    border = np.concatenate([border, codes[:, :3].ravel(), codes[:, -3:].ravel()])
    inner = ~np.isin(codes, np.unique(border))
    values, counts = np.unique(codes[inner], return_counts=True)
    return pixels[codes == values[np.argmax(counts)]].mean(axis=0)


def share_near(image: Image.Image, rgb, distance: float = 40.0) -> float:
    """Share of the image's pixels within ``distance`` (RGB) of ``rgb``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((np.linalg.norm(pixels - np.asarray(rgb), axis=-1) < distance).mean())


def read_feed(path: Path, fmt: str) -> pd.DataFrame:
    if fmt in ("csv", "tsv"):
        sep = "\t" if fmt == "tsv" else ","
        return pd.read_csv(path, sep=sep, dtype={"product_id": str})
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype={"product_id": str})
    if fmt == "parquet":
        return pd.read_parquet(path, engine="pyarrow")
    return pd.read_excel(path, engine="openpyxl", dtype={"product_id": str})


# --- colours and single renders -----------------------------------------------------------------


def test_colours_are_named_and_well_separated() -> None:
    assert len(COLOURS) == 16 and len(set(COLOURS.values())) == 16
    assert CATEGORIES == ("dress", "top", "trousers", "skirt", "jacket", "shoe", "bag")
    for a, b in itertools.combinations(COLOURS, 2):
        assert np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b])) > 45, (a, b)
        assert np.linalg.norm(srgb_to_lab(COLOURS[a]) - srgb_to_lab(COLOURS[b])) > 20, (a, b)


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_variant_renders_a_dominant_garment(category: str) -> None:
    rng = np.random.default_rng(7)
    for i, variant in enumerate(VARIANTS[category]):
        name = list(COLOURS)[(i * 5 + len(category)) % len(COLOURS)]
        style = GarmentStyle(category, variant, 100 + i)
        r = render_garment_detailed(category, COLOURS[name], 224, rng, style=style)
        assert r.image.mode == "RGB" and max(r.image.size) == 224
        assert 0.3 <= r.coverage <= 0.72, (variant, r.coverage)
        x0, y0, x1, y1 = r.bbox
        assert 0 <= x0 < x1 <= r.image.width and 0 <= y0 < y1 <= r.image.height
        # the named RGB is the garment's median colour, give or take grain and details
        inside = np.asarray(r.image)[r.mask > 0.99]
        assert np.abs(np.median(inside, axis=0) - COLOURS[name]).max() <= 12, variant
        rgb = dominant_colour(r.image)
        assert nearest_name(rgb) == name, (variant, rgb)


@pytest.mark.parametrize("name", list(COLOURS))
def test_each_colour_is_recovered_on_every_backdrop_style(name: str) -> None:
    rng = np.random.default_rng(list(COLOURS).index(name))
    styles = ("plain", "gradient", "stripes", "checks", "noise")
    for category, background in zip(CATEGORIES, itertools.cycle(styles), strict=False):
        image = render_garment(category, COLOURS[name], 200, rng, background)
        rgb = dominant_colour(image)
        assert nearest_name(rgb) == name, (category, background, rgb)
        assert share_near(image, COLOURS[name]) > 0.2, (category, background)


def test_render_is_deterministic_and_follows_size_and_view() -> None:
    style = GarmentStyle("trousers", "wide-leg", 3)
    a = render_garment("trousers", (30, 42, 100), 300, np.random.default_rng(1), style=style)
    b = render_garment("trousers", (30, 42, 100), 300, np.random.default_rng(1), style=style)
    c = render_garment("trousers", (30, 42, 100), 300, np.random.default_rng(2), style=style)
    assert a.tobytes() == b.tobytes() != c.tobytes()
    assert a.height == 300 and a.width < a.height  # trousers get a portrait frame

    shoe = render_garment("shoe", (200, 30, 40), 300, np.random.default_rng(0))
    assert shoe.width == 300 and shoe.height <= 300  # shoes get a square/landscape frame

    bg = Background(style="checks", rgb=(240, 238, 236), contrast=6.0, shadow=0.0)
    view = View(rotation=8.0, scale=0.9, shift=(0.05, -0.05), mirror=True)
    r = render_garment_detailed(
        "dress", (245, 140, 185), (240, 320), np.random.default_rng(0), bg, view=view
    )
    assert r.image.size == (240, 320) and r.background == bg
    assert 0.3 <= r.coverage <= 0.72
    assert np.asarray(r.image)[2, 2].tolist() != [0, 0, 0]  # the corner is backdrop
    with pytest.raises(ValueError):
        render_garment("hat", (0, 0, 0), 100, np.random.default_rng(0))


# --- catalogs -----------------------------------------------------------------------------------


small_catalog = catalog_fixture(40, seed=3, dirname="cat")


def test_manifest_matches_files(small_catalog: Catalog) -> None:
    cat = small_catalog
    files = sorted(p.name for p in cat.images_dir.iterdir())
    assert files == sorted(img.filename for img in cat.images)
    for img in cat.images:
        with Image.open(cat.image_path(img)) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (img.width, img.height)
        assert 160 <= max(img.width, img.height) <= 256
        assert 0.3 <= img.coverage <= 0.72
        x0, y0, x1, y1 = img.bbox
        assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
    loaded = Catalog.load(cat.root)
    assert loaded.products == cat.products and loaded.seed == 3 and loaded.size == "small"


def test_products_look_like_a_catalog(small_catalog: Catalog) -> None:
    products = small_catalog.products
    assert len(products) == 40
    assert len({p.product_id for p in products}) == 40
    assert {p.category for p in products} == set(CATEGORIES)
    assert len({len(p.images) for p in products}) > 1
    for p in products:
        assert re.fullmatch(r"p\d{6}", p.product_id)
        assert 1 <= len(p.images) <= 3
        assert [i.filename for i in p.images] == [
            f"{p.product_id}_{k}.jpg" for k in range(1, len(p.images) + 1)
        ]
        assert p.title.startswith(p.colour_name.title() + " ")
        assert VARIANTS[p.category][p.variant] in p.title
        assert p.brand in BRANDS and 5 < p.price < 500
        for img in p.images:
            assert (img.category, img.colour_name) == (p.category, p.colour_name)
            assert nearest_name(img.rgb) == p.colour_name
            if p.category in APPAREL:
                assert img.width <= img.height  # apparel is shot portrait or square


def test_catalog_images_are_dominated_by_the_garment_colour(small_catalog: Catalog) -> None:
    for img in small_catalog.images:
        with Image.open(small_catalog.image_path(img)) as im:
            rgb = dominant_colour(im)
            share = share_near(im, img.rgb)
        assert nearest_name(rgb) == img.colour_name, (img.filename, img.category, rgb)
        assert share > 0.2, (img.filename, img.category, share)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a = generate_catalog(tmp_path / "a", 6, seed=11, size="small")
    generate_catalog(tmp_path / "b", 6, seed=11, size="small", workers=2)
    generate_catalog(tmp_path / "c", 3, seed=11, size="small")
    generate_catalog(tmp_path / "d", 6, seed=12, size="small")
    bytes_a = _tree_bytes(tmp_path / "a")
    assert bytes_a == _tree_bytes(tmp_path / "b")  # worker count does not matter
    prefix = Catalog.load(tmp_path / "c")
    assert prefix.products == a.products[:3]  # product i does not depend on n_products
    for img in prefix.images:
        assert prefix.image_path(img).read_bytes() == a.image_path(img).read_bytes()
    assert Catalog.load(tmp_path / "d").products != a.products


def test_full_size_packshots(tmp_path: Path) -> None:
    cat = generate_catalog(tmp_path, 3, seed=5, size="full", images_per_product=(2, 2))
    assert len(cat.images) == 6
    for img in cat.images:
        assert 600 <= max(img.width, img.height) <= 1200
        assert 10_000 < cat.image_path(img).stat().st_size < 600_000
    fixed = generate_catalog(tmp_path / "fixed", 2, seed=5, size="full", long_side=640)
    assert {max(i.width, i.height) for i in fixed.images} == {640}


# --- feeds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "xlsx"])
def test_feed_formats_round_trip(small_catalog: Catalog, tmp_path: Path, fmt: str) -> None:
    path = write_feed(small_catalog, tmp_path / f"feed.{fmt}", BASE_URL + "/")
    assert feed_format(path) == fmt
    df = read_feed(path, fmt)
    assert list(df.columns) == list(FEED_COLUMNS)
    assert len(df) == len(small_catalog.images)
    expected = [f"{BASE_URL}/images/{img.filename}" for img in small_catalog.images]
    assert df["image_url"].tolist() == expected
    assert df["product_id"].tolist() == [img.product_id for img in small_catalog.images]
    by_id = {p.product_id: p for p in small_catalog.products}
    for row in df.itertuples():
        p = by_id[row.product_id]
        assert (row.title, row.brand, row.category) == (p.title, p.brand, p.category)
        assert row.price == pytest.approx(p.price)

    listed = read_feed(
        write_feed(small_catalog, tmp_path / f"list.{fmt}", BASE_URL, layout="list"), fmt
    )
    assert list(listed.columns) == list(FEED_COLUMNS)
    assert len(listed) == len(small_catalog.products)
    for row, p in zip(listed.itertuples(), small_catalog.products, strict=True):
        assert row.image_url.split("|") == [f"{BASE_URL}/images/{i.filename}" for i in p.images]


def test_feed_format_from_suffix_or_argument(small_catalog: Catalog, tmp_path: Path) -> None:
    assert feed_format("x/feed.CSV.gz") == "csv" and feed_format("f.ndjson") == "jsonl"
    path = write_feed(small_catalog, tmp_path / "feed.txt", BASE_URL, fmt="tsv")
    assert len(pd.read_csv(path, sep="\t")) == len(small_catalog.images)
    gz = write_feed(small_catalog, tmp_path / "feed.csv.gz", BASE_URL)
    assert len(pd.read_csv(gz)) == len(small_catalog.images)
    with pytest.raises(ValueError):
        write_feed(small_catalog, tmp_path / "feed.txt", BASE_URL)


def test_big_feed_rows_products_and_bad_rows(tmp_path: Path) -> None:
    stats = write_big_feed(tmp_path / "big.csv", 200_000, BASE_URL, seed=2, bad_fraction=0.05)
    df = pd.read_csv(tmp_path / "big.csv", dtype=str, keep_default_na=False)
    assert list(df.columns) == list(FEED_COLUMNS)
    assert len(df) == stats.rows == 200_000
    assert set(stats.bad) == set(BAD_ROW_KINDS)
    assert 0.04 < sum(stats.bad.values()) / len(df) < 0.06
    assert min(stats.bad.values()) > 1000  # every kind is represented

    assert (df["product_id"] == "").sum() == stats.bad["missing_id"]
    assert (df["image_url"] == "").sum() == stats.bad["missing_url"]
    assert df["image_url"].str.startswith("ftp://").sum() == stats.bad["ftp_scheme"]
    good_url = df["image_url"].str.fullmatch(
        re.escape(BASE_URL) + r"/images/[A-Z]{2}-\d{7}_\d\.jpg"
    )
    bad_urls = stats.bad["missing_url"] + stats.bad["ftp_scheme"] + stats.bad["garbage_url"]
    assert (~good_url).sum() == bad_urls
    # good URLs are unique per row, so among those rows only the injected copies repeat (two
    # junk rows of one product may coincide too, hence the filter)
    assert df[good_url].duplicated().sum() == stats.bad["duplicate"]

    good = df[(df["product_id"] != "") & good_url].drop_duplicates()
    per_product = good.groupby("product_id")
    assert per_product[["title", "brand", "category", "price"]].nunique().max().max() == 1
    assert 2.5 < per_product.size().mean() < 3.5  # several images per product
    assert 0.99 * stats.products < df["product_id"].replace("", np.nan).nunique() <= stats.products
    assert set(df["category"]) == set(CATEGORIES)
    assert df["price"].astype(float).between(5, 500).all()


def test_big_feed_cycles_given_image_names_and_is_deterministic(tmp_path: Path) -> None:
    names = ["a.jpg", "b.jpg", "c.jpg"]
    write_big_feed(tmp_path / "a.tsv", 25, BASE_URL, image_names=names, seed=4, chunk_rows=7)
    write_big_feed(tmp_path / "b.tsv", 25, BASE_URL, image_names=names, seed=4, chunk_rows=7)
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    df = pd.read_csv(tmp_path / "a.tsv", sep="\t")
    assert df["image_url"].tolist() == [f"{BASE_URL}/images/{names[i % 3]}" for i in range(25)]
    stats = write_big_feed(tmp_path / "c.csv.gz", 1000, BASE_URL)
    assert len(pd.read_csv(tmp_path / "c.csv.gz")) == stats.rows == 1000
    assert sum(stats.bad.values()) == 0


def test_big_feed_memory_stays_flat(tmp_path: Path) -> None:
    # Peak RSS after a small feed vs after a feed 20x longer, same chunk size: a writer that
    # held the whole feed would grow by hundreds of MB.
    script = textwrap.dedent(
        f"""
        import resource
        from synthetic.catalog import write_big_feed
        write_big_feed({str(tmp_path / "s.csv")!r}, 20_000, "http://h", chunk_rows=20_000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_big_feed({str(tmp_path / "l.csv")!r}, 400_000, "http://h", chunk_rows=20_000)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mb = int(out.stdout.strip()) / 1024
    assert growth_mb < 40, growth_mb
    assert (tmp_path / "l.csv").stat().st_size > 30_000_000


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_prints_one_line_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feed = tmp_path / "feed.jsonl"
    argv = [str(tmp_path / "out"), "--products", "3", "--seed", "1", "--size", "small"]
    assert main([*argv, "--feed", str(feed)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "3 products" in lines[0]
    cat = Catalog.load(tmp_path / "out")
    assert len(cat.products) == 3 and len(pd.read_json(feed, lines=True)) == len(cat.images)
