"""The published AdaFocusV2 checkpoints (SPEC §6): key layout conversion both ways and loading.

Published files ``{actnet,fcvid,minik}_p{96,128,160}_{mbv2,res50}.pth.tar`` hold ``{"state_dict": ...}`` with
DataParallel's ``module.`` prefix; their MobileNetV2 nests the inverted residual blocks differently from
torchvision (``conv.{0,1,3,4,6,7}`` for ``conv.0.0, conv.0.1, conv.1.0, conv.1.1, conv.2, conv.3``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# torchvision MobileNetV2 inverted-residual sub-keys <-> the published flat indices
_MBV2_EXPANDED = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}
_MBV2_FIRST = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}  # features.1 has no expansion conv


def _mbv2_to_official(key: str) -> str:
    m = re.match(r"(\d+)\.conv\.(\d+(?:\.\d+)?)\.(\w+)$", key)
    if not m:
        return key  # stem features.0.*, last features.18.*
    block, sub, param = m.groups()
    table = _MBV2_FIRST if block == "1" else _MBV2_EXPANDED
    return f"{block}.conv.{table[sub]}.{param}"


def _mbv2_from_official(key: str) -> str:
    m = re.match(r"(\d+)\.conv\.(\d+)\.(\w+)$", key)
    if not m:
        return key
    block, sub, param = m.groups()
    table = {v: k for k, v in (_MBV2_FIRST if block == "1" else _MBV2_EXPANDED).items()}
    if sub not in table:
        raise KeyError(f"features.{block}.conv.{sub}")
    return f"{block}.conv.{table[sub]}.{param}"


def to_official_state_dict(model) -> dict[str, torch.Tensor]:
    """Our model's state dict in the published layout (``module.`` prefix, original names)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        part, _, rest = key.partition(".")
        if part == "glance":  # glance.trunk.*
            rest = rest.removeprefix("trunk.")
            if rest.split(".")[0].isdigit():  # MobileNetV2 features
                out[f"global_CNN.features.{_mbv2_to_official(rest)}"] = value
            else:
                out[f"global_CNN.{rest}"] = value
        elif part == "glance_head":
            out[f"global_CNN_fc.{rest}"] = value
        elif part == "focus":
            out[f"local_CNN.{rest}"] = value
        elif part == "local_head":
            out[f"local_CNN_fc.{rest}"] = value
        elif part == "policy":
            out[f"policy_stn.{rest}"] = value
        elif part == "classifier":
            if rest.startswith("mlp."):
                out[f"classifier.mlp.layers.{rest.removeprefix('mlp.')}"] = value
            elif rest in ("head_weight", "head_bias"):
                for t in range(value.shape[0]):
                    name = "weight" if rest == "head_weight" else "bias"
                    out[f"classifier.classifiers.{t}.1.{name}"] = value[t].clone()
            else:
                raise KeyError(key)
        else:
            raise KeyError(key)
    return {f"module.{k}": v for k, v in out.items()}


