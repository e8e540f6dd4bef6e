"""What ``train.py`` / ``evaluate.py`` / ``early_exit.py`` run: ``train(cfg)``, ``evaluate(cfg)``,
``compute_predictions(cfg, split, limit)``. Each takes the composed Hydra config and returns its results."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from netrc import netrc
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from rich.console import Console
from rich.table import Table

from adafocus.fileio import atomic_path, atomic_write_text
from adafocus.module import AdaFocusModule

log = logging.getLogger(__name__)
console = Console()

MODEL_KEYS = ("dataset", "backbone", "patch", "num_frames", "model")  # overrides that change what is built


# ------------------------------------------------------------------ configuration
def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (what checkpoints store), without Hydra's own node."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra", None)
    return out


def _world_size(trainer_cfg: DictConfig) -> int | None:
    """Processes the trainer config asks for (devices x nodes), or None when Lightning decides ("auto")."""
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        return int(devices) * nodes
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return len(devices) * nodes
    return None


def check_config(cfg: DictConfig, stage: str = "train") -> None:
    """Catch bad configuration before any work: clear errors, and warnings where the original only warned.

    ``stage``: "train" (train.py) or "eval" (evaluate.py / early_exit.py: no training list needed, no
    recipe or glance_ckpt warnings since the weights come from a checkpoint)."""
    patch, size = int(cfg.patch), int(cfg.dataset.input_size)
    if not 0 < patch < size:
        raise ValueError(f"patch={patch} must be smaller than the frame size dataset.input_size={size}")
    if cfg.logger.name not in ("csv", "tensorboard", "wandb"):
        raise ValueError(f"logger.name={cfg.logger.name}: expected csv, tensorboard or wandb")
    missing_ratios = {"policy", "glance", "focus", "classifier"} - set(cfg.optim.lr_ratios)
    if missing_ratios:
        raise ValueError(f"optim.lr_ratios lacks {sorted(missing_ratios)} (one ratio per parameter group)")
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such file")
    world = _world_size(cfg.trainer)
    if world and int(cfg.batch_size) % world:
        raise ValueError(
            f"batch_size={cfg.batch_size} is the total over all devices and must be divisible by the "
            f"{world} processes (trainer.devices x trainer.num_nodes)"
        )
    if cfg.dataset.get("generate") is None:  # a real dataset: its lists must be where data_dir says
        data_dir = Path(cfg.data_dir)
        needed = [cfg.dataset.val_list, cfg.dataset.class_index]
        if stage == "train":
            needed.insert(0, cfg.dataset.train_list)
        missing = [str(data_dir / n) for n in needed if not (data_dir / n).is_file()]
        media = data_dir / ("videos" if cfg.dataset.backend == "video" else "frames")
        if not media.is_dir():
            missing.append(f"{media}/ (dataset.backend={cfg.dataset.backend})")
        if missing:
            raise FileNotFoundError(
                f"dataset={cfg.dataset.name} needs data_dir=DIR holding its list and class files "
                f"and videos/ (or frames/ with dataset.backend=frames); not found: {', '.join(missing)}"
            )
    if cfg.backbone.glance_arch == "res50" and not cfg.backbone.glance_ckpt and stage == "train":
        warnings.warn(
            "backbone=res50 without backbone.glance_ckpt: the 96 px ResNet-50 glance starts from the "
            "224 px ImageNet weights instead of Initialization_model_prime_resnet50_patch_size_96_or_128.pth "
            "(the published recipe)",
            stacklevel=2,
        )
    if stage == "train":
        for knob in ("batch_size", "lr"):
            if float(cfg[knob]) != float(cfg.dataset[knob]):
                warnings.warn(
                    f"{knob}={cfg[knob]} differs from the dataset={cfg.dataset.name} recipe's "
                    f"{cfg.dataset[knob]} "
                    "(batch_size is the total over all devices; the published numbers need the recipe's)",
                    stacklevel=2,
                )


def _cli_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ------------------------------------------------------------------ loggers, trainer
def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, OSError, ValueError):
        return False


def _sweep_job() -> tuple[str, str] | None:
    """(group, run name) of a Hydra multirun job: the sweep directory's name (one W&B group per sweep)
    and the job number with its overrides; None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    hc = HydraConfig.get()
    sweep = Path(hc.sweep.dir)
    group = f"{sweep.parent.name}_{sweep.name}" if sweep.parent.name else sweep.name
    shown = [o for o in hc.overrides.task if not o.split("=")[0].lstrip("+~").endswith(("_dir", "_root"))]
    return group, f"{hc.job.num}:{','.join(shown)}"[:120]


