"""Where the focus looks: the learned policy network ("STN" in the original) and fixed baselines (SPEC §1.3).

A policy maps the glance feature maps ``[B, T, C, h, w]`` (already detached: no policy trains the glance)
to actions ``[B, T, 2]`` (patch row, col in [0, 1]) or ``[B, T, 3]`` (plus the patch side as a fraction of
the frame side, for scale-aware policies). It is built from the glance map's shape,
``policy_cls(in_channels=C, map_size=(h, w), ...)``, so a new policy is one class here (or anywhere,
by ``_target_``) plus one file in ``conf/policy/``.

Streaming (``AdaFocusV2.step``): a policy also has ``step(feature_map [B, C, h, w], state) -> (actions
[B, 2|3], state)``, one frame at a time; ``state`` is None before the first frame and whatever the policy
returned after it (the GRU's hidden state for :class:`PolicyNetwork`, None for the fixed policies).
"""

from __future__ import annotations

import torch
from torch import nn


class PolicyNetwork(nn.Module):
    """The learned policy: encoder (per frame) conv 1x1 (C -> 64, no bias) -> BN2d -> Tanh -> flatten ->
    Linear(64*h*w -> hidden) -> BN1d -> Tanh; a one-layer GRU over the T frames (zero initial state, so
    action t depends on frames 1..t only); head Linear(hidden -> 2) -> Sigmoid. Module indices follow the
    published checkpoints.
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

    def step(
        self, feature_map: torch.Tensor, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame: feature_map [B, C, h, w], GRU hidden [1, B, hidden] (None: zeros) -> action [B, 2] and
        the new hidden state. The same GRU run on a length-1 sequence, so T steps equal :meth:`forward`."""
        x = self.encoder(feature_map)  # (B, hidden)
        x, hidden = self.gru(x.unsqueeze(1), hidden)  # (B, 1, hidden), (1, B, hidden)
        return self.fc(x[:, 0]), hidden  # (B, 2)


class RandomPolicy(nn.Module):
    """Uniformly random patch positions, ``U[0, 1]^2`` per frame: training's diversity pass (SPEC §2) and the
    paper's random-patch ablation. ``in_channels`` / ``map_size``: the policy contract; unused."""

    def __init__(self, in_channels: int | None = None, map_size: tuple[int, int] | None = None):
        super().__init__()

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        b, t = feature_map.shape[:2]
        return torch.rand(b, t, 2, device=feature_map.device, dtype=feature_map.dtype)  # (B, T, 2)

    def step(self, feature_map: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        """One frame [B, C, h, w] -> action [B, 2]; stateless."""
        return self(feature_map.unsqueeze(1))[:, 0], state


class CenterPolicy(nn.Module):
    """The centre patch on every frame (the paper's centre-patch ablation). Arguments as RandomPolicy."""

    def __init__(self, in_channels: int | None = None, map_size: tuple[int, int] | None = None):
        super().__init__()

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map.new_full((*feature_map.shape[:2], 2), 0.5)  # (B, T, 2)

    def step(self, feature_map: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        """One frame [B, C, h, w] -> action [B, 2]; stateless."""
        return self(feature_map.unsqueeze(1))[:, 0], state


POLICIES: dict[str, type[nn.Module]] = {
    "learned": PolicyNetwork,
    "random": RandomPolicy,
    "center": CenterPolicy,
}
