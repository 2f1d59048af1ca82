"""Fine-tune CLIP on the catalog: read the training pairs (db/), train, evaluate and save the
model (models/finetune), record the new version (db/), then write the run's report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from db.training import training_crops
from db.versions import record_model_version
from flickd.core.settings import Settings
from models.finetune import FinetuneResult, Pair, PromotionRule, TrainConfig, finetune, finish


def load_pairs(settings: Settings, model_version_id: int | None = None) -> list[Pair]:
    """Every crop of an analysed image that has a prompt and a stored crop JPEG, in crop order,
    as training pairs that read their pixels from the blob store. With ``model_version_id``,
    only crops embedded by that model version."""
    blob_dir = Path(settings.blob_dir)
    return [
        Pair(c.crop_id, c.product_id, c.blob_key, c.prompt, c.colour_name, c.fine_label, blob_dir)
        for c in training_crops(settings, model_version_id)
    ]


def finetune_catalog(
    settings: Settings,
    base_model: str,
    out_dir: Path,
    config: TrainConfig,
    *,
    promote_if: PromotionRule | None = None,
    pairs: Sequence[Pair] | None = None,
    progress: Callable[[int, float], None] | None = None,
    activate: bool = True,
) -> FinetuneResult:
    """Fine-tune ``base_model`` (hub id or directory) on the catalog, evaluate it on held-out
    products before and after, save it to ``out_dir`` (loadable with ``Embedder(out_dir)``),
    record it (and maybe promote it), and write ``out_dir/training-report/report.{json,png}``.

    ``pairs`` overrides :func:`load_pairs` (all analysed crops). ``progress(step, loss)`` is
    called after each optimiser step. ``activate=False`` records a promoted version without
    making it the active embedder yet (the final task activates it once the catalog has been
    re-embedded and its index built).
    """
    run = finetune(
        base_model,
        out_dir,
        config,
        list(pairs) if pairs is not None else load_pairs(settings),
        device=settings.device,
        promote_if=promote_if,
        progress=progress,
    )
    version_id, parent_id = record_model_version(
        settings,
        name=str(run.out_dir),
        version=run.version,
        parent_name=run.base_model,
        parent_version=run.base_version,
        metrics=run.metrics,
        promoted=run.promoted,
        activate=activate,
    )
    return finish(run, version_id, parent_id)
