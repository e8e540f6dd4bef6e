"""Backbone registry: torchvision trunks by name (a new trunk is one entry).

A trunk maps ``[N, 3, H, W]`` frames to a feature map ``[N, dim, h, w]``; parameter names follow
torchvision (``features.N...`` for MobileNets, ``conv1``/``bn1``/``layer1``... for ResNets), which is
what the published checkpoints use (SPEC §6).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm


@dataclass(frozen=True)
class Backbone:
    """How to build one trunk. ``resize``/``resize_mode``: the glance's default input resolution."""

    build: Callable[[], nn.Module]  # () -> trunk with random weights
    weights: tvm.WeightsEnum | None  # torchvision's ImageNet weights for pretrained=True (None: none exist)
    dim: int  # channels of the output map
    resize: int | None = None  # glance input size (None = the full frame)
    resize_mode: str = "bilinear"
    weights_prefix: str = ""  # where the trunk sits in torchvision's weights ("features." for MobileNets)


def _resnet_trunk(resnet: nn.Module) -> nn.Module:
    """ResNet without its pooling/fc, keeping torchvision's names: ``[N,3,H,W] -> [N,dim,H/32,W/32]``."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in names))


def _mbv2() -> nn.Module:
    return tvm.mobilenet_v2().features  # [N, 1280, H/32, W/32]


def _res10_l3() -> nn.Module:
    # ResNet-10 (one BasicBlock per stage) up to layer3, [N, 256, H/16, W/16]: the CPU demo's focus network.
    # On 32 px patches layer4 runs on a 1x1 map (its 3x3 kernels see one pixel) yet held half the weights
    # and about a third of a training step; without it a step takes 114 -> 79 ms (measured, see README).
    # torchvision has no weights for it.
    trunk = _resnet_trunk(tvm.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1]))
    del trunk.layer4
    return trunk


def _mbv3s() -> nn.Module:
    # The MobileNetV3-Small stem (conv 3x3 s2 + BN + Hardswish), [N, 16, H/2, W/2]: the CPU demo's glance
    # sees an 18 px view; a deeper trunk only blurs where the object is (measured, see README).
    return tvm.mobilenet_v3_small().features[:1]


BACKBONES: dict[str, Backbone] = {
    "mbv2": Backbone(_mbv2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, 1280, weights_prefix="features."),
    "res50": Backbone(
        lambda: _resnet_trunk(tvm.resnet50()), tvm.ResNet50_Weights.IMAGENET1K_V1, 2048, resize=96
    ),
    "mbv3s": Backbone(
        _mbv3s,
        tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
        16,
        resize_mode="area",
        weights_prefix="features.",
    ),
    "res18": Backbone(lambda: _resnet_trunk(tvm.resnet18()), tvm.ResNet18_Weights.IMAGENET1K_V1, 512),
    "res10_l3": Backbone(_res10_l3, None, 256),
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def imagenet_state_dict(weights: tvm.WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights through the torch hub cache; a clear error when they cannot be had."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as err:  # no network, proxy, partial file...
        raise RuntimeError(
            f"ImageNet weights {weights} are not in the torch hub cache and could not be downloaded ({err}). "
            f"Put the file at {cached} (from {weights.url}), or train from scratch with "
            "backbone.pretrained=false."
        ) from err


def build_trunk(name: str, pretrained: bool) -> nn.Module:
    """The trunk of backbone ``name``, with torchvision's ImageNet weights when ``pretrained``."""
    spec = get_backbone(name)
    trunk = spec.build()
    if pretrained and spec.weights is None:
        with_weights = ", ".join(k for k, v in BACKBONES.items() if v.weights)
        raise ValueError(
            f"backbone {name!r} has no ImageNet weights in torchvision: set backbone.pretrained=false "
            f"(train it from scratch) or pick one of {with_weights}"
        )
    if pretrained:
        # The trunk keeps torchvision's parameter names, minus the classifier / fc it does not have.
        state = imagenet_state_dict(spec.weights)
        own = trunk.state_dict()
        prefix = spec.weights_prefix
        picked = {
            k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own
        }
        trunk.load_state_dict(picked, strict=True)
    # Channels-last weights: the convolutions (and the activations after the first) run NHWC, which oneDNN
    # and cuDNN compute without reordering. Measured on CPU (README "Model profile", "The default run"): the
    # full-size mbv2/res50 P128 eager forward 0.94 -> 0.74 s, depthwise convolutions above all. The values,
    # names and shapes of the parameters are unchanged (checkpoints load either way).
    return trunk.to(memory_format=torch.channels_last)
