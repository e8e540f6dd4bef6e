"""Streaming inference (issue 11): AdaFocusV2.step frame by frame equals the whole-clip forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adafocus.models import POLICIES, AdaFocusV2


def tiny(**kwargs) -> AdaFocusV2:
    args = dict(num_classes=5, glance_arch="mbv3s", focus_arch="res18", patch_size=16, num_frames=5,
                input_size=48, stn_hidden_dim=32, classifier_dim=64, pretrained=False)  # fmt: skip
    return AdaFocusV2(**{**args, **kwargs})


def stream(model: AdaFocusV2, video: torch.Tensor, policy=None) -> tuple[list, object]:
    state = model.init_state(video.shape[0], policy)
    outs = []
    for t in range(video.shape[1]):
        out, state = model.step(video[:, t], state)
        outs.append(out)
    return outs, state


class ReplayPolicy(nn.Module):
    """Plays back given actions [B, T, k]: the same patches for forward and step (any k, e.g. 3 = sizes)."""

    def __init__(self, actions: torch.Tensor):
        super().__init__()
        self.recorded = actions

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.recorded

    def step(self, feature_map: torch.Tensor, state: int | None) -> tuple[torch.Tensor, int]:
        t = 0 if state is None else state
        return self.recorded[:, t], t + 1


def assert_same(outs, whole, atol=2e-5):
    assert [o.step for o in outs] == list(range(whole.logits.shape[1]))
    logits = torch.stack([o.logits for o in outs], dim=1)  # (B, T, C)
    actions = torch.stack([o.action for o in outs], dim=1)  # (B, T, 2)
    torch.testing.assert_close(logits, whole.logits, atol=atol, rtol=1e-4)
    torch.testing.assert_close(actions, whole.actions, atol=atol, rtol=1e-4)
    conf = torch.stack([o.confidence for o in outs], dim=1)  # (B, T)
    torch.testing.assert_close(conf, whole.logits.softmax(-1).amax(-1), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("policy", [p for p in sorted(POLICIES) if p != "random"])
@pytest.mark.parametrize("glance_size", [None, 24])  # whole frame / resized glance view
def test_step_by_step_equals_the_whole_clip(policy, glance_size):
    torch.manual_seed(0)
    model = tiny(glance_size=glance_size).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so eval-mode BN matters
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    video = torch.randn(3, 5, 3, 48, 48)
    with torch.no_grad():
        whole = model(video, policy=policy)
    outs, state = stream(model, video, policy)
    assert_same(outs, whole)
    assert state.step == 5 and state.pooled.shape == (3, 64)
    if policy == "learned":
        assert state.policy_state.shape == (1, 3, 32)  # the GRU's hidden state is carried
        assert not torch.allclose(outs[1].action, outs[2].action)  # and the policy moves


def test_random_policy_streams_with_fresh_draws_per_frame():
    """The random policy's draws differ between forward and step; the rest of the model is the same."""
    torch.manual_seed(0)
    model = tiny().eval()
    video = torch.randn(2, 5, 3, 48, 48)
    outs, _ = stream(model, video, "random")
    actions = torch.stack([o.action for o in outs], dim=1)  # (B, T, 2)
    assert actions.min() >= 0 and actions.max() <= 1 and len(set(actions.flatten().tolist())) == 20
    with torch.no_grad():
        whole = model(video, policy=ReplayPolicy(actions))
    assert_same(outs, whole)


def test_scale_aware_actions_stream_too():
    """Actions [B, T, 3] (a patch side per frame) take the same sizes path in step as in forward."""
    torch.manual_seed(0)
    model = tiny().eval()
    video = torch.randn(2, 5, 3, 48, 48)
    actions = torch.cat([torch.rand(2, 5, 2), 0.2 + 0.6 * torch.rand(2, 5, 1)], dim=-1)
    with torch.no_grad():
        whole = model(video, policy=ReplayPolicy(actions))
    outs, _ = stream(model, video, ReplayPolicy(actions))
    assert_same(outs, whole)


def test_step_errors():
    model = tiny()
    frame = torch.randn(2, 3, 48, 48)
    with pytest.raises(RuntimeError, match="model.eval"):
        model.step(frame, model.init_state(2))
    model.eval()
    state = model.init_state(2)
    with pytest.raises(ValueError, match=r"\[2, 3, 48, 48\]"):
        model.step(torch.randn(1, 3, 48, 48), state)
    with pytest.raises(ValueError, match="NaN"):
        model.step(torch.full((2, 3, 48, 48), float("nan")), state)
    with pytest.raises(ValueError, match="learned"):
        model.init_state(2, "somewhere")
    with pytest.raises(TypeError, match="step"):
        model.init_state(2, nn.Identity())
    _, state = stream(model, torch.randn(2, 5, 3, 48, 48))
    with pytest.raises(ValueError, match="all 5 steps"):
        model.step(frame, state)
