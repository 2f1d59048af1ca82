"""`flickd demo`: the whole system on the embedded default, in one command.

Generates the synthetic catalog, serves it on loopback, ingests it (download, analysis), lets the
final task fine-tune the offline CLIP and build the index, runs a few searches and writes an HTML
report of what it saw (flickd/cli/demo_report.py). Nothing leaves the machine and nothing is
downloaded from a model hub: the models are the project's offline builds (seeded random
weights), so the detector's boxes carry no meaning; the demo therefore runs with detection off
(each image is one whole-image crop labelled from the feed category) unless asked for the
detector. Its last lines are the commands that explore what it built.
"""

from __future__ import annotations

import base64
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from flickd.cli.demo_report import (
    RECALL_TARGET,
    TEXT_QUERIES,
    DemoResult,
    Truth,
    describe,
    hit_words,
    judge,
    recall,
    render,
    text_queries,
)
from flickd.core.logs import setup_logging
from flickd.core.settings import Settings

if TYPE_CHECKING:
    from models.build import Size
    from synthetic.catalog import Catalog

__all__ = ["TEXT_QUERIES", "DemoResult", "demo", "demo_settings", "register", "run_demo"]

API_PORT = 8000
DEMO_EPOCHS = 60  # see demo_settings


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
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=DEMO_EPOCHS,
    show_default=True,
    help="Fine-tuning epochs of the final task (fewer: faster, lower recall).",
)
def demo(out_dir: Path, products: int, detector: bool, epochs: int) -> None:
    """The whole pipeline on the embedded default with offline models, in one command."""
    # Only the demo's own lines: no library chatter, no broker warning (it runs in-process);
    # model loading hides its progress bars itself (models.loading.quiet_progress_bars).
    setup_logging("WARNING", embedded=True)
    out_dir = out_dir.absolute()
    click.echo(
        f"flickd demo: {products} synthetic products in {out_dir}, offline models with random "
        "weights (scores show the machinery, not the real models' quality)"
    )
    result = run_demo(out_dir, products=products, detector=detector, epochs=epochs)
    summary = result.summary
    states = ", ".join(f"{n} {state}" for state, n in result.image_states.items())
    click.echo(
        f"ingested {summary['accepted']} images of {products} products: "
        f"{states or summary['status']}"
    )
    if result.finalize:
        before = recall(result.finalize, "before", "text_to_image", 5)
        after = recall(result.finalize, "after", "text_to_image", 5)
        asked = result.finalize.get("after", {}).get("text_to_image", {})
        click.echo(
            f"fine-tuned CLIP: held-out text->image recall@5 {_round(before)} -> "
            f"{_round(after)} (target {RECALL_TARGET}; {asked.get('queries', '?')} queries "
            f"'a/an {{colour family}} {{garment}}' over {asked.get('gallery', '?')} crops of "
            f"unseen products), "
            f"{'promoted' if result.finalize.get('promoted') else 'not promoted'}"
        )
    click.echo(
        "searches, top hit RIGHT or WRONG by the catalog's ground truth "
        "(a text hit is right when its colour family and garment are the query's):"
    )
    for search in result.searches:
        hits = search["hits"]
        top = hits[0] if hits else None
        found = (
            f"{top['product_id']} {hit_words(top)}, {top['score']:.3f} {top['match']}"
            if top
            else "nothing"
        )
        mark = ("RIGHT" if top["right"] else "WRONG") if top else "     "
        tally = (
            f" {sum(h['right'] for h in hits)}/{len(hits)} right "
            f"({search.get('matching_products', '?')} in the catalog)"
            if search["kind"] == "text"
            else ""
        )
        click.echo(f"  {mark}{tally} {search['query']!r}: {found}")
    click.echo(f"report: {result.report}  ({result.seconds:.0f} s)")
    click.echo("")
    click.echo(
        f"explore what it built (the api serves the search page at "
        f"http://127.0.0.1:{API_PORT}/), from any directory:"
    )
    for line in result.explore:
        click.echo(line)


def register(main: click.Group) -> None:
    main.add_command(demo)


def demo_settings(
    out_dir: Path, models: dict[str, Path], detector: bool, epochs: int = DEMO_EPOCHS
) -> Settings:
    return Settings(
        data_dir=out_dir / "data",
        allowed_networks=["127.0.0.0/8"],
        detector_model=str(models["detector"]) if detector else "none",
        embedding_model=str(models["clip"]),
        device="cpu",
        finalize="auto",
        finetune_min_new_crops=1,
        # A randomly initialised tiny CLIP learns at rates a pretrained one would not survive,
        # and needs ~300 steps on the 100-product catalog to learn both colour and garment
        # words (8 epochs reached held-out recall@5 0.85 on 300 products, 60 reach 0.97).
        train_lr=1e-3,
        train_epochs=epochs,
        train_batch_size=32,
    )


