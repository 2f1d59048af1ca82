"""One fine-tuning run, in steps: split, load, evaluate, train, evaluate, save, decide; then,
once the caller has recorded the new version, the report.

No database here: the caller passes the pairs in (workers/training.py reads them through
db/training.py) and records the returned :class:`FinetuneRun` (db/versions.py) before calling
:func:`finish`, because the report names the recorded version ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flickd.core.timing import StepClock
from models.device import autocast_dtype, select_device
from models.finetune.clip import Clip, LoadedEmbedder, load_clip, save_clip
from models.finetune.config import PromotionRule, TrainConfig
from models.finetune.data import Pair, split_by_product
from models.finetune.report import REPORT_DIR, write_report
from models.finetune.retrieval import evaluate_retrieval
from models.finetune.training import StepLog, train

log = logging.getLogger(__name__)

Metrics = dict[str, dict[str, Any]]

# The shape of the held-out text queries (models.finetune.data.Pair.query), as reports state it.
QUERY_FORM = "a/an {colour family} {garment}"
MAX_QUERY_EXAMPLES = 12


@dataclass
class FinetuneRun:
    """A trained, evaluated and saved model, not yet recorded in the database."""

    base_model: str
    base_version: str
    out_dir: Path
    version: str  # what ``Embedder(str(out_dir))`` computes
    device: str
    precision: str
    config: TrainConfig
    rule: PromotionRule
    catalog_crops: int
    split: dict[str, int]
    before: Metrics
    after: Metrics
    promoted: bool
    score_before: float
    score_after: float
    steps: StepLog
    timings: dict[str, float]
    eval_queries: list[str] = field(default_factory=list)  # the held-out text queries asked

    @property
    def promotion(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "score_before": _finite(self.score_before),
            "score_after": _finite(self.score_after),
            "rule": asdict(self.rule),
        }

    @property
    def metrics(self) -> dict[str, Any]:
        """What the new ``model_versions`` row keeps."""
        return {
            "before": self.before,
            "after": self.after,
            "base_model": self.base_model,
            "train_pairs": self.split["train_pairs"],
            "eval_pairs": self.split["eval_pairs"],
            "catalog_crops": self.catalog_crops,
            "text_queries": self.text_queries,
            **self.promotion,
        }

    @property
    def text_queries(self) -> dict[str, Any]:
        """What the text→image recall asked: the query form and a sample of the queries."""
        return {
            "form": QUERY_FORM,
            "count": len(self.eval_queries),
            "examples": self.eval_queries[:MAX_QUERY_EXAMPLES],
        }

    def report(self, version_id: int, parent_version_id: int) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "base_version": self.base_version,
            "out_dir": str(self.out_dir),
            "version": self.version,
            "version_id": version_id,
            "parent_version_id": parent_version_id,
            "device": self.device,
            "precision": self.precision,
            "config": asdict(self.config),
            "split": self.split,
            "text_queries": self.text_queries,
            "eval_before": self.before,
            "eval_after": self.after,
            "promotion": self.promotion,
            "training": {"steps": len(self.steps.losses), "epochs_run": self.steps.epochs_run,
                         "losses": self.steps.losses, "lrs": self.steps.lrs},
            "timings": self.timings,
        }  # fmt: skip


@dataclass
class FinetuneResult:
    out_dir: Path
    report_json: Path
    report_png: Path
    version_id: int  # the new model_versions row
    version: str
    parent_version_id: int
    promoted: bool
    before: Metrics
    after: Metrics
    score_before: float
    score_after: float
    train_pairs: int
    eval_pairs: int
    losses: list[float]


def finetune(
    base_model: str,
    out_dir: Path,
    config: TrainConfig,
    pairs: Iterable[Pair],
    *,
    device: str | None = None,
    promote_if: PromotionRule | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> FinetuneRun:
    """Fine-tune ``base_model`` (hub id or directory) on ``pairs``, evaluate it on held-out
    products before and after, save it to ``out_dir`` (loadable with ``Embedder(out_dir)``) and
    decide its promotion by ``promote_if``. ``device`` is a ``FLICKD_DEVICE`` setting (None:
    CUDA when present). ``progress(step, loss)`` is called after each optimiser step."""
    rule = promote_if or PromotionRule()
    out_dir = Path(out_dir)
    _check_out_dir(base_model, out_dir)
    clock = StepClock()
    with clock("load"):
        all_pairs = list(pairs)
        train_pairs, eval_pairs = split_by_product(all_pairs, config.eval_fraction, config.seed)
        clip = load_clip(base_model, select_device(device))
        clip.model.eval()
    with clock("eval_before"):
        before = _evaluate(clip, config, eval_pairs)
    with clock("train"):
        steps = _train_seeded(clip, train_pairs, config, progress)
    with clock("eval_after"):
        after = _evaluate(clip, config, eval_pairs)
    with clock("save"):
        version = save_clip(clip, out_dir)
    promoted, score_before, score_after = rule.decide(before, after)
    log.info(
        "fine-tune %s -> %s: score %.3f -> %.3f, %s",
        base_model, out_dir, score_before, score_after,
        "promoted" if promoted else "not promoted",
    )  # fmt: skip
    return FinetuneRun(
        base_model=base_model,
        base_version=clip.version,
        out_dir=out_dir,
        version=version,
        device=str(clip.device),
        precision=str(autocast_dtype(clip.device) or torch.float32).removeprefix("torch."),
        config=config,
        rule=rule,
        catalog_crops=len(all_pairs),
        split=_split_sizes(train_pairs, eval_pairs),
        before=before,
        after=after,
        promoted=promoted,
        score_before=score_before,
        score_after=score_after,
        steps=steps,
        timings={f"{step}_s": seconds for step, seconds in clock.seconds.items()},
        eval_queries=list(dict.fromkeys(p.query for p in eval_pairs)),
    )


def finish(run: FinetuneRun, version_id: int, parent_version_id: int) -> FinetuneResult:
    """Write ``out_dir/training-report/report.{json,png}`` for a run recorded as
    ``version_id`` (child of ``parent_version_id``)."""
    report_json, report_png = write_report(
        run.out_dir / REPORT_DIR, run.report(version_id, parent_version_id)
    )
    return FinetuneResult(
        out_dir=run.out_dir,
        report_json=report_json,
        report_png=report_png,
        version_id=version_id,
        version=run.version,
        parent_version_id=parent_version_id,
        promoted=run.promoted,
        before=run.before,
        after=run.after,
        score_before=run.score_before,
        score_after=run.score_after,
        train_pairs=run.split["train_pairs"],
        eval_pairs=run.split["eval_pairs"],
        losses=run.steps.losses,
    )


# --- steps ---------------------------------------------------------------------------------------
def _check_out_dir(base_model: str, out_dir: Path) -> None:
    """Saving over the base model's own directory would change the weights its version row (and
    every embedding made with it) stands for."""
    base = Path(base_model).expanduser()
    if base.is_dir() and out_dir.exists() and base.resolve() == out_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the base model's directory; pick a new one")


def _evaluate(clip: Clip, config: TrainConfig, eval_pairs: Sequence[Pair]) -> Metrics:
    return evaluate_retrieval(LoadedEmbedder(clip, config.eval_batch_size), eval_pairs)


def _train_seeded(
    clip: Clip,
    train_pairs: Sequence[Pair],
    config: TrainConfig,
    progress: Callable[[int, float], None] | None,
) -> StepLog:
    """Same seed, same batches and dropout masks: a re-run reproduces the run (on CPU bit for
    bit). The caller's random state is restored afterwards."""
    cuda = [clip.device.index or 0] if clip.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        return train(clip, train_pairs, config, progress)


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _split_sizes(train_pairs: Sequence[Pair], eval_pairs: Sequence[Pair]) -> dict[str, int]:
    return {
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "train_products": len({p.product_id for p in train_pairs}),
        "eval_products": len({p.product_id for p in eval_pairs}),
        "train_descriptions": len({p.description for p in train_pairs}),
        "eval_descriptions": len({p.description for p in eval_pairs}),
    }