def build_loggers(cfg: DictConfig, config: dict) -> list[Logger]:
    """The chosen logger plus, always, a CSV log in the run directory."""
    out_dir = Path(cfg.output_dir)
    loggers: list[Logger] = []
    name = cfg.logger.name
    if name == "tensorboard":
        loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version=""))
    elif name == "wandb":
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not _wandb_credentials()
        if offline and pl.utilities.rank_zero.rank_zero_only.rank == 0:
            has_key = _wandb_credentials()
            why = "WANDB_MODE=offline" if has_key else "no credentials (wandb login / WANDB_API_KEY)"
            sync = f"wandb sync {out_dir / 'wandb'}/offline-run-*"
            print(f"W&B: {why}, logging offline; upload later with: {sync}", flush=True)  # one unwrapped line
        group, run_name = _sweep_job() or (None, out_dir.name)
        wandb_logger = WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group or group,
            tags=list(cfg.logger.tags),
            name=run_name,
            save_dir=str(out_dir),
            offline=offline,
            log_model=cfg.logger.log_model,
        )
        wandb_logger.log_hyperparams(config)
        loggers.append(wandb_logger)
    loggers.append(CSVLogger(out_dir, name="csv", version=""))
    return loggers


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary name and renamed: never a half-written file."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def build_trainer(cfg: DictConfig, loggers: list[Logger] | bool, callbacks: list, **kwargs) -> pl.Trainer:
    args = {
        "logger": loggers,
        "callbacks": callbacks,
        "default_root_dir": cfg.output_dir,
        "use_distributed_sampler": False,  # the data module makes its own (no video counted twice in eval)
        "plugins": [AtomicCheckpointIO()],
        **kwargs,
        **OmegaConf.to_container(cfg.trainer, resolve=True),  # +trainer.KEY=VALUE wins
    }
    return pl.Trainer(**args)


