"""`flickd demo`: the whole system on the embedded default, in one command.

Generates the synthetic catalog, serves it on loopback, ingests it (download, analysis), lets the
final task fine-tune the offline CLIP and build the index, runs a few searches and writes an HTML
report of what it saw. Nothing leaves the machine and nothing is downloaded from a model hub:
the models are the project's offline builds (seeded random weights), so the detector's boxes
carry no meaning; the demo therefore runs with detection off (each image is one whole-image crop
labelled from the feed category) unless asked for the detector.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flickd.core.logs import setup_logging
from flickd.core.settings import Settings

if TYPE_CHECKING:
    from models.build import Size

TEXT_QUERIES = (
    "a photo of a red dress",
    "a pair of black shoes",
    "a navy jacket",
    "a white top",
    "a brown bag",
)


@dataclass
class DemoResult:
    report: Path
    summary: dict[str, Any]
    finalize: dict[str, Any]
    searches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("flickd-demo"),
    show_default=True,
)
@click.option("--products", type=int, default=100, show_default=True)
@click.option(
    "--detector/--no-detector",
    default=False,
    show_default=True,
    help="Use the offline (random-weight) detector; its boxes carry no meaning.",
)
def demo(out_dir: Path, products: int, detector: bool) -> None:
    """The whole pipeline on the embedded default with offline models, in one command."""
    setup_logging("WARNING")
    result = run_demo(out_dir, products=products, detector=detector)
    summary = result.summary
    click.echo(
        f"ingested {summary['accepted']} images of {products} products: "
        f"{summary.get('images_by_state') or summary['status']}"
    )
    if result.finalize:
        before = result.finalize.get("before", {}).get("text_to_image", {}).get("recall@5")
        after = result.finalize.get("after", {}).get("text_to_image", {}).get("recall@5")
        click.echo(
            f"fine-tuned CLIP: held-out text->image recall@5 {before} -> {after}, "
            f"{'promoted' if result.finalize.get('promoted') else 'not promoted'}"
        )
    for search in result.searches:
        top = search["hits"][0] if search["hits"] else None
        found = f"{top['product_id']} {top['score']:.3f} {top['match']}" if top else "nothing"
        click.echo(f"  {search['query']!r}: {found}")
    click.echo(f"report: {result.report}  ({result.seconds:.0f} s)")


def register(main: click.Group) -> None:
    main.add_command(demo)


def demo_settings(out_dir: Path, models: dict[str, Path], detector: bool) -> Settings:
    return Settings(
        data_dir=out_dir / "data",
        allowed_networks=["127.0.0.0/8"],
        detector_model=str(models["detector"]) if detector else "none",
        embedding_model=str(models["clip"]),
        device="cpu",
        finalize="auto",
        finetune_min_new_crops=1,
        # A randomly initialised tiny CLIP learns at rates a pretrained one would not survive.
        train_lr=1e-3,
        train_epochs=8,
        train_batch_size=32,
    )


def run_demo(
    out_dir: Path, products: int = 100, seed: int = 11, detector: bool = False
) -> DemoResult:
    from sqlalchemy import select

    from db.migrate import upgrade
    from db.schema import ModelVersion
    from db.session import session_scope
    from flickd.services.search import SearchService
    from models.build import build_offline_models
    from producer.ingest import ingest
    from synthetic.catalog import generate_catalog, write_feed
    from synthetic.server import CatalogServer

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    models = _offline_models(out_dir / "models", build_offline_models)
    settings = demo_settings(out_dir, models, detector)
    upgrade(settings)
    catalog = generate_catalog(out_dir / "catalog", products, seed=seed, size="small")
    with CatalogServer(catalog.images_dir) as server:
        feed = out_dir / "feed.csv"
        write_feed(catalog, feed, server.base_url)
        summary = ingest(feed, settings)
    with session_scope(settings) as session:
        tuned = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.parent_id.is_not(None))
            .order_by(ModelVersion.id.desc())
        ).first()
        finalize = (
            {"model": tuned.name, "active": tuned.active, **(tuned.metrics or {})} if tuned else {}
        )
    service = SearchService(settings)
    searches = [_text_search(service, q) for q in TEXT_QUERIES]
    searches += [
        _image_search(service, catalog.image_path(img), img.product_id)
        for img in catalog.images[:: max(1, len(catalog.images) // 3)][:3]
    ]
    report = out_dir / "report.html"
    result = DemoResult(
        report, summary.to_dict(), finalize, searches, time.perf_counter() - started
    )
    report.write_text(_render(result, settings))
    return result


def _offline_models(
    root: Path, build: Callable[[Path, Size, int], dict[str, Path]]
) -> dict[str, Path]:
    detector, clip = root / "detector", root / "clip"
    if (detector / "config.json").exists() and (clip / "config.json").exists():
        return {"detector": detector, "clip": clip}
    return build(root, "tiny", 0)


def _hits(response: Any) -> list[dict[str, Any]]:
    return [hit.model_dump() for item in response.items for hit in item.results[:5]]


def _text_search(service: Any, text: str) -> dict[str, Any]:
    return {"query": text, "kind": "text", "hits": _hits(service.search_text(text, top_k=5))}


def _image_search(service: Any, path: Path, product_id: str) -> dict[str, Any]:
    from PIL import Image

    with Image.open(path) as image:
        response = service.search_image(image.convert("RGB"), top_k=5)
    return {
        "query": f"image of {product_id}",
        "kind": "image",
        "expected": product_id,
        "image": _data_uri(path.read_bytes()),
        "hits": _hits(response),
    }


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _crop_uri(settings: Settings, crop_id: int) -> str:
    from db.schema import Crop
    from db.session import session_scope
    from flickd.core.blobstore import BlobStore

    with session_scope(settings) as session:
        crop = session.get(Crop, crop_id)
        # A hit names a crop of the demo's index, and analysis stores every crop's JPEG.
        assert crop is not None and crop.blob_key is not None
        key = crop.blob_key
    return _data_uri(BlobStore(settings.blob_dir).get(key))


def _render(result: DemoResult, settings: Settings) -> str:
    esc = html.escape
    rows = []
    for search in result.searches:
        cards = "".join(
            f'<figure><img src="{_crop_uri(settings, hit["crop_id"])}">'
            f"<figcaption><b>{esc(hit['product_id'])}</b> {esc(hit['title'] or '')}<br>"
            f'{hit["score"]:.3f} <span class="{esc(hit["match"])}">{esc(hit["match"])}</span>'
            f"<br>{esc(hit['colour'] or '')} {esc(hit['label'] or '')}</figcaption></figure>"
            for hit in search["hits"]
        )
        query = esc(search["query"])
        if search["kind"] == "image":
            query = f'<img class="q" src="{search["image"]}"> {query}'
        rows.append(f"<section><h3>{query}</h3><div class=grid>{cards}</div></section>")
    finalize = esc(json.dumps(result.finalize, indent=1, default=str))
    plot = Path(str(result.finalize.get("model", ""))) / "training-report" / "report.png"
    plot_html = (
        f'<img style="max-width:900px" src="data:image/png;base64,'
        f'{base64.b64encode(plot.read_bytes()).decode()}">'
        if plot.is_file()
        else ""
    )
    summary = esc(json.dumps(result.summary, indent=1, default=str))
    return f"""<!doctype html><meta charset=utf-8><title>flickd demo</title>
<style>body{{font:14px system-ui;margin:2em}}.grid{{display:flex;gap:8px;flex-wrap:wrap}}
figure{{margin:0;width:150px}}figure img{{width:150px;height:150px;object-fit:contain;
background:#f4f4f4}}img.q{{height:60px;vertical-align:middle}}.exact{{color:#070}}
.similar{{color:#a60}}.weak{{color:#888}}pre{{background:#f6f6f6;padding:8px}}</style>
<h1>flickd demo</h1><p>{result.seconds:.0f} s on this machine; offline models (random
weights, fine-tuned on this catalog).</p>
<h2>Ingest</h2><pre>{summary}</pre>
<h2>Fine-tuning (held-out retrieval before / after)</h2>{plot_html}<pre>{finalize}</pre>
<h2>Searches</h2>{"".join(rows)}"""
