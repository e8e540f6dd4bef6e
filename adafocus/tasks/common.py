"""What the tasks share: checks of the composed config; the loggers, callbacks and Trainer it describes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from netrc import netrc
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from adafocus.data.datamodule import BadVideosError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ errors a user can fix
USER_ERRORS = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, InstantiationException, BadVideosError
)  # fmt: skip


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Around a task in an entry point: an error a user can fix (a bad value, a missing or malformed file)
    prints one line naming what is wrong and exits with status 1, instead of a 40-line traceback; with
    HYDRA_FULL_ERROR=1 the traceback is kept, as Hydra does for its own errors."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        while isinstance(err, InstantiationException) and err.__cause__ is not None:
            err = err.__cause__  # the constructor's own message, not Hydra's wrapper
        print(
            f"{type(err).__name__}: {err}\n(HYDRA_FULL_ERROR=1 for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


# ------------------------------------------------------------------ the composed config
def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (what checkpoints store), without Hydra's own node."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra", None)
    return out


def cli_overrides() -> list[str]:
    """The overrides of this Hydra run's command line ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_config(
    cfg: DictConfig, stage: str = "train", train_list: bool | None = None, ckpt_path: str | None = None
) -> None:
    """Catch bad configuration before any work: clear errors, and warnings where the original only warned.

    ``stage``: "train" (train.py) or "eval" (evaluate / predict / early exit: no training list needed, no
    recipe or glance_ckpt warnings since the weights come from a checkpoint). ``train_list``: whether the
    training list must exist (default: for "train"; predictions on the training split need it too)."""
    patch, size = int(cfg.patch), int(cfg.dataset.input_size)
    if not 0 < patch < size:
        raise ValueError(f"patch={patch} must be smaller than the frame size dataset.input_size={size}")
    missing_ratios = {"policy", "glance", "focus", "classifier"} - set(cfg.optim.lr_ratios)
    if missing_ratios:
        raise ValueError(f"optim.lr_ratios lacks {sorted(missing_ratios)} (one ratio per parameter group)")
    ckpt_path = ckpt_path or cfg.get("ckpt_path")  # ckpt_path=last: the train task names the file
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file")
    if cfg.get("init_from") and stage == "train":
        if cfg.get("ckpt_path"):
            raise ValueError(
                "init_from= starts a new run from trained weights, ckpt_path= resumes a run: give one of them"
            )
        if not Path(cfg.init_from).is_file():
            raise FileNotFoundError(f"init_from={cfg.init_from}: no such file")
    if int(cfg.epochs) < 1 and stage == "train":
        raise ValueError(f"epochs={cfg.epochs}: a training run needs at least one epoch")
    if cfg.dataset.get("generate") is None:  # a real dataset: its lists must be where data_dir says
        data_dir = Path(cfg.data_dir)
        needed = [cfg.dataset.val_list, cfg.dataset.class_index]
        if stage == "train" if train_list is None else train_list:
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
    if stage != "train":
        return
    check_checkpoint_config(cfg)
    if cfg.backbone.glance_arch == "res50" and not cfg.backbone.glance_ckpt:
        warnings.warn(
            "backbone=res50 without backbone.glance_ckpt: the 96 px ResNet-50 glance starts from the "
            "224 px ImageNet weights instead of Initialization_model_prime_resnet50_patch_size_96_or_128.pth "
            "(the published recipe)",
            stacklevel=2,
        )
    for knob in ("batch_size", "lr"):
        if float(cfg[knob]) != float(cfg.dataset[knob]):
            warnings.warn(
                f"{knob}={cfg[knob]} differs from the dataset={cfg.dataset.name} recipe's "
                f"{cfg.dataset[knob]} "
                "(batch_size is the total over all devices; the published numbers need the recipe's)",
                stacklevel=2,
            )


