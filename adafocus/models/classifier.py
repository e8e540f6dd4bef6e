"""The recurrent pooling classifier: an answer after every frame (SPEC §1.6)."""

from __future__ import annotations

import math

import torch
from torch import nn


class RecurrentPoolingClassifier(nn.Module):
    """Per-frame features ``[B, T, in_dim]`` -> per-step logits ``[B, T, C]``.

    ``z_t = ReLU(BN1d(Linear(x_t)))``; cumulative max over time ``h_t = max(h_{t-1}, z_t)``; a separate head
    per step, ``logits_t = Linear_t(Dropout(h_t))``. The T heads are one batched op over stacked weights
    ``head_weight [T, C, hidden]`` / ``head_bias [T, C]`` (the published ``classifiers.{t}.1`` Linears).
    """

    def __init__(
        self, in_dim: int, num_classes: int, num_steps: int, hidden_dim: int = 4096, dropout: float = 0.2
    ):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout(dropout)
        self.head_weight = nn.Parameter(torch.empty(num_steps, num_classes, hidden_dim))
        self.head_bias = nn.Parameter(torch.empty(num_steps, num_classes))
        bound = 1 / math.sqrt(hidden_dim)  # nn.Linear's default initialisation, per head
        nn.init.uniform_(self.head_weight, -bound, bound)
        nn.init.uniform_(self.head_bias, -bound, bound)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, t, _ = features.shape
        z = self.mlp(features.flatten(0, 1)).view(b, t, -1)  # (B, T, hidden)
        h = z.cummax(dim=1).values  # (B, T, hidden)
        return torch.einsum("bth,tch->btc", self.dropout(h), self.head_weight) + self.head_bias  # (B, T, C)

    def step(
        self, features: torch.Tensor, pooled: torch.Tensor | None, t: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``t`` (0-based) alone: features [B, in_dim] of frame t, ``pooled`` [B, hidden] the running max
        of steps < t (None at t = 0) -> (step t's logits [B, C], the running max including step t)."""
        z = self.mlp(features)  # (B, hidden)
        pooled = z if pooled is None else torch.maximum(pooled, z)
        return self.dropout(pooled) @ self.head_weight[t].T + self.head_bias[t], pooled  # (B, C)
