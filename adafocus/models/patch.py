"""Differentiable patch selection (SPEC §1.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchExtractor(nn.Module):
    """Read a ``P x P`` patch at each action from its frame by bilinear interpolation.

    frames ``[N, 3, H, W]``, actions ``[N, 2]`` (row, col in [0, 1]) -> patches ``[N, 3, P, P]``. The patch's
    top-left corner is ``(a_row * (H - P), a_col * (W - P))`` (continuous); one ``affine_grid`` +
    ``grid_sample`` (zero padding, ``align_corners=False``) for all frames, so the loss's gradient reaches the
    actions through the interpolation weights.

    ``sizes`` ``[N]`` (optional, pixels): read a square region of that side instead of ``P`` (resampled to
    ``P x P``), its corner at ``a * (H - size)`` — a per-frame patch scale, as Uni-AdaFocus' policies choose.
    """

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(
        self, frames: torch.Tensor, actions: torch.Tensor, sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, c, h, w = frames.shape
        p = self.patch_size
        side = p if sizes is None else sizes  # (N,) or the int P
        y1 = actions[:, 0] * (h - side)  # (N,) top-left row
        x1 = actions[:, 1] * (w - side)
        theta = frames.new_zeros(n, 2, 3)  # maps patch coords to frame coords, normalised to [-1, 1]
        theta[:, 0, 0] = side / w
        theta[:, 1, 1] = side / h
        theta[:, 0, 2] = -1 + (2 * x1 + side) / w  # patch centre, x
        theta[:, 1, 2] = -1 + (2 * y1 + side) / h  # patch centre, y
        grid = F.affine_grid(theta, [n, c, p, p], align_corners=False)  # (N, P, P, 2)
        return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
