"""The policy network ("STN" in the original) that picks where the focus looks (SPEC §1.3)."""

from __future__ import annotations

import torch
from torch import nn


class PolicyNetwork(nn.Module):
    """Glance feature maps ``[B, T, C, h, w]`` -> actions ``[B, T, 2]`` (row, col in [0, 1]).

    encoder (per frame): conv 1x1 (C -> 64, no bias) -> BN2d -> Tanh -> flatten -> Linear(64*h*w -> hidden)
    -> BN1d -> Tanh; a one-layer GRU over the T frames (zero initial state, so action t depends on frames
    1..t only); head: Linear(hidden -> 2) -> Sigmoid. Module indices follow the published checkpoints.
    """

    def __init__(self, in_channels: int, map_size: tuple[int, int], hidden_dim: int = 2048):
        super().__init__()
        h, w = map_size
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=1, bias=False),
            nn.BatchNorm2d(64),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(64 * h * w, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.Tanh(),
        )
        self.gru = nn.GRU(hidden_dim, hidden_dim, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(hidden_dim, 2), nn.Sigmoid())

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        b, t = feature_map.shape[:2]
        x = self.encoder(feature_map.flatten(0, 1))  # (B*T, hidden)
        x, _ = self.gru(x.view(b, t, -1))  # (B, T, hidden)
        return self.fc(x)  # (B, T, 2)
