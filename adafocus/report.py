"""Per-class report of a prediction file: ``python -m adafocus.report predictions=FILE [top_k=20]``.

From the final-step logits of a prediction file (:mod:`adafocus.predictions`), with torchmetrics:

- per class: the videos whose first label it is, top-1 accuracy on them (``MulticlassAccuracy``,
  ``average=None``; the first label is what top-1 is scored against, SPEC §4) and, for a multi-label dataset
  (metric ``map``), average precision of the softmax scores (``MultilabelAveragePrecision``, ``average=None``)
  and the class's positive videos; a class without videos has no defined value (empty in the CSV);
- the confusion matrix of top-1 prediction vs first label (``MulticlassConfusionMatrix``) and its largest
  off-diagonal entries, the most confused (true, predicted) class pairs.

Writes ``per_class.csv``, ``confused_pairs.csv`` and ``confusion.png`` (row-normalised; when C > ``top_k``,
the ``top_k`` classes with the most errors, as true or predicted class) in the run directory, and prints the
worst classes and the most confused pairs. ``log_class_report`` logs the same table and picture to W&B
(``evaluate.py`` with ``logger=wandb``). Class names come from the dataset's class index named in the file's
stored config (``data.data_dir`` / ``data.class_index``) or ``class_index=FILE``; else "class k".
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MultilabelAveragePrecision,
)

from adafocus.data import read_class_index
from adafocus.fileio import atomic_path
from adafocus.metrics import multi_hot
from adafocus.predictions import load_predictions
from adafocus.tasks.common import user_errors


@dataclass
class ClassReport:
    """Per-class numbers of one prediction set (percent; NaN where a class has no video to score)."""

    names: list[str]
    metric: str  # "map" (multi-label) or "top1"
    videos: torch.Tensor  # long [C] videos whose first label is the class
    accuracy: torch.Tensor  # float [C] top-1 accuracy on those videos (%)
    positives: torch.Tensor | None  # long [C] videos having the class among their labels (multi-label)
    ap: torch.Tensor | None  # float [C] average precision (%) (multi-label)
    confusion: torch.Tensor  # long [C, C] rows: first label, columns: top-1 prediction

    def columns(self) -> list[str]:
        extra = ["positives", "ap"] if self.ap is not None else []
        return ["index", "class", "videos", "accuracy", *extra, "most_confused_with", "confused_videos"]

    def rows(self) -> list[list]:
        """One row per class (see :meth:`columns`); NaN values as None."""
        off = self.confusion.clone().fill_diagonal_(0)  # (C, C) errors only
        count, other = off.max(dim=1)  # (C,), (C,)
        out = []
        for c, name in enumerate(self.names):
            row = [c, name, int(self.videos[c]), _value(self.accuracy[c])]
            if self.ap is not None:
                row += [int(self.positives[c]), _value(self.ap[c])]
            confused = int(count[c]) > 0
            row += [self.names[int(other[c])] if confused else "", int(count[c])]
            out.append(row)
        return out

    def confused_pairs(self, n: int) -> list[tuple[str, str, int, float]]:
        """The ``n`` largest off-diagonal entries: (true class, predicted class, videos, % of true class)."""
        off = self.confusion.clone().fill_diagonal_(0).flatten()  # (C*C,)
        counts, flat = off.sort(descending=True, stable=True)
        c = len(self.names)
        pairs = []
        for count, i in zip(counts[:n].tolist(), flat[:n].tolist(), strict=True):
            if count == 0:
                break
            true, pred = divmod(i, c)
            pairs.append((self.names[true], self.names[pred], count, 100 * count / int(self.videos[true])))
        return pairs


def _value(x: torch.Tensor) -> float | None:
    return None if math.isnan(float(x)) else float(x)


def class_report(preds: dict, names: list[str] | None = None) -> ClassReport:
    """The report of a validated prediction dict (``logits [N, T, C]``, ``labels [N, L]``, ``metric``)."""
    logits, labels = preds["logits"][:, -1], preds["labels"]  # (N, C), (N, L)
    c = logits.shape[1]
    names = names if names is not None else [f"class {k}" for k in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for predictions of {c} classes")
    first = labels[:, 0]  # (N,)
    videos = torch.bincount(first, minlength=c)
    accuracy = 100 * MulticlassAccuracy(c, average=None)(logits, first)  # (C,)
    accuracy[videos == 0] = math.nan
    confusion = MulticlassConfusionMatrix(c)(logits.argmax(-1), first)  # (C, C)
    positives = ap = None
    if preds["metric"] == "map":
        target = multi_hot(labels, c)  # (N, C)
        positives = target.sum(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No positive samples")
            ap = 100 * MultilabelAveragePrecision(c, average=None, thresholds=None)(
                logits.softmax(-1), target
            )
        ap[positives == 0] = math.nan
    return ClassReport(names, preds["metric"], videos, accuracy, positives, ap, confusion)


def write_csv(path: str | os.PathLike, header: list[str], rows: list[list]) -> Path:
    """A CSV file (None as empty), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in row])
    return Path(path)


