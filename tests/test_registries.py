"""Every registered backbone and policy (iterating the registries and conf/policy/), and a new policy added
the documented way: one Python file plus one config file."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from torchvision.models import get_model

from adafocus.models import BACKBONES, POLICIES, AdaFocusV2, build_trunk

ROOT = Path(__file__).resolve().parents[1]


def tiny(**kwargs) -> AdaFocusV2:
    args = dict(num_classes=3, glance_arch="mbv3s", focus_arch="res18", patch_size=16, num_frames=3,
                input_size=64, stn_hidden_dim=16, classifier_dim=32, pretrained=False)  # fmt: skip
    return AdaFocusV2(**{**args, **kwargs})


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_is_a_trunk_and_a_glance(name):
    spec = BACKBONES[name]
    trunk = build_trunk(name, pretrained=False).eval()
    with torch.no_grad():
        fmap = trunk(torch.randn(2, 3, 64, 64))
    assert fmap.dim() == 4 and fmap.shape[:2] == (2, spec.dim)
    # as the glance, at its own default resolution (no glance_size given), inside the whole model
    model = tiny(glance_arch=name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 3, 64, 64))
    assert out.logits.shape == (2, 3, 3) and torch.isfinite(out.logits).all()
    assert model.glance_shape["in_channels"] == spec.dim
    if spec.weights is None:  # no ImageNet weights to load: asking for them is an error naming the way out
        with pytest.raises(ValueError, match="backbone.pretrained=false"):
            build_trunk(name, pretrained=True)
        return
    # the trunk's tensors sit under the entry's prefix in the torchvision model its weights belong to
    full = get_model(spec.weights.__class__.__name__.removesuffix("_Weights").lower()).state_dict()
    for key, value in trunk.state_dict().items():
        assert full[spec.weights_prefix + key].shape == value.shape, key


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_trunk_is_channels_last_and_computes_what_the_plain_layout_does(name):
    """Trunks are built with channels-last weights (NHWC convolutions, faster on CPU and GPU). In float64,
    where round-off cannot hide a difference, the map and every gradient in training mode equal those of the
    same trunk in the plain layout; in float32 they differ by round-off only."""
    torch.manual_seed(0)
    trunk = build_trunk(name, pretrained=False)
    weights = [m.weight for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)  # not only 1x1 kernels, where both layouts agree
    plain = copy.deepcopy(trunk).to(memory_format=torch.contiguous_format)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    frames = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap32, plain32 = trunk(frames), plain(frames)
    assert fmap32.is_contiguous(memory_format=torch.channels_last)  # the activations run NHWC too
    assert ((fmap32 - plain32).norm() / plain32.norm()).item() < 1e-3
    runs = []
    for net in (copy.deepcopy(trunk).double(), plain.double()):
        x = frames.double().requires_grad_(True)
        fmap = net(x)
        fmap.square().mean().backward()
        runs.append((fmap.detach(), x.grad, {n: p.grad for n, p in net.named_parameters()}))
    (cl_map, cl_dx, cl_dw), (map64, dx, dw) = runs
    torch.testing.assert_close(cl_map, map64, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cl_dx, dx, rtol=1e-9, atol=1e-12)
    for key in dw:
        torch.testing.assert_close(cl_dw[key], dw[key], rtol=1e-7, atol=1e-10, msg=key)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_gives_actions_in_the_unit_square(name):
    model = tiny().eval()
    video = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        actions = model(video, name).actions
    assert actions.shape == (2, 3, 2) and actions.min() >= 0 and actions.max() <= 1
    policy = POLICIES[name](**model.glance_shape)  # the registry entry, built as the model builds it
    assert isinstance(policy, torch.nn.Module)


@pytest.mark.parametrize("config", sorted(p.stem for p in (ROOT / "conf" / "policy").glob("*.yaml")))
def test_every_policy_config_builds_its_registry_class(config):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"policy={config}", "backbone.stn_hidden_dim=16"])
    assert get_class(cfg.policy._target_) is POLICIES[config]
    model = tiny(policy=instantiate(cfg.policy))
    assert type(model.policy) is POLICIES[config]


def test_a_policy_can_return_a_patch_size():
    """Scale-aware policies return [B, T, 3]: the third column is the side of the region read (fraction of
    the frame), resampled to P x P."""

    class WholeFrame(torch.nn.Module):
        def __init__(self, **glance_shape):
            super().__init__()

        def forward(self, fmap):
            return fmap.new_tensor([0.0, 0.0, 1.0]).expand(*fmap.shape[:2], 3)  # (B, T, 3)

    model = tiny(policy=WholeFrame).eval()
    video = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        out = model(video)
    patches = model.patch_extractor(
        video.flatten(0, 1), out.actions.flatten(0, 1)[:, :2], torch.full((3,), 64.0)
    )
    expected = torch.nn.functional.interpolate(video.flatten(0, 1), size=(16, 16), mode="bilinear")
    assert torch.allclose(patches, expected, atol=1e-5)  # the whole frame, downsampled to the patch


CUSTOM_POLICY = '''
"""A policy that always looks at the top-left corner."""
import torch
from torch import nn


class CornerPolicy(nn.Module):
    def __init__(self, in_channels: int, map_size: tuple[int, int]):
        super().__init__()

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map.new_zeros(*feature_map.shape[:2], 2)  # (B, T, 2)
'''


@pytest.mark.slow
def test_a_new_policy_is_one_file_plus_one_config(tmp_path):
    (tmp_path / "corner_policy.py").write_text(CUSTOM_POLICY)
    (tmp_path / "conf" / "policy").mkdir(parents=True)
    (tmp_path / "conf" / "policy" / "corner.yaml").write_text(
        "_target_: corner_policy.CornerPolicy\n_partial_: true\n"
    )
    out = tmp_path / "run"
    tiny_run = [
        "dataset.generate.num_train=8", "dataset.generate.num_val=4", "dataset.generate.frames_per_video=4",
        "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=2",
        "patch=16", "batch_size=4", "epochs=1", "workers=0", "backbone.stn_hidden_dim=16",
        "backbone.classifier_dim=32",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "train.py", *tiny_run, "policy=corner", f"data_root={tmp_path / 'data'}",
         f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ckpt = torch.load(next((out / "checkpoints").glob("best-*.ckpt")), weights_only=True)
    assert ckpt["hyper_parameters"]["config"]["model"]["policy"]["_target_"] == "corner_policy.CornerPolicy"
