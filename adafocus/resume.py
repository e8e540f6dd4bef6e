"""What a run needs to resume where a kill left it: ``last.ckpt`` inside epochs and before validation, and the
random states in every checkpoint (the training loader's place in the epoch: adafocus.data.resumable)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.callbacks import Callback, ModelCheckpoint


class ProgressCheckpoint(ModelCheckpoint):
    """``last.ckpt`` while an epoch runs, so that a kill or a crash loses minutes, not an epoch.

    Written every ``every_n_train_steps`` optimizer steps or every ``every_n_minutes`` of training
    (Lightning's ``train_time_interval``; one of the two, or neither), and, during fit, once the training
    batches before a validation are done and before that validation starts (an epoch without validation: at
    its end). Only ``last.ckpt`` (nothing with ``save_last=False``): the best checkpoint's callback rewrites
    it after validation, with the validation's results. An epoch's last batch is not saved by the step or
    time trigger: Lightning resumes such a checkpoint by skipping the epoch-end and next-epoch-start hooks,
    the pre-validation one (saved a moment later) resumes cleanly."""

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = None,
        save_last: bool = True,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            save_last=save_last,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=None if every_n_minutes is None else timedelta(minutes=every_n_minutes),
            every_n_epochs=0,
            enable_version_counter=False,  # one last.ckpt, shared with the best checkpoint's callback
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, pl_module, *args)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_last(trainer)  # after a validation this step is saved already

    def _save_last(self, trainer: pl.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # fit only, no sanity check, once per step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RandomStates(Callback):
    """The main process's random states (torch, CUDA, numpy, Python) in every checkpoint, put back when a
    resumed run starts training: at ``on_train_start``, after the loaders were rebuilt and the sanity check
    ran, so that data sampling, augmentation, dropout and random patches continue as in an uninterrupted run.
    (Validation draws nothing from these states: its loader has its own generator.)"""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        name, keys, pos, has_gauss, gauss = states["numpy"]
        keys = torch.from_numpy(keys.astype(np.int64))  # checkpoints load with weights_only=True: no ndarray
        states["numpy"] = (name, keys, pos, has_gauss, gauss)
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        states = dict(self._loaded)
        name, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
        if len(states.get("torch.cuda", [])) != torch.cuda.device_count():
            states.pop("torch.cuda", None)  # another machine's GPUs: their draws start from the seed
        _set_rng_states(states)
        self._loaded = None
