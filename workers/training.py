"""Fine-tune CLIP on the catalog: read the training pairs (db/), train, evaluate and save the
model (models/finetune), publish it to the storage, record the new version (db/), then write
the run's report."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from db.training import training_crops
from db.versions import record_model_version
from flickd.core.blobstore import BlobStore
from flickd.core.settings import Settings
from flickd.core.storage import STORE_PREFIX, storage_for
from models import registry
from models.finetune import FinetuneResult, Pair, PromotionRule, TrainConfig, finetune, finish
from models.loading import fingerprint_dir


def load_pairs(settings: Settings, model_version_id: int | None = None) -> list[Pair]:
    """Every crop of an analysed image that has a prompt and a stored crop JPEG, in crop order,
    as training pairs that read their pixels from the blob store. With ``model_version_id``,
    only crops embedded by that model version."""
    blobs = BlobStore.for_settings(settings)
    return [
        Pair(
            c.crop_id,
            c.product_id,
            c.blob_key,
            c.prompt,
            c.colour_name,
            c.fine_label,
            blobs,
            c.colour_family,
        )
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
    publish_as: str | None = None,
) -> FinetuneResult:
    """Fine-tune ``base_model`` (hub id, directory or stored version) on the catalog, evaluate
    it on held-out products before and after, save it to ``out_dir`` (loadable with
    ``Embedder(out_dir)``), record it (and maybe promote it), and write
    ``out_dir/training-report/report.{json,png}``.

    ``pairs`` overrides :func:`load_pairs` (all analysed crops). ``progress(step, loss)`` is
    called after each optimiser step. ``activate=False`` records a promoted version without
    making it the active embedder yet (the final task activates it once the catalog has been
    re-embedded and its index built). ``publish_as`` (a storage key) publishes the model
    directory to the storage and records it as ``store:<key>``, which every process loads
    through its own cache; a scratch ``out_dir`` is then removed.
    """
    base_files = registry.local_model(base_model, settings)
    run = finetune(
        base_files,
        out_dir,
        config,
        list(pairs) if pairs is not None else load_pairs(settings),
        device=settings.device,
        promote_if=promote_if,
        progress=progress,
    )
    run = dataclasses.replace(
        run, base_model=base_model, base_version=_renamed(run.base_version, base_files, base_model)
    )
    name = str(run.out_dir)
    if publish_as is not None:
        name = STORE_PREFIX + publish_as
        # What Embedder(name, files=<a copy>) computes: the name and the files' fingerprint.
        run = dataclasses.replace(run, version=f"{name}@{fingerprint_dir(run.out_dir)[:12]}")
    version_id, parent_id = record_model_version(
        settings,
        name=name,
        version=run.version,
        parent_name=run.base_model,
        parent_version=run.base_version,
        metrics=run.metrics,
        promoted=run.promoted,
        activate=activate,
    )
    result = finish(run, version_id, parent_id)
    if publish_as is not None:
        storage = storage_for(settings)
        storage.publish_dir(publish_as, run.out_dir)
        if storage.local_dir is None:
            shutil.rmtree(run.out_dir, ignore_errors=True)
    return result


def _renamed(version: str, loaded_from: str, name: str) -> str:
    """A version string computed from a local copy, under the name the copy stands for."""
    prefix = f"{loaded_from}@"
    return f"{name}@{version.removeprefix(prefix)}" if version.startswith(prefix) else version
