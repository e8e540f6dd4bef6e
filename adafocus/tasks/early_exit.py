"""The early-exit task (AdaFocusV2+, SPEC §5): ``early_exit(cfg)`` takes prediction files (or computes them
with the predict task), sweeps the budgets with :mod:`adafocus.early_exit` and writes the curve as CSV, PNG,
a table and, when configured, to the loggers, plus the thresholds file a stream stops with."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger
from rich.console import Console

from adafocus.early_exit import CRITERIA, METRIC_LABELS, EarlyExitResult, early_exit_sweep
from adafocus.fileio import atomic_path
from adafocus.predictions import check_compatible, load_predictions
from adafocus.tasks.common import cli_overrides, finish_wandb, instantiate_loggers, plain_config
from adafocus.tasks.predict import predict
from adafocus.thresholds import write_thresholds

log = logging.getLogger(__name__)


def budgets_from_cfg(cfg) -> list[float]:
    """cfg.budgets (explicit list) if set, else budget_start..budget_stop (inclusive) by budget_step."""
    explicit = cfg.get("budgets")
    if explicit is not None:
        if isinstance(explicit, (int, float)):
            explicit = [explicit]
        try:
            values = [float(b) for b in explicit]
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"budgets={explicit!r}: expected a list of numbers, e.g. budgets=[0.5,1.0,2.0]"
            ) from e
    else:
        start, stop, step = (float(cfg.get(k)) for k in ("budget_start", "budget_stop", "budget_step"))
        if not step > 0 or stop < start:
            raise ValueError(
                f"budget_start={start}, budget_stop={stop}, budget_step={step}: "
                "expected budget_step > 0 and budget_stop >= budget_start"
            )
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        values = [round(start + i * step, 10) for i in range(count)]
    bad = [b for b in values if not b > 0]
    if bad or not values:
        raise ValueError(f"budgets {values}: every budget p must be > 0 and there must be at least one")
    return values


def _predictions(cfg: DictConfig, which: str, out_dir: Path, expect: dict) -> tuple[dict, str]:
    """``{which}_predictions`` when given, else computed by the predict task (and kept in the output dir)."""
    given = cfg.get(f"{which}_predictions")
    if given:
        return load_predictions(given, **expect), str(given)
    if not cfg.get("ckpt_path"):
        raise ValueError(
            f"early exit needs {which} predictions: give ckpt_path=FILE (a trained checkpoint; predictions "
            f"are computed) or {which}_predictions=FILE (from evaluate.py predictions_out=FILE)"
        )
    if which == "calib":
        split, limit, transform = cfg.calib_split, cfg.get("calib_size"), cfg.calib_transform
    else:
        split, limit, transform = cfg.eval_split, cfg.get("eval_size"), "eval"
    log.info("computing %s predictions on split %r (limit=%s) with %s", which, split, limit, cfg.ckpt_path)
    path = out_dir / f"{which}_predictions.pt"
    predict(cfg, split, limit, transform, out=str(path))
    return load_predictions(path, **expect), str(path)


def early_exit(cfg: DictConfig) -> dict:
    """Predictions (given or computed) -> sweep -> ``early_exit.csv``, ``early_exit.png``, a table and the
    configured loggers (W&B: the table and the plot). Returns the rows and the no-exit point."""
    criterion = str(cfg.criterion)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: expected one of {list(CRITERIA)} (softmax = paper)")
    if cfg.calib_transform not in ("train", "eval"):
        raise ValueError(f"calib_transform={cfg.calib_transform!r}: expected train or eval")
    budgets = budgets_from_cfg(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    expect = {}
    if any(o.split("=", 1)[0].lstrip("+~") == "dataset" for o in cli_overrides()):
        expect = {"num_classes": int(cfg.dataset.num_classes), "metric": str(cfg.dataset.metric)}
    calib, calib_src = _predictions(cfg, "calib", out_dir, expect)
    evals, eval_src = _predictions(cfg, "eval", out_dir, expect)
    check_compatible(calib, evals, calib_src, eval_src)
    result = early_exit_sweep(
        calib["logits"], evals["logits"], evals["labels"], gflops_per_video=evals["gflops_per_video"],
        metric=evals["metric"], budgets=budgets, criterion=criterion,
    )  # fmt: skip
    name = f"{evals['dataset']}: AdaFocusV2+ ({criterion})"
    csv_path = write_csv(result, out_dir / "early_exit.csv")
    thresholds_path = write_thresholds(  # what the demo and the step API stop with
        out_dir / "thresholds.json", result, num_classes=evals["num_classes"], dataset=evals["dataset"]
    )
    png_path = save_plot(result, out_dir / "early_exit.png", title=name)
    console = Console()
    console.print(
        make_table(result, f"{name}, {result.num_calib} calibration / {result.num_eval} eval videos")
    )
    console.print(f"sweep of {len(budgets)} budgets took {result.seconds:.2f} s")
    print(f"wrote {csv_path}, {png_path} and {thresholds_path}", flush=True)  # plain: paths are never cut
    loggers = instantiate_loggers(cfg, hyperparams=plain_config(cfg))
    for lg in loggers:
        lg.log_metrics({"early_exit/no_exit_gflops": result.full_gflops,
                        "early_exit/no_exit_metric": result.full_metric})  # fmt: skip
        if isinstance(lg, WandbLogger):
            lg.log_table(
                "early_exit/table", columns=["p", "gflops", "metric"], data=[list(r) for r in result.rows()]
            )
            lg.log_image("early_exit/plot", [str(png_path)])
        lg.finalize("success")
    finish_wandb(loggers)
    return {
        "rows": [{"p": p, "gflops": g, "metric": m} for p, g, m in result.rows()],
        "no_exit": {"gflops": result.full_gflops, "metric": result.full_metric},
        "metric_name": result.metric_name,
        "criterion": criterion,
        "csv": str(csv_path),
        "plot": str(png_path),
        "thresholds": str(thresholds_path),
        "calib_predictions": calib_src,
        "eval_predictions": eval_src,
        "seconds": result.seconds,
    }


def write_csv(result: EarlyExitResult, path: str | os.PathLike) -> Path:
    """early_exit.csv: header p,gflops,metric, one row per budget; written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["p", "gflops", "metric"])
        for p, g, m in result.rows():
            w.writerow([f"{p:g}", f"{g:.6f}", f"{m:.6f}"])
    return Path(path)


