"""AdaFocusV2 (CVPR 2022): glance, policy, differentiable focus, recurrent classifier (SPEC §1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from adafocus.models.backbones import build_trunk, get_backbone
from adafocus.models.classifier import RecurrentPoolingClassifier
from adafocus.models.glance import GlanceNetwork
from adafocus.models.patch import PatchExtractor
from adafocus.models.policy import POLICIES, PolicyNetwork


@dataclass
class GlanceOutput:
    feature_map: torch.Tensor  # [B, T, Cg, h, w]
    features: torch.Tensor  # [B, T, Cg] (spatial mean)
    global_logits: torch.Tensor  # [B, T, C]


@dataclass
class AdaFocusOutput:
    logits: torch.Tensor  # [B, T, C] per-step classifier logits; the prediction is logits[:, -1]
    global_logits: torch.Tensor  # [B, T, C] glance head
    local_logits: torch.Tensor  # [B, T, C] focus head
    actions: torch.Tensor  # [B, T, 2] patch positions (row, col) in [0, 1] ([B, T, 3] with a patch size)


@dataclass(frozen=True)
class StreamState:
    """What :meth:`AdaFocusV2.step` carries from one frame to the next (see :meth:`AdaFocusV2.init_state`)."""

    batch_size: int
    step: int  # frames seen so far = the index of the next step's classifier head
    policy: nn.Module  # the policy streaming with (the model's learned one, or a fixed one)
    policy_state: Any  # the policy's recurrent state (PolicyNetwork: GRU hidden [1, B, hidden]); None first
    pooled: torch.Tensor | None  # [B, classifier_dim] running max of the classifier's z_t; None at first


@dataclass
class StepOutput:
    step: int  # 0-based index t of this frame in processing order (= the classifier head used)
    logits: torch.Tensor  # [B, C] step t's head, equal to forward(video).logits[:, t]
    action: torch.Tensor  # [B, 2] patch position (row, col) in [0, 1] ([B, 3] with a patch size)
    confidence: torch.Tensor  # [B] max softmax probability (the paper's exit criterion); the original
    # code's max raw logit is ``logits.amax(-1)`` (early_exit.confidences(logits[:, None], "max_logit"))


class AdaFocusV2(nn.Module):
    """The whole network: ``model(video)`` with ``video`` float ``[B, T, 3, H, W]`` (normalised, frames in
    processing order) -> :class:`AdaFocusOutput`.

    Parts (attribute names): ``glance`` (GlanceNetwork), ``glance_head``, ``policy`` (the trained policy,
    :class:`PolicyNetwork` unless ``policy`` builds another, see :mod:`.policy`), ``patch_extractor``
    (PatchExtractor), ``focus`` (trunk), ``local_head``, ``classifier`` (RecurrentPoolingClassifier).
    ``policy``: a factory ``(in_channels=, map_size=) -> nn.Module`` (a Hydra ``_partial_`` node); None: the
    learned GRU policy of width ``stn_hidden_dim``. Training glances once and focuses twice::

        g = model.run_glance(video)
        learned, random = model.run_focus(video, g), model.run_focus(video, g, "random")
    """

    def __init__(
        self,
        num_classes: int,
        glance_arch: str = "mbv2",
        focus_arch: str = "res50",
        patch_size: int = 128,
        num_frames: int = 16,
        input_size: int = 224,
        stn_hidden_dim: int = 2048,
        dropout: float = 0.2,
        fc_dropout: float = 0.2,
        pretrained: bool = True,
        glance_ckpt: str | None = None,
        glance_size: int | None = None,
        classifier_dim: int = 4096,
        policy: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        if not 0 < patch_size < input_size:
            raise ValueError(f"patch_size must be in (0, input_size={input_size}), got {patch_size}")
        self.num_classes = num_classes
        self.num_frames = num_frames
        self.input_size = input_size
        self.patch_size = patch_size
        self.glance_arch, self.focus_arch = glance_arch, focus_arch

        glance_spec, focus_spec = get_backbone(glance_arch), get_backbone(focus_arch)
        resize = glance_size if glance_size is not None else glance_spec.resize
        self.glance = GlanceNetwork(
            build_trunk(glance_arch, pretrained), glance_spec.dim, resize, glance_spec.resize_mode
        )
        if glance_ckpt is not None:
            load_glance_checkpoint(self.glance.trunk, glance_ckpt)
        self.glance_head = nn.Sequential(nn.Dropout(fc_dropout), nn.Linear(glance_spec.dim, num_classes))
        with torch.no_grad():  # the glance map's spatial size, for the policy's Linear
            probe = self.glance.eval()(torch.zeros(1, 3, input_size, input_size))
        self.glance.train()
        self.glance_shape = {"in_channels": glance_spec.dim, "map_size": tuple(probe.shape[-2:])}
        self.policy = (
            PolicyNetwork(**self.glance_shape, hidden_dim=stn_hidden_dim)
            if policy is None
            else (policy(**self.glance_shape))
        )
        self.patch_extractor = PatchExtractor(patch_size)
        self.focus = build_trunk(focus_arch, pretrained)
        self.local_head = nn.Sequential(nn.Dropout(fc_dropout), nn.Linear(focus_spec.dim, num_classes))
        self.classifier = RecurrentPoolingClassifier(
            glance_spec.dim + focus_spec.dim, num_classes, num_frames, classifier_dim, dropout
        )

    # ---- forward ----
    def check_input(self, video: torch.Tensor, values: bool = True) -> None:
        """Shape ``[B, num_frames, 3, input_size, input_size]`` and (``values``) finite entries. Values are
        not checked in training mode (loaders yield uint8, never NaN) nor while tracing or compiling (a
        data-dependent branch cannot be in an exported graph): the caller of an exported or compiled model
        checks them, see :mod:`adafocus.runtime`."""
        expected = (self.num_frames, 3, self.input_size, self.input_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"AdaFocusV2 expects video [B, {', '.join(map(str, expected))}] "
                f"(num_frames={self.num_frames}, input_size={self.input_size}), got {list(video.shape)}"
            )
        if not video.is_floating_point():
            raise ValueError(
                f"AdaFocusV2 expects a float video normalised with the ImageNet mean/std, got {video.dtype} "
                "(data loaders yield uint8: adafocus.data.transforms.normalize_video converts)"
            )
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        # not in training: batches there come from uint8 (never NaN), and the check costs a device sync a step
        if values and not tracing and not self.training and not torch.isfinite(video).all():
            raise ValueError("AdaFocusV2 input contains NaN or Inf values")

    def run_glance(self, video: torch.Tensor) -> GlanceOutput:
        """``video [B, T, 3, H, W]`` -> glance map, global features and glance logits."""
        self.check_input(video)
        b, t = video.shape[:2]
        fmap = self.glance(video.flatten(0, 1))  # (B*T, Cg, h, w)
        features = fmap.mean(dim=(2, 3))  # (B*T, Cg)
        logits = self.glance_head(features)  # (B*T, C)
        return GlanceOutput(fmap.view(b, t, *fmap.shape[1:]), features.view(b, t, -1), logits.view(b, t, -1))

    def actions(self, glance: GlanceOutput, policy: str | nn.Module | None = None) -> torch.Tensor:
        """Patch positions ``[B, T, 2]`` (or ``[B, T, 3]`` with sizes) from the glance maps.

        ``policy``: None or "learned" (this model's trained policy), a name of :data:`POLICIES` (a fixed
        policy: "random", "center"), or a policy module."""
        fmap = glance.feature_map.detach()  # stop-gradient: no policy ever trains the glance
        return self.resolve_policy(policy)(fmap)

    def resolve_policy(self, policy: str | nn.Module | None) -> nn.Module:
        """None / "learned": this model's trained policy; a name of :data:`POLICIES`: a fixed policy built for
        this glance; a module: itself."""
        if policy is None or policy == "learned":
            return self.policy
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"policy must be one of {sorted(POLICIES)} or a module, got {policy!r}")
            return POLICIES[policy](**self.glance_shape)
        return policy

    def run_focus(
        self, video: torch.Tensor, glance: GlanceOutput, policy: str | nn.Module | None = None
    ) -> AdaFocusOutput:
        """Focus on the patches chosen by ``policy`` (see :meth:`actions`) and classify every step."""
        self.check_input(video, values=False)  # run_glance checked the values (one device sync per step)
        if glance.features.shape[:2] != video.shape[:2]:
            raise ValueError(
                f"run_focus: the glance is of {list(glance.features.shape[:2])} videos x frames, "
                f"the video of {list(video.shape[:2])}; pass run_glance(video) of this video"
            )
        b, t = video.shape[:2]
        actions = self.actions(glance, policy)  # (B, T, 2) or (B, T, 3)
        sizes = actions[..., 2].flatten() * self.input_size if actions.shape[-1] == 3 else None  # (B*T,)
        patches = self.patch_extractor(video.flatten(0, 1), actions.flatten(0, 1), sizes)  # (B*T, 3, P, P)
        local = self.focus(patches).mean(dim=(2, 3))  # (B*T, Cf)
        local_logits = self.local_head(local).view(b, t, -1)  # (B, T, C)
        fused = torch.cat([glance.features, local.view(b, t, -1)], dim=-1)  # (B, T, Cg + Cf)
        logits = self.classifier(fused)  # (B, T, C)
        return AdaFocusOutput(logits, glance.global_logits, local_logits, actions)

    def forward(self, video: torch.Tensor, policy: str | nn.Module | None = None) -> AdaFocusOutput:
        return self.run_focus(video, self.run_glance(video), policy)

    # ---- streaming: one frame at a time ----
    def init_state(self, batch_size: int, policy: str | nn.Module | None = None) -> StreamState:
        """The state before the first frame of ``batch_size`` streams; ``policy`` as in :meth:`actions`."""
        policy = self.resolve_policy(policy)
        if not callable(getattr(policy, "step", None)):
            raise TypeError(
                f"policy {type(policy).__name__} has no step(feature_map, state) method: it cannot stream "
                "(see adafocus.models.policy)"
            )
        return StreamState(int(batch_size), 0, policy, None, None)

    @torch.no_grad()
    def step(self, frame: torch.Tensor, state: StreamState) -> tuple[StepOutput, StreamState]:
        """Feed the next frame in processing order: ``frame`` [B, 3, H, W] normalised (``video[:, t]`` of
        :meth:`forward`'s input) -> (this step's :class:`StepOutput`, the new state). Eval mode only (in
        train mode BatchNorm would use the statistics of B frames instead of B*T). T steps give
        ``forward(video)``'s ``logits[:, t]`` and ``actions[:, t]`` to float tolerance::

            state = model.eval().init_state(batch_size)
            for t in range(model.num_frames):
                out, state = model.step(video[:, t], state)
        """
        if self.training:
            raise RuntimeError("AdaFocusV2.step is inference only: call model.eval() first")
        expected = (state.batch_size, 3, self.input_size, self.input_size)
        if tuple(frame.shape) != expected:
            raise ValueError(f"AdaFocusV2.step expects a frame {list(expected)}, got {list(frame.shape)}")
        if state.step >= self.num_frames:
            raise ValueError(f"AdaFocusV2.step: all {self.num_frames} steps done; start a new init_state()")
        if not torch.isfinite(frame).all():
            raise ValueError("AdaFocusV2.step input contains NaN or Inf values")
        fmap = self.glance(frame)  # (B, Cg, h, w)
        action, policy_state = state.policy.step(fmap, state.policy_state)  # (B, 2) or (B, 3)
        sizes = action[:, 2] * self.input_size if action.shape[-1] == 3 else None  # (B,)
        patch = self.patch_extractor(frame, action, sizes)  # (B, 3, P, P)
        fused = torch.cat([fmap.mean(dim=(2, 3)), self.focus(patch).mean(dim=(2, 3))], dim=-1)  # (B, Cg + Cf)
        logits, pooled = self.classifier.step(fused, state.pooled, state.step)  # (B, C), (B, hidden)
        confidence = torch.softmax(logits.float(), dim=-1).amax(dim=-1)  # (B,)
        out = StepOutput(state.step, logits, action, confidence)
        return out, StreamState(state.batch_size, state.step + 1, state.policy, policy_state, pooled)

    # ---- bookkeeping ----
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The four learning-rate groups of SPEC §2; every parameter is in exactly one."""
        groups = {
            "policy": list(self.policy.parameters()),
            "glance": [*self.glance.parameters(), *self.glance_head.parameters()],
            "focus": [*self.focus.parameters(), *self.local_head.parameters()],
            "classifier": list(self.classifier.parameters()),
        }
        seen = [id(p) for ps in groups.values() for p in ps]
        if len(seen) != len(set(seen)) or set(seen) != {id(p) for p in self.parameters()}:
            raise RuntimeError("AdaFocusV2.param_groups does not cover every parameter exactly once")
        return groups

    def flop_counts(self) -> dict[str, float]:
        """Multiply-accumulates (G) per video of one eval forward, per part and in total.

        cuDNN is off while counting: its fused GRU kernel (``aten._cudnn_rnn``) is not in the table of
        ``FlopCounterMode``, so on a GPU the policy's GRU (0.40 G at T=16, hidden 2048) would silently count
        as 0; without cuDNN the GRU runs as per-step matmuls that are counted, on every device alike.
        """
        device = next(self.parameters()).device
        video = torch.zeros(1, self.num_frames, 3, self.input_size, self.input_size, device=device)
        was_training = self.training
        self.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=False), counter:
            self(video)
        self.train(was_training)
        per_module = counter.get_flop_counts()
        parts = {
            "glance": ["glance", "glance_head"],
            "policy": ["policy", "patch_extractor"],
            "focus": ["focus", "local_head"],
            "classifier": ["classifier"],
        }
        root = type(self).__name__
        out = {
            part: sum(sum(per_module.get(f"{root}.{name}", {}).values()) for name in names) / 2e9
            for part, names in parts.items()
        }
        out["total"] = counter.get_total_flops() / 2e9
        return out

    def gflops(self) -> float:
        """GFLOPs per video as the paper counts them: multiply-accumulates (G), ``FlopCounterMode`` / 2."""
        return self.flop_counts()["total"]

    @classmethod
    def from_official_checkpoint(cls, path: str | Path, **kwargs) -> AdaFocusV2:
        """Build the model and load a published AdaFocusV2 ``.pth.tar`` (SPEC §6); see :mod:`.official`."""
        from adafocus.models.official import load_official_checkpoint

        return load_official_checkpoint(cls, path, **kwargs)


