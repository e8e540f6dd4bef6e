"""Initialise a model from a trained checkpoint for fine-tuning (issue 10): ``init_from_checkpoint``.

Reads a published ``.pth.tar`` (SPEC §6, converted by :mod:`.official`) or one of our Lightning checkpoints
(``state_dict`` keys prefixed ``model.``, the run config in ``hyper_parameters.config``) and loads every
tensor strictly, except that when the class count differs the three classifier heads (glance head, local head,
the T step heads of the recurrent classifier) keep the model's fresh initialisation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adafocus.models.official import from_official_state_dict, state_dict_differences

# the tensors sized by the class count (the recurrent classifier's step heads are stacked: [T, C, ...])
HEADS = (
    "glance_head.1.weight", "glance_head.1.bias", "local_head.1.weight", "local_head.1.bias",
    "classifier.head_weight", "classifier.head_bias",
)  # fmt: skip
_UNUSED_IMAGENET = ("global_CNN.classifier.", "global_CNN.fc.", "local_CNN.fc.")  # dropped by the converter


@dataclass
class InitSummary:
    """What :func:`init_from_checkpoint` did; ``str()`` is one printable block."""

    path: str
    source: str  # "published" or "lightning"
    source_classes: int
    num_classes: int
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # "name: file shape -> model shape"
    missing: list[str] = field(default_factory=list)  # BN counters the file lacks (kept as initialised)
    ignored: list[str] = field(default_factory=list)  # tensors of the file the model has no use for

    def __str__(self) -> str:
        parts = Counter(name.split(".")[0] for name in self.loaded)
        lines = [
            f"init_from {self.path} ({self.source} checkpoint, {self.source_classes} classes -> "
            f"{self.num_classes})",
            f"  loaded ({len(self.loaded)}): " + ", ".join(f"{p} {n}" for p, n in parts.items()),
            f"  re-initialised ({len(self.reinitialised)}): " + (", ".join(self.reinitialised) or "none"),
            f"  missing, kept as initialised ({len(self.missing)}): " + (", ".join(self.missing) or "none"),
            f"  ignored from the file ({len(self.ignored)}): " + (", ".join(self.ignored) or "none"),
        ]
        return "\n".join(lines)


def _read(path: str | Path) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """The file's state dict in our names: (source kind, tensors, ignored names)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"init_from={path}: expected a checkpoint dict with a non-empty 'state_dict'")
    if "hyper_parameters" in checkpoint:  # ours (Lightning): the LightningModule holds the network as `model`
        others = sorted(k for k in state if not k.startswith("model."))
        if others:
            raise ValueError(
                f"init_from={path}: Lightning checkpoint with keys outside 'model.': {others[:10]}"
            )
        return "lightning", {k.removeprefix("model."): v for k, v in state.items()}, []
    plain = [k.removeprefix("module.") for k in state]
    if not any(k.startswith("global_CNN") for k in plain):
        raise ValueError(
            f"init_from={path}: neither a published AdaFocusV2 file (keys 'module.global_CNN...') nor a "
            f"Lightning checkpoint of ours ('hyper_parameters'); keys: {sorted(state)[:10]}"
        )
    ignored = sorted(k for k in state if k.removeprefix("module.").startswith(_UNUSED_IMAGENET))
    return "published", from_official_state_dict(state), ignored


def init_from_checkpoint(model: nn.Module, path: str | Path) -> InitSummary:
    """Load ``path`` into ``model`` (an :class:`AdaFocusV2`) for fine-tuning; return the summary.

    Every tensor is loaded strictly except: when the file's class count differs from the model's, the
    :data:`HEADS` keep the model's values; BatchNorm ``num_batches_tracked`` counters a file lacks keep
    theirs.
    Any other missing, unexpected or differently shaped tensor is a ``ValueError`` naming it (shapes of both)
    and nothing is loaded.
    """
    source, state, ignored = _read(path)
    own = model.state_dict()
    if "glance_head.1.weight" not in state:
        raise ValueError(f"init_from={path}: no glance head ('glance_head.1.weight') to read the class count")
    source_classes, num_classes = state["glance_head.1.weight"].shape[0], own["glance_head.1.weight"].shape[0]
    reinit = list(HEADS) if source_classes != num_classes else []
    missing, unexpected, mismatched = state_dict_differences(own, state, ignore=set(reinit))
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in counters]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"init_from={path} ({source} checkpoint) does not fit the model:\n"
            f"  shape-mismatched ({len(mismatched)}): {mismatched[:20]}\n"
            f"  missing ({len(missing)}): {missing[:20]}\n"
            f"  unexpected ({len(unexpected)}): {unexpected[:20]}"
        )
    loaded = sorted(k for k in state if k not in reinit)
    # the kept tensors are passed as themselves, so the load stays strict over every key
    model.load_state_dict({**{k: state[k] for k in loaded}, **{k: own[k] for k in reinit + counters}})
    return InitSummary(
        path=str(path),
        source=source,
        source_classes=int(source_classes),
        num_classes=int(num_classes),
        loaded=loaded,
        reinitialised=[f"{k}: file {tuple(state[k].shape)} -> model {tuple(own[k].shape)}" for k in reinit],
        missing=counters,
        ignored=ignored,
    )