def check_checkpoint_config(cfg: DictConfig) -> None:
    """The ``checkpoint`` node: every key is one a checkpoint callback reads (``+checkpoint.typo=1`` is an
    error, not silently ignored), and at most one in-epoch trigger, a positive one."""
    node = cfg.get("checkpoint") or {}
    callbacks = str(OmegaConf.to_container(cfg.get("callbacks") or {}, resolve=False))
    read = set(re.findall(r"\$\{checkpoint\.(\w+)\}", callbacks))
    unread = sorted(set(node) - read)
    if read and unread:
        raise ValueError(
            f"checkpoint.{unread[0]}: no such setting (the checkpoint callbacks read checkpoint."
            + ", checkpoint.".join(sorted(read))
            + ")"
        )
    steps, minutes = node.get("every_n_train_steps"), node.get("every_n_minutes")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"checkpoint.every_n_train_steps={steps}: a number of steps >= 1, or null")
    number = isinstance(minutes, int | float) and not isinstance(minutes, bool)
    if minutes is not None and (not number or minutes <= 0):
        raise ValueError(f"checkpoint.every_n_minutes={minutes}: a number of minutes > 0, or null")
    if steps is not None and minutes is not None:
        raise ValueError(
            f"checkpoint.every_n_train_steps={steps} and checkpoint.every_n_minutes={minutes}: give one of "
            "them (the other =null; real datasets default to checkpoint.every_n_minutes=10)"
        )


def check_world(cfg: DictConfig, trainer: pl.Trainer) -> None:
    """Once the Trainer knows the process count (devices may be "auto"): the total batch must split evenly,
    and a real dataset's recipe on a CPU, or with another BatchNorm batch than the original, is said once."""
    world = trainer.world_size
    if int(cfg.batch_size) % world:
        raise ValueError(
            f"batch_size={cfg.batch_size} is the total over all devices and must be divisible by the "
            f"{world} processes (trainer.devices x trainer.num_nodes)"
        )
    if cfg.dataset.get("generate") is not None or not trainer.is_global_zero:
        return
    if trainer.accelerator.__class__.__name__ == "CPUAccelerator":
        warnings.warn(
            f"dataset={cfg.dataset.name} on the CPU: the published recipe expects GPUs "
            "(trainer=gpu, or trainer=ddp trainer.devices=N)",
            stacklevel=2,
        )
    original = cfg.dataset.get("original_device_batch")
    if original and int(cfg.batch_size) // world != int(original):
        warnings.warn(
            f"BatchNorm normalises over {int(cfg.batch_size) // world} videos per device here; the original "
            f"trained dataset={cfg.dataset.name} on 4 GPUs with DataParallel, {original} videos per GPU "
            f"(batch_size={cfg.batch_size} over {world} process(es))",
            stacklevel=2,
        )


