"""Video-level metrics of SPEC §4 on torchmetrics: top-1 / top-5 accuracy and mAP."""

from __future__ import annotations

import warnings

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision


def multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels [N, L]`` (-1 padded) -> ``[N, C]`` long multi-hot."""
    out = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.long, device=labels.device)
    out.scatter_(1, torch.where(labels < 0, num_classes, labels), 1)
    return out[:, :num_classes]


class MeanAveragePrecision(Metric):
    """mAP over classes of softmax scores against multi-hot truth (non-interpolated AP, SPEC §4).

    A class with no positive video has no defined AP: it is left out of the mean (the original counts it as
    0), and ``num_excluded`` says how many were. Values in percent.
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.per_class = MultilabelAveragePrecision(num_labels=num_classes, average="none", thresholds=None)
        self.add_state("positives", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.num_excluded = 0

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        target = multi_hot(labels, self.num_classes)
        self.per_class.update(scores, target)
        self.positives += target.sum(0)

    def compute(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No positive samples")
            ap = self.per_class.compute()
        present = self.positives > 0
        self.num_excluded = int((~present).sum())
        return 100 * ap[present].mean()

    def reset(self) -> None:
        super().reset()
        self.per_class.reset()


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """mAP (percent) of ``scores [N, C]`` against ``labels [N, L]`` (-1 padded); and the classes left out."""
    metric = MeanAveragePrecision(scores.shape[-1])
    metric.update(scores, labels)
    return float(metric.compute()), metric.num_excluded


class VideoMetrics(MetricCollection):
    """One stage's metrics from final-step logits: ``top1``, ``top5`` (percent) and, multi-label, ``map``.

    ``update(logits [N, C], labels [N, L])``: accuracy counts a prediction right when it is one of the video's
    labels' first (the label the lists give first), as the original evaluates single-label accuracy.
    """

    def __init__(self, num_classes: int, multilabel: bool):
        metrics: dict[str, Metric] = {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
        if multilabel:
            metrics["map"] = MeanAveragePrecision(num_classes)
        super().__init__(metrics, compute_groups=False)
        self.multilabel = multilabel

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        for name, metric in self.items(keep_base=True):
            if name == "map":
                metric.update(logits.softmax(-1), labels)
            else:
                metric.update(logits, labels[:, 0])

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out = {}
        for name, metric in self.items(keep_base=True):
            value = metric.compute()
            out[name] = value if name == "map" else 100 * value
        return out