# ------------------------------------------------------------------ train
def train(cfg: DictConfig) -> dict:
    """Train AdaFocusV2 as configured; returns the best/last val metrics, GFLOPs and checkpoint paths."""
    start = time.time()
    check_config(cfg, "train")
    pl.seed_everything(int(cfg.seed), workers=True)
    config = plain_config(cfg)
    metric = f"val/{cfg.dataset.metric}"
    checkpoint = ModelCheckpoint(
        dirpath=Path(cfg.output_dir) / "checkpoints",
        filename="best-epoch{epoch:02d}",
        monitor=metric,
        mode="max",
        save_last=cfg.checkpoint.save_last,
        save_top_k=cfg.checkpoint.save_top_k,
        auto_insert_metric_name=False,
    )
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="epoch"), RichProgressBar()]
    if int(cfg.visualize_every) > 0:
        from adafocus.visualize import FocusVisualizationCallback

        callbacks.append(FocusVisualizationCallback(every_n_epochs=int(cfg.visualize_every)))
    loggers = build_loggers(cfg, config)
    trainer = build_trainer(cfg, loggers, callbacks, max_epochs=int(cfg.epochs))
    if int(cfg.batch_size) % trainer.world_size:  # devices="auto" etc.: known once the Trainer exists
        raise ValueError(
            f"batch_size={cfg.batch_size} is the total over all devices and must be divisible by the "
            f"{trainer.world_size} processes (trainer.devices x trainer.num_nodes)"
        )
    datamodule = instantiate(cfg.data)
    module = AdaFocusModule(config)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    gflops = module.gflops_per_video
    best = checkpoint.best_model_score
    results = {
        "best_" + cfg.dataset.metric: None if best is None else float(best),
        "gflops": gflops,
        "best_checkpoint": checkpoint.best_model_path,
        "last_checkpoint": checkpoint.last_model_path,
        "epochs": trainer.current_epoch,
        "seconds": time.time() - start,
        **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    if trainer.is_global_zero:
        if cfg.logger.name == "wandb" and cfg.wandb_log_checkpoint and checkpoint.best_model_path:
            import wandb

            artifact = wandb.Artifact(f"model-{Path(cfg.output_dir).name}", type="model")
            artifact.add_file(checkpoint.best_model_path, name="best.ckpt")
            loggers[0].experiment.log_artifact(artifact)
        # plain lines, never wrapped or cut: the checkpoint path must survive any terminal width / log file
        summary = {
            f"best {metric}": "n/a" if best is None else f"{float(best):.2f}",
            "GFLOPs / video": f"{gflops:.4g}",
            "best checkpoint": checkpoint.best_model_path or "-",
            "last checkpoint": checkpoint.last_model_path or "-",
        }
        print(f"AdaFocusV2 on {cfg.dataset.name}: done in {results['seconds'] / 60:.1f} min", flush=True)
        for key, value in summary.items():
            print(f"  {key:<16} {value}", flush=True)
    if cfg.logger.name == "wandb":
        import wandb

        wandb.finish()  # else the next job of a multirun (same process) logs into this run
    return results


# ------------------------------------------------------------------ evaluate
def _is_lightning_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt and "hyper_parameters" in ckpt


def load_module(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[AdaFocusModule, DictConfig]:
    """The model to evaluate and the config it runs with, from ``cfg.ckpt_path``: one of our Lightning
    checkpoints (its stored config is used unless dataset/backbone/patch are overridden) or a published
    AdaFocusV2 ``.pth.tar`` (told apart automatically)."""
    if not cfg.get("ckpt_path"):
        raise ValueError(
            "ckpt_path=FILE is required: a checkpoint of ours or a published AdaFocusV2 .pth.tar"
        )
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no such file {path}")
    overrides = _cli_overrides() if overrides is None else overrides
    keys = {o.lstrip("+~").split("=")[0] for o in overrides}
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if _is_lightning_checkpoint(ckpt):
        if any(k.split(".")[0] in MODEL_KEYS for k in keys):
            run_cfg = cfg
        else:  # the stored config, with this command's runtime knobs
            stored = OmegaConf.create(ckpt["hyper_parameters"]["config"])
            run_cfg = cfg.copy()
            OmegaConf.set_struct(run_cfg, False)
            for node in ("dataset", "model", "optim", "backbone", "patch", "num_frames", "lr", "epochs"):
                run_cfg[node] = stored[node]
            run_cfg.data = stored.data
            for knob in ("data_dir", "workers", "batch_size", "seed"):
                run_cfg.data[knob] = cfg[knob] if knob in keys else stored.data[knob]
            run_cfg.data.skip_bad_eval = cfg.data.skip_bad_eval
        module = AdaFocusModule(plain_config(run_cfg))
        module.load_state_dict(ckpt["state_dict"], strict=True)
    else:
        from adafocus.models import AdaFocusV2

        kwargs = {"input_size": int(cfg.dataset.input_size), "glance_size": cfg.model.glance_size}
        if "patch" in keys or "_p" not in path.name:
            kwargs["patch_size"] = int(cfg.patch)
        if any(k.split(".")[0] == "backbone" for k in keys):  # else: the archs the tensors say
            kwargs.update(glance_arch=cfg.model.glance_arch, focus_arch=cfg.model.focus_arch)
        model = AdaFocusV2.from_official_checkpoint(path, **kwargs)
        if model.num_classes != int(cfg.dataset.num_classes):
            raise ValueError(
                f"{path} has {model.num_classes} classes but dataset={cfg.dataset.name} has "
                f"{cfg.dataset.num_classes}: pass the dataset the checkpoint was trained on"
            )
        run_cfg = cfg.copy()
        OmegaConf.set_struct(run_cfg, False)
        run_cfg.patch = model.patch_size
        run_cfg.num_frames = model.num_frames
        run_cfg.model.patch_size = model.patch_size
        run_cfg.model.num_frames = model.num_frames
        run_cfg.data.num_frames = model.num_frames
        module = AdaFocusModule(plain_config(run_cfg), model=model)
    return module, run_cfg


def _run_eval(cfg: DictConfig, split: str, limit: int | None, collect: bool, overrides: list[str] | None):
    check_config(cfg, "eval")
    pl.seed_everything(int(cfg.seed), verbose=False)  # the random policy's draws are reproducible
    module, run_cfg = load_module(cfg, overrides)
    module.eval_policy = str(cfg.get("policy", "learned"))
    module.collect_predictions = collect
    datamodule = instantiate(run_cfg.data)
    datamodule.eval_split, datamodule.eval_limit = split, limit
    trainer = build_trainer(cfg, False, [RichProgressBar()])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return module, run_cfg, datamodule, trainer


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Evaluate ``cfg.ckpt_path`` with ``cfg.policy`` on the val split; prints and writes ``metrics.json``.
    ``predictions_out=FILE.pt``: also a prediction file (early exit); ``visualize=K``: pictures of K
    videos."""
    module, run_cfg, datamodule, trainer = _run_eval(
        cfg, "val", cfg.get("limit"), bool(cfg.get("predictions_out")), overrides
    )
    gflops = module.gflops_per_video
    metrics = {
        k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
    }
    results = {**metrics, "gflops": gflops, "num_videos": module.num_videos, "policy": module.eval_policy}
    if run_cfg.data.skip_bad_eval:
        results["skipped"] = len(module.skipped)
    if not trainer.is_global_zero:
        return results
    out_dir = Path(cfg.output_dir)
    atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2))
    if cfg.get("predictions_out"):
        from adafocus.predictions import make_predictions, save_predictions

        p = module.gathered_predictions()
        preds = make_predictions(
            p["logits"],
            p["labels"],
            p["paths"],
            gflops,
            run_cfg.dataset.metric,
            run_cfg.dataset.name,
            run_cfg,
        )
        save_predictions(cfg.predictions_out, preds)
        results["predictions"] = str(cfg.predictions_out)
    if int(cfg.get("visualize") or 0) > 0:
        results["pictures"] = [str(p) for pair in _visualize(module, datamodule, run_cfg, cfg) for p in pair]
    table = Table(title=f"{Path(cfg.ckpt_path).name} on {run_cfg.dataset.name} (policy={module.eval_policy})")
    shown = [k for k in ("top1", "top5", "map", "gflops", "num_videos", "skipped") if k in results]
    for key in shown:
        table.add_column(key, justify="right")
    table.add_row(*(f"{results[k]:.4g}" if k == "gflops" else _fmt(results[k]) for k in shown))
    console.print(table)
    print(f"metrics: {out_dir / 'metrics.json'}", flush=True)  # plain lines: paths are never cut
    if "predictions" in results:
        print(f"predictions: {results['predictions']}", flush=True)
    if "pictures" in results:
        print(f"pictures: {Path(cfg.output_dir) / 'focus'} ({len(results['pictures'])} files)", flush=True)
    if run_cfg.data.skip_bad_eval and results["skipped"]:
        console.print(
            f"{results['skipped']} videos could not be decoded and were skipped: {module.skipped[:10]}"
        )
    return results


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


@torch.no_grad()
def _visualize(module: AdaFocusModule, datamodule, run_cfg: DictConfig, cfg: DictConfig) -> list:
    from adafocus.visualize import save_focus_examples

    model = module.model.eval()
    want, done, files = int(cfg.visualize), 0, []
    for batch in datamodule.eval_dataloader("val"):
        if done >= want:
            break
        video = batch["video"][: want - done]
        out = model(video, policy=module.eval_policy)
        files += save_focus_examples(
            video, out.actions, out.logits, batch["labels"][: len(video)], model.patch_size,
            Path(cfg.output_dir) / "focus", datamodule.class_names, start_index=done,
        )  # fmt: skip
        done += len(video)
    return files


def compute_predictions(
    cfg: DictConfig, split: str = "val", limit: int | None = None, overrides=None
) -> dict:
    """Every video's per-step logits on ``split`` (``limit``: a seeded random subset), as a prediction
    dict."""
    from adafocus.predictions import make_predictions

    module, run_cfg, _, _ = _run_eval(cfg, split, limit, True, overrides)
    p = module.gathered_predictions()
    return make_predictions(
        p["logits"], p["labels"], p["paths"], module.gflops_per_video, run_cfg.dataset.metric,
        run_cfg.dataset.name, run_cfg,
    )  # fmt: skip