def make_plot(result: EarlyExitResult, title: str | None = None):
    """matplotlib Figure (Agg canvas, no pyplot state): metric vs GFLOPs/video, no-exit point marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result.gflops, result.metric, "o-", ms=3.5, lw=1.4, label=f"AdaFocusV2+ ({result.criterion})")
    t = result.thresholds.shape[1]
    ax.plot(
        [result.full_gflops],
        [result.full_metric],
        "r*",
        ms=13,
        label=f"no early exit (all {t} steps)",
        zorder=5,
    )
    ax.set_xlabel("GFLOPs / video")
    ax.set_ylabel(METRIC_LABELS.get(result.metric_name, result.metric_name))
    ax.set_title(title or "Early exit: accuracy vs. budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save_plot(result: EarlyExitResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write the plot as PNG atomically."""
    fig = make_plot(result, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def make_table(result: EarlyExitResult, title: str | None = None):
    """rich Table of the sweep (plus the no-exit row)."""
    from rich.table import Table

    name = METRIC_LABELS.get(result.metric_name, result.metric_name)
    table = Table(title=title or f"AdaFocusV2+ early exit ({result.criterion})")
    table.add_column("p", justify="right")
    table.add_column("GFLOPs / video", justify="right")
    table.add_column(name, justify="right")
    for p, g, m in result.rows():
        table.add_row(f"{p:g}", f"{g:.3f}", f"{m:.2f}")
    table.add_section()
    table.add_row("no exit", f"{result.full_gflops:.3f}", f"{result.full_metric:.2f}", style="bold")
    return table
