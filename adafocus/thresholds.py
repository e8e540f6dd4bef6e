"""The early-exit thresholds file: per budget p, the calibrated thresholds η [T] that stop a stream (SPEC §5).

``early_exit.py`` writes it (:func:`write_thresholds` from an :class:`~adafocus.early_exit.EarlyExitResult`);
the demo and streaming code read it (:func:`read_thresholds`) and stop a video at the first step t with
confidence ``c_t >= η_t`` (:meth:`BudgetThresholds.exits`) — the rule of the offline evaluation,
:func:`adafocus.early_exit.exit_steps`. JSON, one object::

    {"format": "adafocus-early-exit-thresholds", "version": 1,
     "criterion": "softmax" | "max_logit",      the confidence the thresholds apply to
     "num_steps": T, "num_classes": C,          of the model the thresholds were calibrated for
     "gflops_per_video": G,                     all T steps (GMACs); exiting after step t costs t·G/T
     "metric_name": "top1" | "map", "no_exit_metric": m, "dataset": str,
     "budgets": [{"p": 0.5, "thresholds": [η_1, ..., η_T],
                  "gflops": mean GFLOPs/video, "metric": m_p}, ...]}   (evaluation-set results per p)

A threshold is a number, or the string ``"inf"`` (no video exits at that step) or ``"-inf"`` (the last step:
every video still running exits) — JSON has no infinities. Numbers are the float32 values exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adafocus.early_exit import CRITERIA, EarlyExitResult, confidences
from adafocus.fileio import atomic_write_text

FORMAT = "adafocus-early-exit-thresholds"
VERSION = 1


class ThresholdsFileError(ValueError):
    """A thresholds file that cannot be read or does not have the documented layout; names the file."""


@dataclass(frozen=True)
class BudgetThresholds:
    """The thresholds of one budget p and what it costs."""

    p: float
    eta: torch.Tensor  # float32 [T]
    criterion: str
    gflops_per_video: float  # all T steps
    gflops: float  # mean GFLOPs / video on the evaluation set at this budget
    metric: float  # the dataset's metric on the evaluation set at this budget

    def exits(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Whether each video stops after 0-based ``step``: logits [B, C] of that step -> bool [B]."""
        conf = confidences(logits.detach().cpu().unsqueeze(1), self.criterion)[:, 0]  # (B,)
        return conf >= self.eta[step]


@dataclass(frozen=True)
class Thresholds:
    """A thresholds file as read: the model it fits and every budget's thresholds."""

    path: str
    criterion: str
    num_steps: int
    num_classes: int
    gflops_per_video: float
    metric_name: str
    no_exit_metric: float
    dataset: str
    budgets: tuple[BudgetThresholds, ...]

    def budget(self, p: float | None = None) -> BudgetThresholds:
        """The thresholds of budget ``p``; None: the only budget of a one-budget file."""
        listing = ", ".join(
            f"p={b.p:g} ({b.gflops:.4g} GFLOPs, {self.metric_name} {b.metric:.2f})" for b in self.budgets
        )
        if p is None:
            if len(self.budgets) == 1:
                return self.budgets[0]
            raise ThresholdsFileError(f"{self.path} holds {len(self.budgets)} budgets; choose one: {listing}")
        for b in self.budgets:
            if math.isclose(b.p, float(p), rel_tol=1e-9, abs_tol=1e-12):
                return b
        raise ThresholdsFileError(f"{self.path}: no budget p={p:g}; the file holds {listing}")

    def check_model(self, num_steps: int, num_classes: int, what: str = "the model") -> None:
        """Raise when the file was calibrated for another T or C than ``what`` has."""
        if (num_steps, num_classes) != (self.num_steps, self.num_classes):
            raise ThresholdsFileError(
                f"{self.path} was calibrated for T={self.num_steps} steps and C={self.num_classes} classes "
                f"but {what} has T={num_steps}, C={num_classes}"
            )


