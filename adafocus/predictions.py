"""Prediction files: every step's logits of a set of videos, saved once and reused by early exit.

Layout (a plain dict, loadable with ``torch.load(..., weights_only=True)``)::

    {"logits": float32 [N, T, C]     every step's classifier logits, processing order
     "labels": long [N, L]           all labels of each video, padded with -1
     "paths": list[str]              N video paths
     "gflops_per_video": float       cost of the full T-step model (GMACs per video)
     "num_classes": int              C
     "metric": "map" | "top1"        the dataset's metric
     "dataset": str                  dataset name
     "config": dict                  the resolved config as plain containers}

``save_predictions`` validates and writes atomically (temp name + os.replace); ``load_predictions``
validates and names the file and the field that is wrong; ``check_compatible`` checks that a
calibration file and an evaluation file can be used together (same T and C).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback

from adafocus.fileio import atomic_path

METRICS = ("map", "top1")
REQUIRED_KEYS = (
    "logits",
    "labels",
    "paths",
    "gflops_per_video",
    "num_classes",
    "metric",
    "dataset",
    "config",
)


class PredictionFileError(ValueError):
    """A prediction file (or in-memory prediction dict) that does not have the documented layout."""


def _plain(obj: Any) -> Any:
    """Convert OmegaConf containers (and tuples) to plain dict/list so weights_only loading accepts them."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            try:
                return OmegaConf.to_container(obj, resolve=True)
            except Exception:  # interpolations such as ${hydra:...} outside a Hydra run
                return OmegaConf.to_container(obj, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def validate_predictions(
    preds: Any, source: str, num_classes: int | None = None, metric: str | None = None
) -> dict:
    """Check ``preds`` against the layout; return it with ``logits`` float32 and ``labels`` long on CPU.

    ``source`` names the file in the messages. ``num_classes`` / ``metric``: expected values (e.g. from the
    dataset config); None = not checked.
    """
    if not isinstance(preds, dict):
        raise PredictionFileError(f"{source}: expected a dict of predictions, got {type(preds).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in preds]
    if missing:
        raise PredictionFileError(
            f"{source}: missing key(s) {missing}; a prediction file has keys {list(REQUIRED_KEYS)}"
        )
    logits = preds["logits"]
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise PredictionFileError(
            f"{source}: 'logits' must be a float tensor [N, T, C], got {_describe(logits)}"
        )
    if logits.dim() != 3 or min(logits.shape) < 1:
        raise PredictionFileError(
            f"{source}: 'logits' has shape {list(logits.shape)}, expected [N, T, C] "
            "(videos, steps, classes) with every size >= 1"
        )
    n, t, c = logits.shape
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(dim=(1, 2)).sum())
        raise PredictionFileError(f"{source}: 'logits' has non-finite values (in {bad} of {n} videos)")
    labels = preds["labels"]
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise PredictionFileError(
            f"{source}: 'labels' must be an integer tensor [N, L], got {_describe(labels)}"
        )
    if labels.dim() != 2 or labels.shape[0] != n or labels.shape[1] < 1:
        raise PredictionFileError(
            f"{source}: 'labels' has shape {list(labels.shape)}, expected [N, L] with N = {n} "
            "(the number of videos in 'logits') and L >= 1"
        )
    file_c = preds["num_classes"]
    if isinstance(file_c, bool) or not isinstance(file_c, int) or file_c != c:
        raise PredictionFileError(
            f"{source}: 'num_classes' is {file_c!r} but 'logits' has C = {c} classes "
            f"(shape {list(logits.shape)})"
        )
    if num_classes is not None and c != num_classes:
        raise PredictionFileError(
            f"{source}: has {c} classes, but the dataset config expects {num_classes} (dataset.num_classes); "
            "the file belongs to another dataset or model"
        )
    if labels.numel() and (int(labels.max()) >= c or int(labels.min()) < -1):
        raise PredictionFileError(
            f"{source}: 'labels' values must be in [0, {c - 1}] or -1 (padding), "
            f"found range [{int(labels.min())}, {int(labels.max())}]"
        )
    no_label = (labels < 0).all(dim=1)
    if no_label.any():
        first = int(no_label.nonzero()[0])
        raise PredictionFileError(
            f"{source}: {int(no_label.sum())} video(s) have no label (all -1), the first is row {first}"
        )
    file_metric = preds["metric"]
    if file_metric not in METRICS:
        raise PredictionFileError(f"{source}: 'metric' is {file_metric!r}, expected one of {list(METRICS)}")
    if metric is not None and file_metric != metric:
        raise PredictionFileError(
            f"{source}: 'metric' is {file_metric!r}, but the dataset config uses {metric!r} (dataset.metric)"
        )
    paths = preds["paths"]
    if not isinstance(paths, (list, tuple)) or len(paths) != n or not all(isinstance(p, str) for p in paths):
        raise PredictionFileError(f"{source}: 'paths' must be a list of {n} strings (one per video)")
    gflops = preds["gflops_per_video"]
    if isinstance(gflops, bool) or not isinstance(gflops, (int, float)) or not gflops > 0:
        raise PredictionFileError(f"{source}: 'gflops_per_video' must be a positive number, got {gflops!r}")
    if not isinstance(preds["dataset"], str):
        raise PredictionFileError(f"{source}: 'dataset' must be a string, got {_describe(preds['dataset'])}")
    if not isinstance(preds["config"], dict):
        raise PredictionFileError(f"{source}: 'config' must be a dict, got {_describe(preds['config'])}")
    out = dict(preds)
    out["logits"] = logits.detach().to("cpu", torch.float32).contiguous()
    out["labels"] = labels.detach().to("cpu", torch.long).contiguous()
    out["paths"] = list(paths)
    out["gflops_per_video"] = float(gflops)
    return out


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {x.dtype} {list(x.shape)}"
    return type(x).__name__


def make_predictions(
    logits: torch.Tensor,
    labels: torch.Tensor,
    paths: list[str],
    gflops_per_video: float,
    metric: str,
    dataset: str,
    config: Any = None,
) -> dict:
    """Assemble and validate a prediction dict; a DictConfig ``config`` is stored as plain containers."""
    preds = {
        "logits": logits,
        "labels": labels,
        "paths": list(paths),
        "gflops_per_video": float(gflops_per_video),
        "num_classes": int(logits.shape[-1]),
        "metric": metric,
        "dataset": dataset,
        "config": _plain(config if config is not None else {}),
    }
    return validate_predictions(preds, source="predictions")


def save_predictions(path: str | os.PathLike, preds: dict) -> Path:
    """Validate ``preds`` and write it to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    preds = dict(preds)
    preds["config"] = _plain(preds.get("config", {}))
    if isinstance(preds.get("paths"), tuple):
        preds["paths"] = list(preds["paths"])
    preds = validate_predictions(preds, source=f"predictions to save as {path}")
    with atomic_path(path) as tmp:
        torch.save(preds, tmp)
    return path


def load_predictions(
    path: str | os.PathLike, num_classes: int | None = None, metric: str | None = None
) -> dict:
    """Load a prediction file with ``weights_only=True`` and validate it (see ``validate_predictions``)."""
    path = Path(path)
    if not path.is_file():
        raise PredictionFileError(f"{path}: prediction file not found")
    try:
        preds = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PredictionFileError(
            f"{path}: cannot be read as a prediction file with torch.load(weights_only=True): {e}"
        ) from e
    return validate_predictions(preds, source=str(path), num_classes=num_classes, metric=metric)


def check_compatible(calib: dict, evals: dict, calib_source: str, eval_source: str) -> None:
    """Calibration and evaluation predictions must come from the same model: same T and C.

    A different dataset name or GFLOPs is only warned about (e.g. a renamed dataset).
    """
    _, t_c, c_c = calib["logits"].shape
    _, t_e, c_e = evals["logits"].shape
    if t_c != t_e:
        raise PredictionFileError(
            f"calibration file {calib_source} has T = {t_c} steps but evaluation file {eval_source} "
            f"has T = {t_e}; "
            "both must come from the same model and num_frames"
        )
    if c_c != c_e:
        raise PredictionFileError(
            f"calibration file {calib_source} has C = {c_c} classes but evaluation file {eval_source} has "
            f"C = {c_e}; both must come from the same model and dataset"
        )
    if calib["dataset"] != evals["dataset"]:
        warnings.warn(
            f"calibration file {calib_source} is from dataset {calib['dataset']!r} but evaluation file "
            f"{eval_source} from {evals['dataset']!r}",
            stacklevel=2,
        )
    if abs(calib["gflops_per_video"] - evals["gflops_per_video"]) > 1e-6 * evals["gflops_per_video"]:
        warnings.warn(
            f"calibration file {calib_source} has gflops_per_video {calib['gflops_per_video']:.4f} "
            "but evaluation "
            f"file {eval_source} has {evals['gflops_per_video']:.4f}; the evaluation file's value is used",
            stacklevel=2,
        )


class PredictionWriter(Callback):
    """Writes the prediction file of a ``test`` or ``predict`` loop (the module's step outputs: ``logits``,
    ``labels``, ``index``, ``path`` per batch) to ``path``, under DDP too: each process saves its part next to
    it, and global rank 0 merges the parts in list order (by ``index``), validates and writes the file.

    ``meta``: the rest of the file's fields (``gflops_per_video``, ``metric``, ``dataset``, ``config``).
    After the loop, ``predictions`` holds the merged dict on rank 0 (None elsewhere).
    """

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        super().__init__()
        self.path, self.meta = Path(path), meta
        self.predictions: dict | None = None
        self._parts: list[dict] = []

    def _collect(self, outputs: dict | None) -> None:
        if outputs is not None:
            self._parts.append(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def _write(self, trainer) -> None:
        parts, self._parts = self._parts, []
        own = {
            "logits": torch.cat([p["logits"] for p in parts]) if parts else torch.zeros(0),
            "labels": _pad_cat([p["labels"] for p in parts]),
            "index": torch.cat([p["index"] for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
            "paths": [path for p in parts for path in p["path"]],
        }
        part_file = self.path.with_name(f".{self.path.name}.rank{trainer.global_rank}.part")
        if trainer.world_size > 1:
            with atomic_path(part_file) as tmp:
                torch.save(own, tmp)
            trainer.strategy.barrier("prediction parts written")
        if trainer.is_global_zero:
            files = [
                self.path.with_name(f".{self.path.name}.rank{r}.part") for r in range(trainer.world_size)
            ]
            everyone = [own] if trainer.world_size == 1 else [torch.load(f, weights_only=True) for f in files]
            everyone = [e for e in everyone if len(e["paths"])]
            if not everyone:
                raise PredictionFileError(f"{self.path}: no video was predicted (all skipped?)")
            index = torch.cat([e["index"] for e in everyone])
            order = index.argsort()
            paths = [p for e in everyone for p in e["paths"]]
            self.predictions = make_predictions(
                torch.cat([e["logits"] for e in everyone])[order],
                _pad_cat([e["labels"] for e in everyone])[order],
                [paths[i] for i in order.tolist()],
                **self.meta,
            )
            save_predictions(self.path, self.predictions)
            if trainer.world_size > 1:
                for f in files:
                    f.unlink(missing_ok=True)
        if trainer.world_size > 1:
            trainer.strategy.barrier("prediction file written")


def _pad_cat(labels: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[n_i, L_i]`` label tensors, padding with -1 to the widest: ``[sum n_i, max L_i]``."""
    if not labels:
        return torch.zeros(0, 1, dtype=torch.long)
    width = max(t.shape[1] for t in labels)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in labels])
