"""The LightningModule: coordinates AdaFocusV2's training step, optimiser groups and metrics (SPEC §2)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import SumMetric

from adafocus.metrics import VideoMetrics
from adafocus.models import AdaFocusV2

LOSS_PARTS = ("cat", "global", "local")
RANDOM = {"_target_": "adafocus.models.policy.RandomPolicy", "_partial_": True}


class AdaFocusModule(pl.LightningModule):
    """AdaFocusV2 + the one-stage training recipe.

    ``config``: the resolved run config as plain containers (stored in the checkpoint, loadable with
    ``torch.load(weights_only=True)``); it needs ``model`` (Hydra node of :class:`AdaFocusV2`), ``optim``,
    ``lr``, ``epochs``, ``aux_policies`` and ``dataset.{num_classes,multilabel}``. ``model``: an already
    built network (e.g. from a published checkpoint) instead of ``config.model``. ``eval_policy``: the
    policy of the test / predict loops (None: the model's own; a name of ``POLICIES``, a module, or a factory
    built like the model's policy, from the glance map's shape).

    Loops: ``fit`` trains (one glance, a focus pass at the model's policy plus one per auxiliary policy,
    the loss the mean over the passes) and validates (``val/*``); ``test`` evaluates (``test/*``, plus
    ``test/num_videos``); ``predict`` returns every video's per-step logits, labels, index and path.
    """

    def __init__(
        self, config: dict, model: AdaFocusV2 | None = None, eval_policy: nn.Module | str | None = None
    ):
        super().__init__()
        self.save_hyperparameters({"config": config}, ignore=["model", "eval_policy"])
        cfg = OmegaConf.create(config)
        self.model: AdaFocusV2 = model if model is not None else instantiate(cfg.model)
        self.aux_policies = [
            instantiate(node)(**self.model.glance_shape) for node in cfg.get("aux_policies", [])
        ]
        if eval_policy is not None and not isinstance(eval_policy, str | nn.Module):
            eval_policy = eval_policy(**self.model.glance_shape)
        if eval_policy == "learned" or type(eval_policy) is type(self.model.policy):
            eval_policy = None  # the trained policy itself, not a fresh one of its kind
        # not a registered submodule: the checkpoint holds the model, whatever policy an evaluation uses
        self.__dict__["eval_policy"] = eval_policy
        self.optim_cfg: DictConfig = cfg.optim
        self.lr = float(cfg.lr)
        self.epochs = int(cfg.epochs)
        num_classes, multilabel = int(cfg.dataset.num_classes), bool(cfg.dataset.multilabel)
        self.val_metrics = VideoMetrics(num_classes, multilabel)
        self.test_metrics = VideoMetrics(num_classes, multilabel)
        self.test_videos = SumMetric()
        self._gflops: float | None = None

    # ---- training ----
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        video, label = batch["video"], batch["label"]  # (B, T, 3, H, W), (B,)
        t = video.shape[1]
        target = label.repeat_interleave(t)  # (B*T,) the video's label at every step
        glance = self.model.run_glance(video)  # glance once, shared by every pass
        passes = [self.model.run_focus(video, glance)]  # the policy learns from this pass only
        passes += [self.model.run_focus(video, glance, policy) for policy in self.aux_policies]
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

    # ---- validation / test / predict ----
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["video"].shape[0]:  # empty: every video of the batch was skipped (skip_bad_eval)
            self.val_metrics.update(self.model(batch["video"]).logits[:, -1], batch["labels"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()  # synchronised over processes by torchmetrics
        self.val_metrics.reset()
        self.log_dict({f"val/{k}": v for k, v in values.items()})
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "skipped_videos"):  # val videos that failed to decode, skipped and counted
            skipped = float(len(datamodule.skipped_videos("val")))
            self.log("val/skipped", skipped, reduce_fx="sum", sync_dist=self.trainer.world_size > 1)

    def eval_logits(self, video: torch.Tensor) -> torch.Tensor:
        """Per-step logits ``[B, T, C]`` at the evaluation policy; ``video`` ``[B, T, 3, S, S]``, or
        ``[B, V, T, 3, S, S]`` for multi-view testing (V clips x crops: the views' logits averaged)."""
        if video.dim() == 5:
            return self.model(video, self.eval_policy).logits
        b, v = video.shape[:2]
        logits = self.model(video.flatten(0, 1), self.eval_policy).logits  # (B*V, T, C)
        return logits.view(b, v, *logits.shape[1:]).mean(dim=1)  # (B, T, C)

    def test_step(self, batch: dict, batch_idx: int) -> dict | None:
        """Scores the final step; returns what :meth:`predict_step` returns (for a prediction writer)."""
        self.test_videos.update(batch["video"].shape[0])
        if not batch["video"].shape[0]:
            return None
        logits = self.eval_logits(batch["video"])  # (B, T, C)
        self.test_metrics.update(logits[:, -1], batch["labels"])
        return self._outputs(batch, logits)

    def on_test_epoch_end(self) -> None:
        values = {f"test/{k}": v for k, v in self.test_metrics.compute().items()}
        values["test/num_videos"] = self.test_videos.compute()
        self.test_metrics.reset()
        self.test_videos.reset()
        self.log_dict(values)

    def predict_step(self, batch: dict, batch_idx: int) -> dict | None:
        """``logits [B, T, C]`` (float32, CPU), ``labels [B, L]``, ``index [B]``, ``path`` of every video
        (None for a batch whose videos were all skipped)."""
        if not batch["video"].shape[0]:
            return None
        return self._outputs(batch, self.eval_logits(batch["video"]))

    @staticmethod
    def _outputs(batch: dict, logits: torch.Tensor) -> dict:
        return {
            "logits": logits.float().cpu(),
            "labels": batch["labels"].cpu(),
            "index": torch.as_tensor(batch["index"]).cpu(),
            "path": list(batch["path"]),
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
            # the closed form of the run's own `epochs` (read at every step, not stored in the checkpoint): a
            # run resumed with more epochs follows the new schedule from its current epoch
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
            )
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

    def on_train_start(self) -> None:
        """A resumed run restores the optimiser's learning rates as the checkpoint's run set them; the cosine
        is re-read for the current epoch so that a new ``epochs`` applies from this epoch on."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(
                    scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
                ):
                    group["lr"] = base * factor(scheduler.last_epoch)

    def on_fit_start(self) -> None:
        for logger in self.loggers:  # once per run, step 0 (the loggers exist on rank 0 only)
            logger.log_metrics({"model/gflops": self.gflops_per_video}, step=0)
