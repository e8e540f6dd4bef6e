"""The LightningModule: coordinates AdaFocusV2's training step, optimiser groups and metrics (SPEC §2)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adafocus.metrics import VideoMetrics
from adafocus.models import AdaFocusV2

LOSS_PARTS = ("cat", "global", "local")


class AdaFocusModule(pl.LightningModule):
    """AdaFocusV2 + the one-stage training recipe.

    ``config``: the resolved run config as plain containers (stored in the checkpoint, loadable with
    ``torch.load(weights_only=True)``); it needs ``model`` (Hydra node of :class:`AdaFocusV2`), ``optim``,
    ``lr``, ``epochs`` and ``dataset.{num_classes,multilabel,metric}``. ``model``: an already built network
    (e.g. from a published checkpoint) instead of ``config.model``.
    """

    def __init__(self, config: dict, model: AdaFocusV2 | None = None):
        super().__init__()
        self.save_hyperparameters({"config": config}, ignore=["model"])
        cfg = OmegaConf.create(config)
        self.model: AdaFocusV2 = model if model is not None else instantiate(cfg.model)
        self.optim_cfg: DictConfig = cfg.optim
        self.lr = float(cfg.lr)
        self.epochs = int(cfg.epochs)
        self.num_classes = int(cfg.dataset.num_classes)
        self.val_metrics = VideoMetrics(self.num_classes, bool(cfg.dataset.multilabel))
        self.eval_policy = "learned"  # evaluate.py's policy=learned|random|center
        self.collect_predictions = False  # keep every video's per-step logits (prediction files)
        self.predictions: list[dict[str, torch.Tensor | list]] = []
        self.num_videos = 0  # videos in the last validation epoch, over all processes
        self.skipped: list[str] = []  # videos skipped in it (skip_bad_eval), over all processes
        self._seen = 0
        self._gathered: list[dict] = []
        self._gflops: float | None = None

    # ---- training ----
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        video, label = batch["video"], batch["label"]  # (B, T, 3, H, W), (B,)
        t = video.shape[1]
        target = label.repeat_interleave(t)  # (B*T,) the video's label at every step
        glance = self.model.run_glance(video)  # glance once, shared by both passes
        passes = [self.model.run_focus(video, glance, policy) for policy in ("learned", "random")]
        parts = {
            name: sum(
                F.cross_entropy(
                    getattr(out, f"{name}_logits" if name != "cat" else "logits").flatten(0, 1), target
                )
                for out in passes
            )
            / len(passes)
            for name in LOSS_PARTS
        }
        loss = sum(parts.values())
        batch_size = video.shape[0]
        # no prog_bar: the bar would turn the loss into a Python float (a device sync) every step
        self.log("train/loss", loss, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value, batch_size=batch_size)
        return loss

    # ---- validation / evaluation ----
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        video = batch["video"]
        if video.shape[0] == 0:  # every video of the batch was skipped (skip_bad_eval)
            return
        out = self.model(video, policy=self.eval_policy)
        self.val_metrics.update(out.logits[:, -1], batch["labels"])
        self._seen += video.shape[0]
        if self.collect_predictions:
            self.predictions.append(
                {
                    "logits": out.logits.float().cpu(),
                    "labels": batch["labels"].cpu(),
                    "index": batch["index"].cpu(),
                    "paths": list(batch["path"]),
                }
            )

    def on_validation_epoch_start(self) -> None:
        self.predictions, self._seen = [], 0

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()  # synchronised over processes by torchmetrics
        self.val_metrics.reset()
        self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=False)
        datamodule = getattr(self.trainer, "datamodule", None)
        skipped = (
            datamodule.skipped_videos(datamodule.eval_split) if hasattr(datamodule, "eval_split") else []
        )
        local = {"seen": self._seen, "predictions": self.predictions, "skipped": skipped}
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            everyone: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(everyone, local)  # uneven shards: objects, not tensors
        else:
            everyone = [local]
        self.num_videos = sum(e["seen"] for e in everyone)
        self.skipped = [p for e in everyone for p in e["skipped"]]
        self._gathered = [p for e in everyone for p in e["predictions"]]

    def gathered_predictions(self) -> dict:
        """The last validation epoch's per-video outputs from every process, in list order:
        ``logits [N, T, C]``, ``labels [N, L]`` (-1 padded), ``paths``."""
        if not self._gathered:
            raise RuntimeError("no predictions were collected (set collect_predictions before validating)")
        width = max(p["labels"].shape[1] for p in self._gathered)
        labels = torch.cat(
            [F.pad(p["labels"], (0, width - p["labels"].shape[1]), value=-1) for p in self._gathered]
        )
        index = torch.cat([p["index"] for p in self._gathered])
        order = index.argsort()
        paths = [path for p in self._gathered for path in p["paths"]]
        return {
            "logits": torch.cat([p["logits"] for p in self._gathered])[order],
            "labels": labels[order],
            "paths": [paths[i] for i in order.tolist()],
        }

    # ---- optimiser ----
    def configure_optimizers(self):
        """SGD (or the configured optimiser) over the four groups of SPEC §2 at ``lr x ratio``, with the
        per-epoch ``optim.schedule``: ``cosine`` (the recipe), ``lr_e = 0.5 * lr * (1 + cos(pi*e/E))``;
        or ``step`` (the original's ``--lr_type step``), ``lr_e = lr * gamma ** (milestones <= e)``."""
        ratios = self.optim_cfg.lr_ratios
        groups = [
            {"params": params, "name": name, "lr": self.lr * float(ratios[name])}
            for name, params in self.model.param_groups().items()
        ]
        in_groups = [id(p) for g in groups for p in g["params"]]
        if len(in_groups) != len(set(in_groups)) or set(in_groups) != {id(p) for p in self.parameters()}:
            raise RuntimeError("optimiser groups must hold every parameter exactly once")
        optimizer = instantiate(self.optim_cfg.optimizer)(groups, lr=self.lr)
        schedule = self.optim_cfg.get("schedule", "cosine")
        if schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs, eta_min=0.0)
        elif schedule == "step":
            milestones = list(self.optim_cfg.get("milestones") or [])
            if not milestones or any(not isinstance(m, int) or m < 1 for m in milestones):
                raise ValueError(
                    "optim.schedule=step needs optim.milestones, a list of epochs >= 1 at which the learning "
                    f"rate is multiplied by optim.gamma (e.g. optim.milestones=[30,45]); got {milestones}"
                )
            gamma = float(self.optim_cfg.get("gamma", 0.1))
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
        else:
            raise ValueError(f"optim.schedule={schedule!r}: expected 'cosine' (the recipe) or 'step'")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @property
    def gflops_per_video(self) -> float:
        """The model's GFLOPs (multiply-accumulates) per video, counted once."""
        if self._gflops is None:
            self._gflops = self.model.gflops()
        return self._gflops

    def on_fit_start(self) -> None:
        for logger in self.loggers:  # once per run, step 0 (the loggers exist on rank 0 only)
            logger.log_metrics({"model/gflops": self.gflops_per_video}, step=0)
