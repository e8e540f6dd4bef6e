"""The evaluate task: ``evaluate(cfg)`` scores a checkpoint on the val split with Lightning's test loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.loggers import WandbLogger
from rich.console import Console
from rich.table import Table

from adafocus.fileio import atomic_write_text
from adafocus.predictions import PredictionWriter
from adafocus.tasks.checkpoint import build_datamodule, load_module
from adafocus.tasks.common import (
    build_trainer,
    check_config,
    check_writable,
    finish_wandb,
    instantiate_loggers,
    plain_config,
    set_threads,
)


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Evaluate ``cfg.ckpt_path`` (see :func:`~adafocus.tasks.checkpoint.load_module` for what comes from the
    checkpoint and what from ``cfg``); prints the metrics and writes ``metrics.json`` (``top1``, ``top5``,
    ``map`` for multi-label data, ``gflops``, ``num_videos``, ``policy``) in ``cfg.output_dir``.
    ``predictions_out=FILE``: also every video's per-step logits; ``visualize=K``: pictures of K videos;
    ``test_clips`` x ``test_crops``: multi-view testing (logits averaged, GFLOPs multiplied). The metrics
    also go to the configured loggers; W&B also gets the per-class report (:mod:`adafocus.report`).
    ``overrides``: the command line's (default: Hydra's)."""
    check_writable(cfg.output_dir)  # metrics.json must have a place before the work starts
    module, run_cfg = load_module(cfg, overrides)
    check_config(run_cfg, "eval")
    set_threads(run_cfg.get("threads"))
    pl.seed_everything(int(run_cfg.seed), verbose=False)  # the random policy's draws are reproducible
    views = int(cfg.get("test_clips", 1)) * int(cfg.get("test_crops", 1))
    datamodule = build_datamodule(
        run_cfg,
        eval_limit=cfg.get("limit"),
        test_clips=cfg.get("test_clips", 1),
        test_crops=cfg.get("test_crops", 1),
    )
    gflops = module.gflops_per_video * views  # every view is a whole forward (counted on the eager model)
    runtime = str(cfg.get("runtime", "eager"))
    if runtime != "eager":  # the same outputs (float tolerance) from a faster CPU engine
        from adafocus.runtime import optimize

        if run_cfg.trainer.accelerator not in ("cpu", "auto") or torch.cuda.is_available():
            raise ValueError(f"runtime={runtime} is for CPU inference; on a GPU use runtime=eager")
        module.model = optimize(module.model, runtime)
    loggers = instantiate_loggers(run_cfg, hyperparams=plain_config(run_cfg))  # test/* go to them too
    wandb = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    callbacks: list = [RichProgressBar()]
    writer = None
    if cfg.get("predictions_out") or wandb is not None:  # W&B also gets the per-class report
        meta = {"gflops_per_video": gflops, "metric": run_cfg.dataset.metric,
                "dataset": run_cfg.dataset.name, "config": plain_config(run_cfg)}  # fmt: skip
        writer = PredictionWriter(cfg.get("predictions_out") or Path(cfg.output_dir) / "predictions.pt", meta)
        callbacks.append(writer)
    trainer = build_trainer(run_cfg, logger=loggers, callbacks=callbacks)
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    policy = "learned" if module.eval_policy is None else type(module.eval_policy).__name__
    results = {k.removeprefix("test/"): float(v) for k, v in metrics.items()}
    results["num_videos"] = int(results["num_videos"])
    results.update(gflops=gflops, policy=policy, views=views, runtime=runtime)
    skipped = datamodule.skipped_videos("val")
    if run_cfg.dataset.skip_bad_eval:
        results["skipped"] = len(skipped)
    if not trainer.is_global_zero:
        finish_wandb(loggers)
        return results
    if wandb is not None:
        from adafocus.report import class_report, log_class_report, save_confusion_png

        report = class_report(writer.predictions, datamodule.class_names)
        log_class_report(
            wandb.experiment, report, save_confusion_png(report, Path(cfg.output_dir) / "confusion.png")
        )
    if cfg.get("predictions_out"):
        results["predictions"] = str(cfg.predictions_out)
    if int(cfg.get("visualize") or 0) > 0:
        results["pictures"] = [
            str(p) for p in _visualize(module, datamodule, int(cfg.visualize), cfg.output_dir)
        ]
    out_dir = Path(cfg.output_dir)
    table = Table(title=f"{Path(cfg.ckpt_path).name} on {run_cfg.dataset.name} (policy={policy})")
    shown = [k for k in ("top1", "top5", "map", "gflops", "num_videos", "skipped") if k in results]
    for key in shown:
        table.add_column(key, justify="right")
    table.add_row(*(f"{results[k]:.4g}" if k == "gflops" else _fmt(results[k]) for k in shown))
    Console().print(table)
    try:
        atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2))
        print(f"metrics: {out_dir / 'metrics.json'}", flush=True)  # plain lines: paths are never cut
    except OSError as err:  # a full disk: the metrics are printed above and returned
        print(
            f"metrics could not be written to {out_dir / 'metrics.json'} ({err}); they are above", flush=True
        )
    if "predictions" in results:
        print(f"predictions: {results['predictions']}", flush=True)
    if "pictures" in results:
        print(f"pictures: {out_dir / 'focus'} ({len(results['pictures'])} files)", flush=True)
    if skipped:
        print(f"{len(skipped)} videos could not be decoded and were skipped: {skipped[:10]}", flush=True)
    finish_wandb(loggers)
    return results


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


@torch.no_grad()
def _visualize(module, datamodule, want: int, output_dir: str) -> list[Path]:
    """PNG + GIF of the chosen patches for the first ``want`` val videos, under ``output_dir/focus``."""
    from adafocus.visualize import save_focus_examples

    model = module.model.eval()
    done, files = 0, []
    for batch in datamodule.test_dataloader():
        if done >= want:
            break
        batch = datamodule.on_after_batch_transfer(batch, 0)  # what the loops feed the model
        video = batch["video"][: want - done]
        if video.dim() == 6:  # multi-view testing: the first view (the centre clip / first crop)
            video = video[:, 0]
        out = model(video, module.eval_policy)
        for pair in save_focus_examples(
            video, out.actions, out.logits, batch["labels"][: len(video)], model.patch_size,
            Path(output_dir) / "focus", datamodule.class_names, start_index=done,
        ):  # fmt: skip
            files += list(pair)
        done += len(video)
    return files