def _encode(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def thresholds_dict(result: EarlyExitResult, num_classes: int, dataset: str) -> dict:
    """The file's JSON object for a budget sweep (``early_exit_sweep``'s result) of a C-class model."""
    eta = result.thresholds  # (P, T)
    return {
        "format": FORMAT,
        "version": VERSION,
        "criterion": result.criterion,
        "num_steps": int(eta.shape[1]),
        "num_classes": int(num_classes),
        "gflops_per_video": float(result.full_gflops),
        "metric_name": result.metric_name,
        "no_exit_metric": float(result.full_metric),
        "dataset": str(dataset),
        "budgets": [
            {"p": p, "thresholds": [_encode(v) for v in eta[i].tolist()], "gflops": g, "metric": m}
            for i, (p, g, m) in enumerate(result.rows())
        ],
    }


def write_thresholds(
    path: str | os.PathLike, result: EarlyExitResult, num_classes: int, dataset: str
) -> Path:
    """Validate and write the thresholds of ``result`` to ``path`` (JSON, atomically); returns the path."""
    data = thresholds_dict(result, num_classes, dataset)
    parse_thresholds(data, f"thresholds to write to {path}")  # never write a file that cannot be read back
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_thresholds(
    path: str | os.PathLike, num_steps: int | None = None, num_classes: int | None = None
) -> Thresholds:
    """Read and validate a thresholds file; ``num_steps`` / ``num_classes``: the model's, checked if given."""
    path = Path(path)
    if not path.is_file():
        raise ThresholdsFileError(f"{path}: thresholds file not found (early_exit.py writes thresholds.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ThresholdsFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ThresholdsFileError(f"{path}: cannot be read: {e}") from e
    out = parse_thresholds(data, str(path))
    if num_steps is not None and num_classes is not None:
        out.check_model(num_steps, num_classes)
    return out


def _number(value, where: str, allow_inf: bool = False) -> float:
    if isinstance(value, str) and allow_inf and value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        extra = ', "inf" or "-inf"' if allow_inf else ""
        raise ThresholdsFileError(f"{where}: expected a finite number{extra}, got {value!r}")
    return float(value)


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ThresholdsFileError(f"{where}: expected an integer >= 1, got {value!r}")
    return value


def parse_thresholds(data, source: str) -> Thresholds:
    """Validate a thresholds JSON object (``source`` names the file in the messages)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ThresholdsFileError(f'{source}: not an early-exit thresholds file (no "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise ThresholdsFileError(f"{source}: version {data.get('version')!r}, this code reads {VERSION}")
    keys = ("criterion", "num_steps", "num_classes", "gflops_per_video", "metric_name", "no_exit_metric")
    missing = [k for k in (*keys, "dataset", "budgets") if k not in data]
    if missing:
        raise ThresholdsFileError(f"{source}: missing key(s) {missing}")
    criterion = data["criterion"]
    if criterion not in CRITERIA:
        raise ThresholdsFileError(f"{source}: criterion {criterion!r}, expected one of {list(CRITERIA)}")
    t = _count(data["num_steps"], f"{source}: num_steps")
    c = _count(data["num_classes"], f"{source}: num_classes")
    full = _number(data["gflops_per_video"], f"{source}: gflops_per_video")
    if not full > 0:
        raise ThresholdsFileError(f"{source}: gflops_per_video must be > 0, got {full}")
    budgets = data["budgets"]
    if not isinstance(budgets, list) or not budgets:
        raise ThresholdsFileError(f"{source}: 'budgets' must be a non-empty list")
    parsed, seen = [], set()
    for i, entry in enumerate(budgets):
        where = f"{source}: budgets[{i}]"
        if not isinstance(entry, dict) or {"p", "thresholds", "gflops", "metric"} - set(entry):
            raise ThresholdsFileError(f"{where}: expected an object with p, thresholds, gflops, metric")
        p = _number(entry["p"], f"{where}.p")
        if not p > 0 or p in seen:
            raise ThresholdsFileError(f"{where}.p: {p} must be > 0 and appear once")
        seen.add(p)
        eta = entry["thresholds"]
        if not isinstance(eta, list) or len(eta) != t:
            raise ThresholdsFileError(f"{where}.thresholds: expected a list of num_steps={t} values")
        values = [_number(v, f"{where}.thresholds[{k}]", allow_inf=True) for k, v in enumerate(eta)]
        if values[-1] != -math.inf:
            raise ThresholdsFileError(f'{where}.thresholds: the last must be "-inf" (every video stops at T)')
        parsed.append(
            BudgetThresholds(
                p=p,
                eta=torch.tensor(values, dtype=torch.float32),
                criterion=criterion,
                gflops_per_video=full,
                gflops=_number(entry["gflops"], f"{where}.gflops"),
                metric=_number(entry["metric"], f"{where}.metric"),
            )
        )
    return Thresholds(
        path=source,
        criterion=criterion,
        num_steps=t,
        num_classes=c,
        gflops_per_video=full,
        metric_name=str(data["metric_name"]),
        no_exit_metric=_number(data["no_exit_metric"], f"{source}: no_exit_metric"),
        dataset=str(data["dataset"]),
        budgets=tuple(parsed),
    )