def shown_classes(report: ClassReport, top_k: int) -> list[int]:
    """All classes when C <= top_k, else the top_k with the most errors (as true or predicted class)."""
    c = len(report.names)
    if c <= top_k:
        return list(range(c))
    off = report.confusion.clone().fill_diagonal_(0)
    errors = off.sum(0) + off.sum(1)  # (C,)
    return sorted(errors.argsort(descending=True, stable=True)[:top_k].tolist())


def confusion_figure(report: ClassReport, top_k: int = 20):
    """matplotlib Figure (Agg canvas): row-normalised confusion matrix of the shown classes, with counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keep = shown_classes(report, top_k)
    matrix = report.confusion[keep][:, keep].float()  # (K, K)
    rows = report.videos[keep].clamp(min=1).float().unsqueeze(1)  # (K, 1) all of the true class's videos
    k = len(keep)
    side = max(5.0, 0.42 * k + 2.5)
    fig = Figure(figsize=(side + 1, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow((matrix / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's videos")
    labels = [report.names[i] for i in keep]
    ax.set_xticks(range(k), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("true (first label)")
    for i in range(k):
        for j in range(k):
            count = int(matrix[i, j])
            if count:
                dark = float(matrix[i, j] / rows[i]) > 0.5
                ax.text(
                    j, i, str(count), ha="center", va="center", fontsize=7, color="white" if dark else "black"
                )
    c = len(report.names)
    which = f"all {c} classes" if k == c else f"the {k} of {c} classes with the most errors"
    ax.set_title(f"Confusion matrix, {which}", fontsize=10)
    fig.tight_layout()
    return fig


def save_confusion_png(report: ClassReport, path: str | os.PathLike, top_k: int = 20) -> Path:
    fig = confusion_figure(report, top_k)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def log_class_report(run, report: ClassReport, png: str | os.PathLike | None = None, prefix: str = "report"):
    """Log the per-class table (and the confusion PNG) to a W&B run (``WandbLogger.experiment``)."""
    import wandb

    logged = {f"{prefix}/per_class": wandb.Table(columns=report.columns(), data=report.rows())}
    if png is not None:
        logged[f"{prefix}/confusion"] = wandb.Image(str(png))
    run.log(logged)


def _class_names(cfg: DictConfig, preds: dict) -> tuple[list[str] | None, Path | None]:
    """Names from ``class_index=FILE`` or the class index the file's config names (if it exists)."""
    if cfg.get("class_index"):
        path = Path(cfg.class_index)
    else:
        data = preds["config"].get("data") or {}
        if not data.get("data_dir") or not data.get("class_index"):
            return None, None
        path = Path(data["data_dir"]) / data["class_index"]
        if not path.is_file():
            return None, None
    return read_class_index(path, preds["num_classes"]), path


def run_report(cfg: DictConfig) -> dict:
    """Entry point: load, compute, write the CSVs and the PNG, print a summary."""
    if not cfg.get("predictions"):
        raise ValueError("predictions=FILE is required (evaluate.py predictions_out=FILE writes one)")
    top_k, num_pairs = int(cfg.top_k), int(cfg.pairs)
    if top_k < 2 or num_pairs < 1:
        raise ValueError(f"top_k={top_k} must be >= 2 and pairs={num_pairs} >= 1")
    preds = load_predictions(cfg.predictions)
    names, index_file = _class_names(cfg, preds)
    report = class_report(preds, names)
    out = Path(cfg.output_dir)
    per_class = write_csv(out / "per_class.csv", report.columns(), report.rows())
    pairs = report.confused_pairs(num_pairs)
    pairs_csv = write_csv(out / "confused_pairs.csv", ["true", "predicted", "videos", "share_of_true"], pairs)
    png = save_confusion_png(report, out / "confusion.png", top_k)

    console = Console()
    value = report.ap if report.ap is not None else report.accuracy
    name = "AP (%)" if report.ap is not None else "accuracy (%)"
    scored = [i for i in value.argsort().tolist() if not math.isnan(float(value[i]))]
    worst = Table(
        title=f"{cfg.predictions}: the {min(num_pairs, len(scored))} classes with the lowest {name}"
    )
    for column in ("class", "videos", name):
        worst.add_column(column, justify="left" if column == "class" else "right")
    for i in scored[:num_pairs]:
        worst.add_row(report.names[i], str(int(report.videos[i])), f"{float(value[i]):.2f}")
    console.print(worst)
    confused = Table(title="Most confused pairs (true -> predicted top-1)")
    for column in ("true", "predicted", "videos", "% of true"):
        confused.add_column(column, justify="left" if column in ("true", "predicted") else "right")
    for true, pred, count, share in pairs:
        confused.add_row(true, pred, str(count), f"{share:.1f}")
    console.print(confused)
    where = f"names from {index_file}" if index_file else "no class index found: class k"
    print(
        f"{cfg.predictions}: {len(report.names)} classes ({where}), {int(report.videos.sum())} videos",
        flush=True,
    )
    print(f"wrote {per_class}, {pairs_csv} and {png}", flush=True)  # plain lines: paths are never cut
    return {"per_class": str(per_class), "confused_pairs": str(pairs_csv), "confusion": str(png)}


@hydra.main(config_path="../conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_report(cfg)


if __name__ == "__main__":
    main()