def load_glance_checkpoint(trunk: nn.Module, path: str | Path) -> None:
    """Initialise the glance trunk from an ImageNet state dict file, strictly.

    res50: a torchvision-named ResNet-50 (the original's 96 px file). mbv2: the original's
    ``mobilenetv2_1.0-f2a8633.pth.tar`` (``features.N`` in the published nesting of SPEC §6, re-nested to
    torchvision's). Either may be wrapped in ``state_dict`` and carry ``module.``; the unused ImageNet
    classifier (``fc`` / ``classifier``) is dropped. BatchNorm ``num_batches_tracked`` counters a file from
    before PyTorch 0.4.1 lacks are filled in by ``load_state_dict``.
    """
    from adafocus.models.official import _mbv2_from_official, state_dict_differences

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(("fc.", "classifier.")):
            continue
        if key.startswith("features."):  # MobileNetV2: the published nesting -> torchvision's
            try:
                key = _mbv2_from_official(key.removeprefix("features."))
            except KeyError:
                pass  # not a published index: listed as unexpected below
        renamed[key] = value
    state = renamed
    own = trunk.state_dict()
    missing, unexpected, mismatched = state_dict_differences(own, state)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"glance_ckpt {path} does not match the glance trunk: missing {missing[:10]} ({len(missing)}), "
            f"unexpected {unexpected[:10]} ({len(unexpected)}), shape-mismatched {mismatched[:10]}"
        )
    trunk.load_state_dict(state)
