"""The predict task: ``predict(cfg)`` writes a prediction file (every video's per-step logits) of a split
with Lightning's predict loop: ``python -m adafocus.tasks.predict ckpt_path=FILE [split=train] [limit=N]``."""

from __future__ import annotations

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import RichProgressBar

from adafocus.predictions import PredictionWriter
from adafocus.tasks.checkpoint import build_datamodule, load_module
from adafocus.tasks.common import build_trainer, check_config, plain_config, set_threads, user_errors


def predict(
    cfg: DictConfig,
    split: str = "val",
    limit: int | None = None,
    transform: str = "eval",
    out: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Every video's per-step logits on ``split`` ("val" | "train"; ``limit``: a seeded random subset;
    ``transform``: "eval" or "train" frames and crops), saved to ``out`` as a prediction file
    (:mod:`adafocus.predictions`); returns the prediction dict (on global rank 0; {} elsewhere)."""
    module, run_cfg = load_module(cfg, overrides)
    check_config(run_cfg, "eval", train_list=split == "train")
    set_threads(run_cfg.get("threads"))
    pl.seed_everything(int(run_cfg.seed), verbose=False)
    datamodule = build_datamodule(run_cfg, eval_limit=limit, predict_split=split, predict_transform=transform)
    meta = {"gflops_per_video": module.gflops_per_video, "metric": run_cfg.dataset.metric,
            "dataset": run_cfg.dataset.name, "config": plain_config(run_cfg)}  # fmt: skip
    writer = PredictionWriter(out or f"{cfg.output_dir}/predictions.pt", meta)
    trainer = build_trainer(run_cfg, logger=False, callbacks=[RichProgressBar(), writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if trainer.is_global_zero:
        print(f"predictions: {writer.path} ({len(writer.predictions['paths'])} videos)", flush=True)
    return writer.predictions or {}


@hydra.main(config_path="../../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg, cfg.split, cfg.limit, cfg.transform, cfg.out)


if __name__ == "__main__":
    main()
