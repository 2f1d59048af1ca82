"""The final task of a run: fine-tune CLIP when enough new crops arrived, re-embed the catalog
with a promoted model, and (re)build the FAISS index.

Exactly one ``finalize`` runs per ingest run: the worker whose conditional UPDATE closed the
run (db.runs.finish_run_if_complete) enqueues it. After a promotion the new model only becomes
the active embedder once every crop has an embedding under it and its index is built, so search
never mixes a new query encoder with an old index. Re-embedding is fanned out in batches on the
``gpu`` queue; the batch that embeds the last missing crop claims the pending index build.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from db.embeddings import insert_embeddings
from db.embeddings import missing_crop_ids as missing_crops
from db.runs import claim_finalize, touch_run
from db.schema import (
    Crop,
    FinalizeStatus,
    IndexBuild,
    IndexBuildStatus,
    IngestRun,
    ModelKind,
    ModelVersion,
    utcnow,
)
from db.session import session_scope
from db.versions import activate_embedder, active_embedder
from flickd.core.blobstore import BlobStore
from flickd.core.broker import EMBED_TASK, enqueue
from flickd.core.lease import heartbeat
from flickd.core.settings import Settings
from flickd.core.storage import MODELS, storage_for
from models import registry

if TYPE_CHECKING:
    from models.finetune import FinetuneResult

log = logging.getLogger(__name__)


@dataclass
class FinalizeOutcome:
    action: FinalizeStatus  # finetuned, reembedding, indexed or nothing
    detail: dict[str, object]


# --- deciding ----------------------------------------------------------------------------------
def crops_since_training(settings: Settings) -> int:
    """Crops added since the last fine-tuning run (all crops when none ran yet)."""
    with session_scope(settings) as session:
        total = session.scalar(select(func.count()).select_from(Crop)) or 0
        last = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.parent_id.is_not(None))
            .order_by(ModelVersion.id.desc())
        ).first()
    trained_on = int((last.metrics or {}).get("catalog_crops", 0)) if last else 0
    return max(0, total - trained_on)


def should_finetune(settings: Settings) -> bool:
    return (
        settings.finalize == "auto"
        and crops_since_training(settings) >= settings.finetune_min_new_crops
    )


# --- the steps ---------------------------------------------------------------------------------
def finetune_now(settings: Settings) -> FinetuneResult:
    """Fine-tune the active embedder on the catalog; record (not activate) the new version."""
    from models.finetune import PromotionRule, TrainConfig
    from workers.training import finetune_catalog

    with session_scope(settings) as session:
        base = active_embedder(session)
        base_name = base.name if base else settings.embedding_model
    config = TrainConfig(
        epochs=settings.train_epochs,
        batch_size=settings.train_batch_size,
        lr=settings.train_lr,
        weight_decay=settings.train_weight_decay,
        warmup_fraction=settings.train_warmup_fraction,
        grad_clip=settings.train_grad_clip,
        eval_fraction=settings.train_eval_fraction,
        seed=settings.train_seed,
    )
    key = f"{MODELS}/clip-{utcnow():%Y%m%d-%H%M%S}"
    out_dir = storage_for(settings).staging_dir(key, settings.data_dir / "scratch")
    return finetune_catalog(
        settings,
        base_name,
        out_dir,
        config,
        promote_if=PromotionRule(min_improvement=settings.promotion_min_improvement),
        activate=False,
        publish_as=key,
    )


def missing_crop_ids(settings: Settings, version_id: int, up_to: int | None = None) -> list[int]:
    """Crops with no embedding under ``version_id`` (only ids <= ``up_to`` when given)."""
    with session_scope(settings) as session:
        return missing_crops(session, version_id, up_to)


def start_reembed(version_id: int, settings: Settings) -> int:
    """Queue the embedding under ``version_id`` of every crop that lacks it; returns #queued.

    The crops to wait for are fixed now (ids up to the current maximum): crops that analysis
    adds meanwhile are embedded with the active model and caught up by the next finalize."""
    with session_scope(settings) as session:
        waiting = session.scalars(
            select(IndexBuild).where(
                IndexBuild.model_version_id == version_id,
                IndexBuild.status.in_([IndexBuildStatus.PENDING, IndexBuildStatus.BUILDING]),
            )
        ).first()
        if waiting is not None:
            # A final task that died after queueing the re-embedding, run again: the crops to
            # wait for were fixed then; send what is still missing, add no second build.
            up_to = (waiting.params or {}).get("up_to_crop_id")
            waiting.updated_at = utcnow()
        else:
            up_to = session.scalar(select(func.max(Crop.id))) or 0
            session.add(
                IndexBuild(
                    model_version_id=version_id,
                    status=IndexBuildStatus.PENDING.value,
                    n_vectors=0,
                    params={"up_to_crop_id": up_to},
                    updated_at=utcnow(),
                )
            )
    ids = missing_crop_ids(settings, version_id, up_to)
    if not ids:
        complete_reembed(version_id, settings)
        return 0
    enqueue(EMBED_TASK, ids, settings.reembed_batch_size, settings, extra_args=[version_id])
    return len(ids)


def embed_crops(crop_ids: list[int], version_id: int, settings: Settings) -> int:
    """Embed these crops with the model of ``version_id`` (idempotent); maybe finish."""
    from models.embedder import Embedder

    with session_scope(settings) as session:
        name = session.scalar(select(ModelVersion.name).where(ModelVersion.id == version_id))
        rows = session.execute(
            select(Crop.id, Crop.blob_key).where(Crop.id.in_(crop_ids)).order_by(Crop.id)
        ).all()
    embedder: Embedder = registry.get_embedder_by_name(str(name), settings)
    blobs = BlobStore.for_settings(settings)
    pixels = [PILImage.open(io.BytesIO(blobs.get(r.blob_key))).convert("RGB") for r in rows]
    vectors = embedder.embed_images(pixels) if pixels else np.zeros((0, embedder.dim), "f4")
    with session_scope(settings) as session:
        insert_embeddings(session.connection(), version_id, [r.id for r in rows], vectors)
        _touch_build(session, version_id, IndexBuildStatus.PENDING)  # progress: not stalled
    complete_reembed(version_id, settings)
    return len(rows)


def complete_reembed(version_id: int, settings: Settings) -> bool:
    """When no crop lacks an embedding under ``version_id``, exactly one caller claims the
    pending index build, builds the index and switches the active embedder."""
    with session_scope(settings) as session:
        pending = session.scalars(
            select(IndexBuild).where(
                IndexBuild.model_version_id == version_id,
                IndexBuild.status == IndexBuildStatus.PENDING,
            )
        ).first()
        up_to = (pending.params or {}).get("up_to_crop_id") if pending else None
    if pending is None or missing_crop_ids(settings, version_id, up_to):
        return False
    with session_scope(settings) as session:
        claimed = cast(
            "CursorResult[Any]",
            session.execute(
                update(IndexBuild)
                .where(
                    IndexBuild.model_version_id == version_id,
                    IndexBuild.status == IndexBuildStatus.PENDING,
                )
                .values(status=IndexBuildStatus.BUILDING.value, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            ),
        ).rowcount
    if not claimed:
        return False

    def renew() -> None:
        with session_scope(settings) as session:
            _touch_build(session, version_id, IndexBuildStatus.BUILDING)

    with heartbeat(settings.lease_seconds, renew, enabled=not settings.embedded):
        build_index(version_id, settings)
    with session_scope(settings) as session:
        activate_embedder(session, version_id)
        session.execute(
            update(IndexBuild)
            .where(
                IndexBuild.model_version_id == version_id,
                IndexBuild.status == IndexBuildStatus.BUILDING,
            )
            .values(status=IndexBuildStatus.READY.value, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    log.info("re-embedding done; embedder version %s active", version_id)
    return True


def _touch_build(session: Session, version_id: int, status: IndexBuildStatus) -> None:
    session.execute(
        update(IndexBuild)
        .where(IndexBuild.model_version_id == version_id, IndexBuild.status == status)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def build_index(version_id: int, settings: Settings) -> Path | str:
    from workers.indexing import build_from_database

    return build_from_database(settings, version_id)


def refresh_index(settings: Settings) -> Path | str | None:
    """Rebuild the index of the active embedder from the database. Crops that lack an
    embedding under it (added while a re-embedding ran) are embedded first, fanned out like a
    re-embedding; the index is then built by the batch that finishes them (returns None)."""
    with session_scope(settings) as session:
        version = active_embedder(session)
        version_id = version.id if version else None
    if version_id is None:
        return None
    if missing_crop_ids(settings, version_id):
        start_reembed(version_id, settings)
        return None
    return build_index(version_id, settings)


# --- the task body -----------------------------------------------------------------------------
def finalize_run(
    run_id: int | None, settings: Settings, *, claim: bool = False
) -> FinalizeOutcome | None:
    """What the final task does; ``run_id`` None means "by hand" (flickd finetune / index).

    The task claims the run's final task first (``claim``): of every delivery of it (a
    re-delivery, a reconciler's re-drive) exactly one runs it, and while it runs its heartbeat
    keeps the claim alive. A claim whose worker died expires after the lease and the reconciler
    sends the task again. Returns None when this delivery had nothing to do."""
    if claim and run_id is not None and not claim_finalize(settings, run_id):
        log.info("finalize run_id=%s already claimed or done: nothing to do", run_id)
        return None

    def renew() -> None:
        with session_scope(settings) as session:
            touch_run(session, run_id, FinalizeStatus.RUNNING)

    try:
        with heartbeat(
            settings.lease_seconds, renew, enabled=run_id is not None and not settings.embedded
        ):
            outcome = _finalize(settings)
    except Exception:
        _mark(run_id, FinalizeStatus.FAILED, settings)
        raise
    _mark(run_id, outcome.action, settings)
    log.info("finalize run_id=%s action=%s %s", run_id, outcome.action.value, outcome.detail)
    return outcome


def _finalize(settings: Settings) -> FinalizeOutcome:
    if settings.finalize == "off":
        return FinalizeOutcome(FinalizeStatus.NOTHING, {})
    if should_finetune(settings):
        result = finetune_now(settings)
        detail: dict[str, object] = {
            "version_id": result.version_id,
            "promoted": result.promoted,
            "score_before": result.score_before,
            "score_after": result.score_after,
        }
        if result.promoted:
            detail["reembedding"] = start_reembed(result.version_id, settings)
            return FinalizeOutcome(FinalizeStatus.FINETUNED, detail)
        path = refresh_index(settings)
        return FinalizeOutcome(FinalizeStatus.FINETUNED, {**detail, "index": str(path)})
    path = refresh_index(settings)
    if path is not None:
        return FinalizeOutcome(FinalizeStatus.INDEXED, {"index": str(path)})
    # No path: either nothing is analysed yet, or crops lacked embeddings under the active
    # model and a re-embedding was queued (the index is built when it finishes).
    with session_scope(settings) as session:
        pending = active_embedder(session) is not None
    return FinalizeOutcome(FinalizeStatus.REEMBEDDING if pending else FinalizeStatus.NOTHING, {})


def _mark(run_id: int | None, status: FinalizeStatus, settings: Settings) -> None:
    if run_id is None:
        return
    with session_scope(settings) as session:
        session.execute(
            update(IngestRun)
            .where(IngestRun.id == run_id)
            .values(finalize_status=status.value, finalized_at=utcnow(), updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