def set_threads(threads: int | None) -> None:
    """``threads``: the compute threads of this process (``torch.set_num_threads``) and of the processes
    Lightning starts for DDP (``OMP_NUM_THREADS``, which its launchers honour); null keeps PyTorch's default
    (one per core; Lightning's DDP on CPUs: cores / processes). Data-loader workers compute with one."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be >= 1 (or null: torch's default), got {threads!r}")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


# ------------------------------------------------------------------ the run directory
@contextlib.contextmanager
def run_dir_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold ``output_dir/.adafocus.lock`` (an OS lock: released when the process ends, even by kill -9) for a
    training run, so that a second run started in the same directory stops at once naming the first; then
    remove the temporaries a killed checkpoint save left in ``checkpoints/``. Global rank 0 only."""
    if rank_zero_only.rank != 0:
        yield
        return
    import fcntl
    import socket

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".adafocus.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise FileExistsError(
                f"{out} is in use by another run ({lock.read().strip() or 'unknown process'}): give this run "
                "its own hydra.run.dir, or wait for that one to end"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        for stale in (out / "checkpoints").glob(".*.tmp"):  # atomic_path's names; nobody else writes here now
            log.warning("removing %s, a checkpoint save that never finished", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_writable(output_dir: str | Path) -> None:
    """A results directory that cannot be written fails now (PermissionError), not after the work."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output_dir={out} cannot be written ({err}): results would be lost") from None


# ------------------------------------------------------------------ resolvers used by conf/logger/wandb.yaml
def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, OSError, ValueError):
        return False


def wandb_offline() -> bool:
    """W&B runs offline with WANDB_MODE=offline or without credentials (wandb login / WANDB_API_KEY)."""
    return os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not _wandb_credentials()


def _sweep() -> tuple[str, str] | None:
    """(group, run name) of a Hydra multirun job: the sweep directory's name (one W&B group per sweep) and
    the job number with its overrides; None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    hc = HydraConfig.get()
    sweep = Path(hc.sweep.dir)
    group = f"{sweep.parent.name}_{sweep.name}" if sweep.parent.name else sweep.name
    shown = [o for o in hc.overrides.task if not o.split("=")[0].lstrip("+~").endswith(("_dir", "_root"))]
    return group, f"{hc.job.num}:{','.join(shown)}"[:120]


def _run_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    sweep = _sweep()
    if sweep:
        return sweep[1]
    return Path(HydraConfig.get().runtime.output_dir).name if HydraConfig.initialized() else None


for _name, _fn in (
    ("adafocus.wandb_offline", wandb_offline),
    ("adafocus.sweep_group", lambda: (_sweep() or (None, None))[0]),
    ("adafocus.run_name", _run_name),
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


# ------------------------------------------------------------------ loggers, callbacks, trainer
def instantiate_loggers(
    cfg: DictConfig, hyperparams: dict | None = None, resume: bool = False
) -> list[Logger]:
    """Every logger of ``cfg.logger`` (a dict of ``_target_`` nodes), plus a CSV log in the run directory
    when none is configured. ``hyperparams``: logged once to each. ``resume``: the run continues in its own
    directory — the CSV log keeps its rows, a W&B logger continues the directory's last run (same id)."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None:
            continue
        wandb_id = (
            _last_wandb_id(node.get("save_dir")) if resume and "wandb" in str(node._target_).lower() else None
        )
        loggers.append(instantiate(node, id=wandb_id, resume="allow") if wandb_id else instantiate(node))
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.append(CSVLogger(cfg.output_dir, name="csv", version=""))
    if resume:
        for lg in loggers:
            if isinstance(lg, CSVLogger):
                _keep_csv_rows(lg)
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._offline and rank_zero_only.rank == 0:
            why = (
                "WANDB_MODE=offline"
                if _wandb_credentials()
                else "no credentials (wandb login / WANDB_API_KEY)"
            )
            sync = f"wandb sync {Path(lg.save_dir) / 'wandb'}/offline-run-*"
            print(f"W&B: {why}, logging offline; upload later with: {sync}", flush=True)  # one unwrapped line
        if hyperparams is not None:
            lg.log_hyperparams(hyperparams)
    return loggers


def _last_wandb_id(save_dir: str | None) -> str | None:
    """The id of the last W&B run in ``save_dir`` (wandb's ``latest-run`` link: ``run-DATE_TIME-ID``)."""
    latest = Path(save_dir or ".") / "wandb" / "latest-run"
    return latest.resolve().name.rsplit("-", 1)[-1] if latest.exists() else None


def _keep_csv_rows(logger: CSVLogger) -> None:
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run keeps its rows."""
    path = Path(logger.log_dir) / "metrics.csv"
    if rank_zero_only.rank != 0 or not path.is_file():
        return
    rows = path.read_text()
    writer = logger.experiment  # deletes the file
    path.write_text(rows)
    writer.metrics_keys = rows.splitlines()[0].split(",") if rows.strip() else []


def instantiate_callbacks(cfg: DictConfig) -> list[Callback]:
    """Every callback of ``cfg.callbacks`` (a dict of ``_target_`` nodes; a null entry is left out)."""
    return [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]


def build_trainer(cfg: DictConfig, **kwargs) -> pl.Trainer:
    """The ``cfg.trainer`` node instantiated, with ``kwargs`` (loggers, callbacks...) given by the task."""
    return instantiate(cfg.trainer, **kwargs)


def finish_wandb(loggers: list[Logger]) -> None:
    """End the W&B run, else the next job of a multirun (same process) logs into it."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def print_summary(title: str, rows: dict[str, str]) -> None:
    """Plain lines, never wrapped or cut: paths must survive any terminal width and log file."""
    print(title, flush=True)
    for key, value in rows.items():
        print(f"  {key:<16} {value}", flush=True)
