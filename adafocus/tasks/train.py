"""The train task: ``train(cfg)`` fits AdaFocusV2 as configured and returns its best/last metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from adafocus.models.finetune import init_from_checkpoint
from adafocus.module import AdaFocusModule
from adafocus.tasks.checkpoint import build_datamodule, read_checkpoint
from adafocus.tasks.common import (
    build_trainer,
    check_config,
    check_world,
    finish_wandb,
    instantiate_callbacks,
    instantiate_loggers,
    plain_config,
    print_summary,
    run_dir_lock,
    set_threads,
)


def train(cfg: DictConfig) -> dict:
    """Train as ``cfg`` says (resume from ``cfg.ckpt_path``, or fine-tune from ``cfg.init_from``); returns
    ``best_<metric>``, the last ``val/*`` values, ``gflops``, the best and last checkpoint paths, ``epochs``
    and ``seconds``."""
    start = time.time()
    in_place = cfg.get("ckpt_path") == "last"  # resume this run directory's run, in place
    ckpt_path = str(Path(cfg.output_dir) / "checkpoints" / "last.ckpt") if in_place else cfg.get("ckpt_path")
    if in_place and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path=last resumes the run of hydra.run.dir={cfg.output_dir}, but {ckpt_path} does not "
            "exist (give the run's directory: hydra.run.dir=outputs/DATE/TIME)"
        )
    check_config(cfg, "train", ckpt_path=ckpt_path)
    set_threads(cfg.get("threads"))
    config = plain_config(cfg)
    if ckpt_path:
        check_resume(ckpt_path, config, bool(cfg.allow_model_override))
    with run_dir_lock(cfg.output_dir):
        pl.seed_everything(int(cfg.seed), workers=True)
        loggers = instantiate_loggers(cfg, hyperparams=config, resume=in_place)
        callbacks = instantiate_callbacks(cfg)
        trainer = build_trainer(cfg, logger=loggers, callbacks=callbacks)
        check_world(cfg, trainer)  # before the model and the data: a bad batch split costs nothing
        datamodule = build_datamodule(cfg)
        module = AdaFocusModule(config)
        if cfg.get("init_from"):  # fine-tuning: a new run (epoch 0, new optimiser) from trained weights
            summary = init_from_checkpoint(module.model, cfg.init_from)
            if trainer.is_global_zero:
                print(summary, flush=True)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return _finish(cfg, trainer, module, datamodule, loggers, start)


def check_resume(ckpt_path: str, config: dict, allow_model_override: bool) -> None:
    """Resuming must continue the checkpoint's model: a model argument that differs is an error listing the
    differences (unless ``allow_model_override``). A new ``epochs`` is followed from the current epoch on (the
    cosine is the closed form of the run's ``epochs``), and said."""
    ckpt = read_checkpoint(ckpt_path)
    stored = ckpt.get("hyper_parameters", {}).get("config")
    if stored is None:
        raise ValueError(
            f"ckpt_path={ckpt_path} is not a checkpoint of ours: use init_from= to start from it"
        )
    init_only = ("pretrained", "glance_ckpt")  # how the weights started, not what the model is
    ours, theirs = config["model"], stored["model"]
    diffs = [
        f"model.{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}"
        for k in sorted(set(ours) | set(theirs))
        if k not in init_only and ours.get(k) != theirs.get(k)
    ]
    if diffs and not allow_model_override:
        raise ValueError(
            f"ckpt_path={ckpt_path} was trained with another model than this run's config: "
            + "; ".join(diffs)
            + ". Give the overrides it was trained with (.hydra/overrides.yaml) or allow_model_override=true"
        )
    if stored.get("epochs") != config["epochs"] and rank_zero_only.rank == 0:
        batches = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        where = "inside" if batches.get("is_last_batch") is False else "after"  # a mid-epoch checkpoint
        print(
            f"resuming {where} epoch {ckpt.get('epoch', 0) + 1} of {stored.get('epochs')}: the learning-rate "
            f"schedule now runs over epochs={config['epochs']} from there",
            flush=True,
        )


def _finish(cfg: DictConfig, trainer, module, datamodule, loggers, start: float) -> dict:
    """The results of a finished fit, the summary printed once, the W&B run closed."""
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
        "bad_train_videos": len(datamodule.bad_videos),  # substituted by others (this process's share)
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
                **(
                    {
                        "bad videos": f"{results['bad_train_videos']} training videos failed to decode and "
                        f"were replaced: {datamodule.bad_videos[:5]}"
                    }
                    if results["bad_train_videos"]
                    else {}
                ),
                **(
                    {"skipped in val": f"{int(results['val/skipped'])}"} if results.get("val/skipped") else {}
                ),
            },
        )
    finish_wandb(loggers)
    return results
