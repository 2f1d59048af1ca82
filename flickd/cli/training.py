"""The models and the index: ``finetune``, ``index build`` and ``models build``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import click

from flickd.cli.context import echo_json, needs_schema
from flickd.core.settings import Settings


@click.command()
@click.option("--json", "as_json", is_flag=True)
@needs_schema
def finetune(settings: Settings, as_json: bool) -> None:
    """Fine-tune CLIP on the catalog now; if it retrieves better, re-embed and re-index."""
    from workers.finalize import finetune_now, start_reembed

    result = finetune_now(settings)
    summary: dict[str, Any] = {
        "version_id": result.version_id,
        "promoted": result.promoted,
        "score_before": result.score_before,
        "score_after": result.score_after,
        "before": result.before,
        "after": result.after,
        "model_dir": str(result.out_dir),
        "report": str(result.report_png),
    }
    if result.promoted:
        summary["reembedding_crops"] = start_reembed(result.version_id, settings)
    if as_json:
        echo_json(summary)
        return
    click.echo(f"model version {result.version_id} in {result.out_dir}")
    for task in ("text_to_image", "image_to_image"):
        before, after = result.before.get(task, {}), result.after.get(task, {})
        click.echo(
            f"  {task:<15} recall@5 {before.get('recall@5', float('nan')):.3f} -> "
            f"{after.get('recall@5', float('nan')):.3f}"
        )
    if result.promoted:
        click.echo(
            f"promoted: re-embedding {summary['reembedding_crops']} crops, then the index "
            "switches to it"
        )
    else:
        click.echo("not promoted: retrieval did not improve enough; the active model stays")


@click.group()
def index() -> None:
    """The FAISS index."""


@index.command("build")
@needs_schema
def index_build(settings: Settings) -> None:
    """Build the index of the active embedder from the database and switch to it."""
    from db.session import session_scope
    from db.versions import active_embedder
    from workers.finalize import refresh_index

    with session_scope(settings) as session:
        if active_embedder(session) is None:
            raise click.ClickException("nothing to index yet: no image has been analysed")
    path = refresh_index(settings)
    if path is None:
        click.echo(
            "crops lack embeddings under the active model: re-embedding queued; the "
            "index is built when it finishes"
        )
    else:
        click.echo(f"index written: {path}")


@click.group()
def models() -> None:
    """ML models."""


@models.command("build")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--size", type=click.Choice(["tiny", "base"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def models_build(out_dir: Path, size: str, seed: int) -> None:
    """Build offline detector and CLIP models (seeded random weights) into OUT_DIR."""
    from models.build import Size, build_offline_models

    paths = build_offline_models(out_dir, cast(Size, size), seed)  # click.Choice: "tiny" or "base"
    click.echo(f"FLICKD_DETECTOR_MODEL={paths['detector']}")
    click.echo(f"FLICKD_EMBEDDING_MODEL={paths['clip']}")


def register(main: click.Group) -> None:
    for command in (finetune, index, models):
        main.add_command(command)