def from_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A published state dict -> our names. Drops the unused ImageNet classifier / fc of the two CNNs."""
    heads: dict[str, dict[int, torch.Tensor]] = {"weight": {}, "bias": {}}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(("global_CNN.classifier.", "global_CNN.fc.", "local_CNN.fc.")):
            continue  # the ImageNet classifiers the original keeps but never uses
        if key.startswith("global_CNN.features."):
            out["glance.trunk." + _mbv2_from_official(key.removeprefix("global_CNN.features."))] = value
        elif key.startswith("global_CNN."):
            out["glance.trunk." + key.removeprefix("global_CNN.")] = value
        elif key.startswith("global_CNN_fc."):
            out["glance_head." + key.removeprefix("global_CNN_fc.")] = value
        elif key.startswith("local_CNN."):
            out["focus." + key.removeprefix("local_CNN.")] = value
        elif key.startswith("local_CNN_fc."):
            out["local_head." + key.removeprefix("local_CNN_fc.")] = value
        elif key.startswith("policy_stn."):
            out["policy." + key.removeprefix("policy_stn.")] = value
        elif key.startswith("classifier.mlp.layers."):
            out["classifier.mlp." + key.removeprefix("classifier.mlp.layers.")] = value
        elif m := re.match(r"classifier\.classifiers\.(\d+)\.1\.(weight|bias)$", key):
            heads[m.group(2)][int(m.group(1))] = value
        else:
            out[key] = value  # reported as unexpected by the caller
    for name, per_step in heads.items():
        if per_step:
            steps = sorted(per_step)
            if steps != list(range(len(steps))):
                raise ValueError(f"classifier heads are not numbered 0..T-1: {steps}")
            out[f"classifier.head_{name}"] = torch.stack([per_step[t] for t in steps])
    return out


def infer_config(state: dict[str, torch.Tensor], path: str | Path = "") -> dict:
    """What the published tensors (and file name) say about the model: arch, classes, frames, patch."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    cfg: dict = {}
    if "global_CNN.features.0.0.weight" in state:
        cfg["glance_arch"] = "mbv2"
    elif "global_CNN.conv1.weight" in state:
        cfg["glance_arch"] = "res50"
    if "global_CNN_fc.1.weight" in state:
        cfg["num_classes"] = state["global_CNN_fc.1.weight"].shape[0]
    steps = {int(m.group(1)) for k in state if (m := re.match(r"classifier\.classifiers\.(\d+)\.", k))}
    if steps:
        cfg["num_frames"] = max(steps) + 1
    if "policy_stn.gru.weight_hh_l0" in state:
        cfg["stn_hidden_dim"] = state["policy_stn.gru.weight_hh_l0"].shape[1]
    if "classifier.mlp.layers.0.weight" in state:
        cfg["classifier_dim"] = state["classifier.mlp.layers.0.weight"].shape[0]
    if m := re.search(r"_p(\d+)_", Path(path).name):
        cfg["patch_size"] = int(m.group(1))
    return cfg


def state_dict_differences(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], ignore: set[str] = frozenset()
) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` (a file's tensors) differs from ``own`` (a model's), leaving out ``ignore``: the missing
    and unexpected keys, and the keys of both whose shapes differ (all sorted)."""
    missing = sorted(set(own) - set(state) - ignore)
    unexpected = sorted(set(state) - set(own) - ignore)
    mismatched = sorted(k for k in (set(own) & set(state)) - ignore if own[k].shape != state[k].shape)
    return missing, unexpected, mismatched


def load_official_checkpoint(cls, path: str | Path, **kwargs):
    """Build ``cls`` (AdaFocusV2) for a published checkpoint and load it strictly.

    ``num_classes``, ``num_frames``, ``glance_arch``, ``stn_hidden_dim`` and (from the file name)
    ``patch_size`` are inferred when not given. Any key missing, unexpected or of another shape is an
    error listing them.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: not an AdaFocusV2 checkpoint (expected a dict with a 'state_dict')")
    config = {"pretrained": False, **infer_config(state, path), **kwargs}
    if "num_classes" not in config:  # no glance head: not an AdaFocusV2 state dict
        raise ValueError(
            f"{path}: not an AdaFocusV2 checkpoint (no 'module.global_CNN_fc.1.weight' to infer num_classes "
            f"from; keys: {sorted(state)[:10]})"
        )
    model = cls(**config)
    converted = from_official_state_dict(state)
    own = model.state_dict()
    missing, unexpected, mismatched = state_dict_differences(own, converted)
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not match AdaFocusV2({config}):\n"
            f"  missing ({len(missing)}): {missing[:20]}\n"
            f"  unexpected ({len(unexpected)}): {unexpected[:20]}\n"
            f"  shape-mismatched ({len(mismatched)}): {mismatched[:20]}"
        )
    model.load_state_dict(converted, strict=True)
    return model
