"""The train task: ``train(cfg)`` fits AdaFocusV2 as configured and returns its best/last metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from adafocus.models.finetune import init_from_checkpoint
from adafocus.module import AdaFocusModule
from adafocus.tasks.checkpoint import build_datamodule
from adafocus.tasks.common import (
    build_trainer,
    check_config,
    check_world,
    finish_wandb,
    instantiate_callbacks,
    instantiate_loggers,
    plain_config,
    print_summary,
)


def train(cfg: DictConfig) -> dict:
    """Train as ``cfg`` says (resume from ``cfg.ckpt_path``, or fine-tune from ``cfg.init_from``); returns
    ``best_<metric>``, the last ``val/*`` values, ``gflops``, the best and last checkpoint paths, ``epochs``
    and ``seconds``."""
    start = time.time()
    check_config(cfg, "train")
    pl.seed_everything(int(cfg.seed), workers=True)
    config = plain_config(cfg)
    loggers = instantiate_loggers(cfg, hyperparams=config)
    callbacks = instantiate_callbacks(cfg)
    trainer = build_trainer(cfg, logger=loggers, callbacks=callbacks)
    check_world(cfg, trainer)  # before the model and the data: a bad batch split costs nothing
    datamodule = build_datamodule(cfg)
    module = AdaFocusModule(config)
    if cfg.get("init_from"):  # fine-tuning: a new run (epoch 0, new optimiser) from trained weights
        summary = init_from_checkpoint(module.model, cfg.init_from)
        if trainer.is_global_zero:
            print(summary, flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    checkpoint = (
        trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
    )
    best = checkpoint.best_model_score if checkpoint else None
    results = {
        f"best_{cfg.dataset.metric}": None if best is None else float(best),
        "gflops": module.gflops_per_video,
        "best_checkpoint": checkpoint.best_model_path if checkpoint else "",
        "last_checkpoint": checkpoint.last_model_path if checkpoint else "",
        "epochs": trainer.current_epoch,
        "seconds": time.time() - start,
        **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    if trainer.is_global_zero:
        wandb = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
        if wandb is not None and cfg.wandb_log_checkpoint and results["best_checkpoint"]:
            import wandb as wandb_sdk

            artifact = wandb_sdk.Artifact(f"model-{Path(cfg.output_dir).name}", type="model")
            artifact.add_file(results["best_checkpoint"], name="best.ckpt")
            wandb.experiment.log_artifact(artifact)
        metric = f"val/{cfg.dataset.metric}"
        print_summary(
            f"AdaFocusV2 on {cfg.dataset.name}: done in {results['seconds'] / 60:.1f} min",
            {
                f"best {metric}": "n/a" if best is None else f"{float(best):.2f}",
                "GFLOPs / video": f"{results['gflops']:.4g}",
                "best checkpoint": results["best_checkpoint"] or "-",
                "last checkpoint": results["last_checkpoint"] or "-",
            },
        )
    finish_wandb(loggers)
    return results
