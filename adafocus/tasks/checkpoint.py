"""The model to run from ``ckpt_path`` and the config it runs with: one of our checkpoints (its stored config,
with this command's runtime settings merged in) or a published AdaFocusV2 ``.pth.tar`` (told apart by
content)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adafocus.module import AdaFocusModule
from adafocus.tasks.common import cli_overrides, plain_config

_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")
_REFERENCE = re.compile(r"\$\{([\w.]+)\}")
RUN_NODES = ("output_dir", "ckpt_path", "trainer", "logger", "callbacks")  # how and where this command runs


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"ckpt_path={path} cannot be read as a checkpoint (torch.load with weights_only=True): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"ckpt_path={path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def is_lightning_checkpoint(ckpt: dict) -> bool:
    return "pytorch-lightning_version" in ckpt and "hyper_parameters" in ckpt


def _override_keys(overrides: list[str]) -> set[str]:
    """Keys a command line sets: ``dataset=actnet`` -> "dataset", ``+trainer.x=1`` -> "trainer.x"."""
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.add(key.split("@", 1)[0].replace("/", "."))
    return keys


def _touched(key: str, user_keys: set[str]) -> bool:
    """Whether a user override sets ``key``, or a node above or below it."""
    return any(k == key or key.startswith(k + ".") or k.startswith(key + ".") for k in user_keys)


def model_changes(cfg: DictConfig, stored_model: dict, user_keys: set[str]) -> dict[str, tuple[Any, Any]]:
    """Model arguments this command line sets (directly, ``model.X=``, or through what they interpolate:
    ``patch``, ``backbone.*``, ``dataset.num_classes``...) to a value other than the checkpoint's:
    ``{argument: (checkpoint's, command line's)}``."""
    changes = {}
    for name, raw in OmegaConf.to_container(cfg.model, resolve=False).items():
        if name in ("_target_", "policy"):  # the policy on the command line is the evaluation's, see below
            continue
        source = _INTERPOLATION.match(raw) if isinstance(raw, str) else None
        sources = {f"model.{name}"} | ({source.group(1)} if source else set())
        if not any(_touched(s, user_keys) for s in sources):
            continue
        value = cfg.model[name]
        if name in stored_model and stored_model[name] != value:
            changes[name] = (stored_model[name], value)
    return changes


def load_module(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[AdaFocusModule, DictConfig]:
    """The module to run and its config, from ``cfg.ckpt_path``.

    Our checkpoints: the stored config is the base; the values this command line sets (``overrides``, default:
    Hydra's) are merged over it by OmegaConf's rules, and everything the stored config lacks (the task's own
    knobs) comes from ``cfg``. So the model is always the checkpoint's: a command-line value that would build
    a different one (``patch=48`` on a patch-32 checkpoint) is an error listing the differences, unless
    ``allow_model_override=true``. ``policy=random|center|...`` sets the policy the evaluation uses instead of
    the model's own. Published ``.pth.tar`` files: backbone, classes, frames and patch come from the file,
    the dataset from the command line.
    """
    if not cfg.get("ckpt_path"):
        raise ValueError(
            "ckpt_path=FILE is required: a checkpoint of ours or a published AdaFocusV2 .pth.tar"
        )
    path = Path(cfg.ckpt_path)
    ckpt = read_checkpoint(path)
    user_keys = _override_keys(cli_overrides() if overrides is None else overrides)
    # another policy than the trained one for the evaluation (the paper's ablation): policy=random|center|...
    eval_policy = instantiate(cfg.policy) if "policy" in user_keys else None
    if is_lightning_checkpoint(ckpt):
        stored = OmegaConf.create(ckpt["hyper_parameters"]["config"])
        changes = model_changes(cfg, stored.model, user_keys)
        if changes and not cfg.get("allow_model_override", False):
            listed = "; ".join(
                f"model.{k}: checkpoint {a!r}, command line {b!r}" for k, (a, b) in changes.items()
            )
            raise ValueError(
                f"{path} was trained with another model than this command line asks for ({listed}). The "
                "model always comes from the checkpoint: drop those overrides, or allow_model_override=true"
            )
        run_cfg = merged_config(cfg, stored, user_keys)
        run_cfg.model = OmegaConf.merge(run_cfg.model, {k: b for k, (_, b) in changes.items()})
        module = AdaFocusModule(plain_config(run_cfg), eval_policy=eval_policy)
        module.load_state_dict(ckpt["state_dict"], strict=True)
    else:
        run_cfg, module = _published(cfg, path, user_keys, eval_policy)
    return module, run_cfg


def merged_config(cfg: DictConfig, stored: DictConfig, user_keys: set[str]) -> DictConfig:
    """The config a stored run is evaluated with: the stored config; over it, the machinery Hydra composes for
    every run anew (``RUN_NODES``) and the values this command line sets; from ``cfg`` whatever the stored
    config lacks (the task's own knobs). The ``data`` node is re-resolved from ``cfg``'s interpolations
    against the result, so that ``data_dir=``, ``dataset.skip_bad_eval=``... reach the data module."""
    here = OmegaConf.create(plain_config(cfg))
    for key, raw in OmegaConf.to_container(cfg, resolve=False).items():  # data_dir from a new data_root...
        if isinstance(raw, str) and any(_touched(r, user_keys) for r in _REFERENCE.findall(raw)):
            user_keys = user_keys | {key}
    run = OmegaConf.merge(
        {k: v for k, v in here.items() if k not in stored},
        stored,
        {k: here[k] for k in RUN_NODES if k in here},
    )
    for key in user_keys:
        if (
            key != "policy"
            and key.split(".")[0] not in ("model", "data")
            and OmegaConf.select(here, key) is not None
        ):
            OmegaConf.update(run, key, OmegaConf.select(here, key), force_add=True)
    run.data = OmegaConf.to_container(cfg.data, resolve=False)
    OmegaConf.resolve(run)
    for key in user_keys:  # an explicit data.X= wins over the interpolated value
        if key.startswith("data."):
            OmegaConf.update(run, key, OmegaConf.select(here, key), force_add=True)
    return run


def _published(
    cfg: DictConfig, path: Path, user_keys: set[str], eval_policy
) -> tuple[DictConfig, AdaFocusModule]:
    from adafocus.models import AdaFocusV2

    kwargs = {"input_size": int(cfg.dataset.input_size), "glance_size": cfg.model.glance_size}
    if "patch" in user_keys or "_p" not in path.name:
        kwargs["patch_size"] = int(cfg.patch)
    if any(_touched("backbone", {k}) for k in user_keys):  # else: the archs the tensors say
        kwargs.update(glance_arch=cfg.model.glance_arch, focus_arch=cfg.model.focus_arch)
    model = AdaFocusV2.from_official_checkpoint(path, **kwargs)
    if model.num_classes != int(cfg.dataset.num_classes):
        raise ValueError(
            f"{path} has {model.num_classes} classes but dataset={cfg.dataset.name} has "
            f"{cfg.dataset.num_classes}: pass the dataset the checkpoint was trained on"
        )
    run_cfg = OmegaConf.create(plain_config(cfg))
    run_cfg.patch = run_cfg.model.patch_size = model.patch_size
    run_cfg.num_frames = run_cfg.model.num_frames = run_cfg.data.num_frames = model.num_frames
    run_cfg.model.glance_arch, run_cfg.model.focus_arch = model.glance_arch, model.focus_arch
    return run_cfg, AdaFocusModule(plain_config(run_cfg), model=model, eval_policy=eval_policy)


def build_datamodule(run_cfg: DictConfig, **kwargs):
    """The data module of ``run_cfg.data`` (``kwargs``: e.g. the split a prediction runs on)."""
    return instantiate(run_cfg.data, **kwargs)
