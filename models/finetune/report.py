"""The training report: ``report.json`` and a plot of loss and recall before/after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.finetune.retrieval import IMAGE_TO_IMAGE, RECALL_KS, TEXT_TO_IMAGE

# The report lives in a sub-folder: ``fingerprint_dir`` hashes the model folder's top-level .json
# files, so a report.json beside config.json would change the version that ``Embedder`` computes.
REPORT_DIR = "training-report"


def plot_report(path: Path, report: dict[str, Any]) -> None:
    """Loss per step, and every recall before/after as paired bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure with an Agg canvas: no pyplot, so no global backend switch and no GUI.
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, bar_ax = figure.subplots(1, 2)
    losses = report["training"]["losses"]
    loss_ax.plot(range(1, len(losses) + 1), losses, lw=1)
    loss_ax.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    labels, before, after = [], [], []
    for task in (TEXT_TO_IMAGE, IMAGE_TO_IMAGE):
        for k in RECALL_KS:
            labels.append(f"{'t→i' if task == TEXT_TO_IMAGE else 'i→i'} R@{k}")
            before.append(report["eval_before"][task][f"recall@{k}"] or 0.0)
            after.append(report["eval_after"][task][f"recall@{k}"] or 0.0)
    x = np.arange(len(labels))
    bar_ax.bar(x - 0.2, before, 0.4, label="before")
    bar_ax.bar(x + 0.2, after, 0.4, label="after")
    bar_ax.set_xticks(x, labels, rotation=30)
    form = report.get("text_queries", {}).get("form")
    title = f"held-out retrieval (t→i queries: {form})" if form else "held-out retrieval"
    bar_ax.set(ylim=(0, 1), ylabel="recall", title=title)
    bar_ax.legend()
    promoted = "promoted" if report["promotion"]["promoted"] else "not promoted"
    figure.suptitle(f"{report['base_model']} → {report['out_dir']} ({promoted})", fontsize=9)
    figure.savefig(path, dpi=100)


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_report(report_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    report_json, report_png = report_dir / "report.json", report_dir / "report.png"
    report_json.write_text(json.dumps(report, indent=2, default=_json_default))
    plot_report(report_png, report)
    return report_json, report_png