def explore_commands(settings: Settings, text: str, product_id: str) -> list[str]:
    """Shell lines that search, show and serve what the demo built: one ``export`` of the
    settings search needs (absolute paths), then plain ``flickd`` commands."""
    env = {
        "FLICKD_DATA_DIR": str(Path(settings.data_dir).absolute()),
        "FLICKD_EMBEDDING_MODEL": _absolute_model(settings.embedding_model),
        "FLICKD_DETECTOR_MODEL": _absolute_model(settings.detector_model),
    }
    script = Path(os.path.abspath(sys.executable)).with_name("flickd")
    flickd = (
        [str(script)] if script.is_file() else [os.path.abspath(sys.executable), "-m", "flickd.cli"]
    )
    return [
        "export " + " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items()),
        shlex.join([*flickd, "search", "--text", text]),
        shlex.join([*flickd, "show", product_id]),
        shlex.join([*flickd, "api", "--port", str(API_PORT)]),
    ]


def run_demo(
    out_dir: Path,
    products: int = 100,
    seed: int = 11,
    detector: bool = False,
    epochs: int = DEMO_EPOCHS,
) -> DemoResult:
    from db.migrate import upgrade
    from flickd.services.search import SearchService
    from models.build import build_offline_models
    from producer.ingest import ingest
    from synthetic.catalog import generate_catalog, write_feed
    from synthetic.server import CatalogServer

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    models = _offline_models(out_dir / "models", build_offline_models)
    settings = demo_settings(out_dir, models, detector, epochs)
    upgrade(settings)
    mark = lap("offline models and database", started)
    catalog = generate_catalog(out_dir / "catalog", products, seed=seed, size="small")
    mark = lap("synthetic catalog", mark)
    with CatalogServer(catalog.images_dir) as server:
        feed = out_dir / "feed.csv"
        write_feed(catalog, feed, server.base_url)
        summary = ingest(feed, settings)
    mark = lap("ingest, analysis, fine-tuning and index", mark)
    finalize, finalize_status, image_states = _outcome(settings, summary.run_id)
    truth = _catalog_truth(catalog)
    service = SearchService(settings)
    searches = [_text_search(service, q) for q in text_queries(truth.values())]
    searches += [
        _image_search(service, catalog.image_path(img), img.product_id)
        for img in catalog.images[:: max(1, len(catalog.images) // 3)][:3]
    ]
    mark = lap("searches", mark)
    for search in searches:
        judge(search, truth)
        search["catalog_size"] = len(truth)
        if search["kind"] == "image":
            search["shows"] = describe(*truth[search["expected"]])
        for hit in search["hits"]:
            hit["thumb"] = _crop_uri(settings, hit["crop_id"])
    first = catalog.products[0]
    report = out_dir / "report.html"
    result = DemoResult(
        report=report,
        summary=summary.to_dict(),
        finalize=finalize,
        searches=searches,
        products=len(catalog.products),
        detector=detector,
        match_exact=settings.match_exact,
        match_similar=settings.match_similar,
        image_states=image_states,
        finalize_status=finalize_status,
        index=service.status(),
        timings=timings,
        explore=explore_commands(settings, describe(*truth[first.product_id]), first.product_id),
    )
    result.seconds = time.perf_counter() - started
    report.write_text(render(result), encoding="utf-8")
    return result


def _round(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def _absolute_model(ref: str) -> str:
    """A local model directory as an absolute path; a hub id or "none" as it is."""
    path = Path(ref)
    return str(path.absolute()) if ref != "none" and path.exists() else ref


def _offline_models(
    root: Path, build: Callable[[Path, Size, int], dict[str, Path]]
) -> dict[str, Path]:
    detector, clip = root / "detector", root / "clip"
    if (detector / "config.json").exists() and (clip / "config.json").exists():
        return {"detector": detector, "clip": clip}
    return build(root, "tiny", 0)


def _outcome(settings: Settings, run_id: int) -> tuple[dict[str, Any], str | None, dict[str, int]]:
    """The fine-tuned model's record, the run's final-task status and its images by state."""
    from sqlalchemy import func, select

    from db.schema import Image, IngestRun, ModelVersion
    from db.session import session_scope
    from models.registry import local_model

    with session_scope(settings) as session:
        tuned = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.parent_id.is_not(None))
            .order_by(ModelVersion.id.desc())
        ).first()
        finalize = (
            {
                "model": tuned.name,
                # A stored version (store:models/…) read through the local cache: the
                # training report's chart is one of its files.
                "model_dir": local_model(tuned.name, settings),
                "active": tuned.active,
                **(tuned.metrics or {}),
            }
            if tuned
            else {}
        )
        run = session.get(IngestRun, run_id)
        states = session.execute(
            select(Image.state, func.count()).where(Image.run_id == run_id).group_by(Image.state)
        ).all()
    return finalize, run.finalize_status if run else None, {s: int(n) for s, n in states}


def _catalog_truth(catalog: Catalog) -> dict[str, Truth]:
    """Each product's (category, colour family), as the synthetic catalog generated it."""
    return {p.product_id: (p.category, p.colour_family) for p in catalog.products}


def _hits(response: Any) -> list[dict[str, Any]]:
    hits = [hit.model_dump() for item in response.items for hit in item.results[:5]]
    for hit in hits:
        hit["match"] = str(getattr(hit["match"], "value", hit["match"]))
    return hits


def _text_search(service: Any, text: str) -> dict[str, Any]:
    response = service.search_text(text, top_k=5)
    return {"query": text, "kind": "text", "hits": _hits(response), "took_ms": response.took_ms}


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
        "took_ms": response.took_ms,
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
    return _data_uri(BlobStore.for_settings(settings).get(key))
