"""The glance: a cheap CNN that sees every whole frame (SPEC §1.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GlanceNetwork(nn.Module):
    """Frames ``[N, 3, H, W]`` -> feature map ``[N, dim, h, w]``, optionally on a resized view.

    ``resize``: the glance's input resolution (res50: 96, bilinear with ``align_corners=True`` as the
    original; the CPU demo's ``mbv3s``: an exact area downsample), ``None`` for the full frame.
    """

    def __init__(self, trunk: nn.Module, dim: int, resize: int | None = None, resize_mode: str = "bilinear"):
        super().__init__()
        self.trunk = trunk
        self.dim = dim
        self.resize = resize
        self.resize_mode = resize_mode

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.resize is not None and frames.shape[-1] != self.resize:
            if self.resize_mode == "area":
                frames = F.interpolate(frames, size=(self.resize, self.resize), mode="area")
            else:
                frames = F.interpolate(
                    frames, size=(self.resize, self.resize), mode="bilinear", align_corners=True
                )
        return self.trunk(frames)
