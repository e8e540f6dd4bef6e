"""AdaFocusV2 model core (issue 2, SPEC §1, §4): layer shapes, gradients, causality, patches, errors, GFLOPs.

The published checkpoint layout (SPEC §6) is tested in test_official_checkpoint.py.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import models as tvm

from adafocus.models import BACKBONES, AdaFocusV2, to_official_state_dict

# SPEC §4: GFLOPs (multiply-accumulates, G) per video, T = 16, 224 px: the spec's numbers, not the code's
SPEC_GFLOPS = {
    ("mbv2", 96): 17.61, ("mbv2", 128): 26.96, ("mbv2", 160): 38.97,
    ("res50", 96): 24.76, ("res50", 128): 34.10, ("res50", 160): 46.11,
}  # fmt: skip
# SPEC §1: glance feature channels and policy map size h*w per glance
GLANCE = {"mbv2": (1280, 7), "res50": (2048, 3)}
_BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def tiny(**kwargs) -> AdaFocusV2:
    """A CPU-sized model (the `cpu` backbone's archs at toy widths) for properties that do not need 224."""
    args = dict(num_classes=5, glance_arch="mbv3s", focus_arch="res18", patch_size=16, num_frames=4,
                input_size=48, stn_hidden_dim=32, classifier_dim=64, pretrained=False)  # fmt: skip
    return AdaFocusV2(**{**args, **kwargs})


@pytest.fixture(scope="module")
def full_models() -> dict[str, AdaFocusV2]:
    """The paper's two settings at full size (T = 16, 224 px, C = 200, P = 96), random weights."""
    torch.manual_seed(0)
    return {g: AdaFocusV2(200, g, "res50", 96, pretrained=False).eval() for g in GLANCE}


# ---------------------------------------------------------------- SPEC §1 shapes
@pytest.mark.parametrize("glance", sorted(GLANCE))
def test_layer_shapes_of_spec(full_models, glance):
    model = full_models[glance]
    dim, side = GLANCE[glance]
    # the glance map the policy sees: [1280, 7, 7] (mbv2 at 224) / [2048, 3, 3] (res50 at 96)
    with torch.no_grad():
        fmap = model.glance(torch.zeros(1, 3, 224, 224))
    assert tuple(fmap.shape) == (1, dim, side, side)
    if glance == "res50":
        assert (model.glance.resize, model.glance.resize_mode) == (96, "bilinear")
    s = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # policy: conv 1x1 (dim -> 64, no bias), BN2d, Linear(64*h*w -> 2048), BN1d, GRU(2048), Linear(2048 -> 2)
    assert s["policy.encoder.0.weight"] == (64, dim, 1, 1) and "policy.encoder.0.bias" not in s
    assert s["policy.encoder.1.weight"] == s["policy.encoder.1.running_var"] == (64,)
    assert s["policy.encoder.4.weight"] == (2048, 64 * side * side)  # 64*49 (mbv2) / 64*9 (res50)
    assert s["policy.encoder.5.weight"] == s["policy.encoder.5.running_mean"] == (2048,)
    assert s["policy.gru.weight_ih_l0"] == s["policy.gru.weight_hh_l0"] == (3 * 2048, 2048)
    assert s["policy.gru.bias_ih_l0"] == s["policy.gru.bias_hh_l0"] == (3 * 2048,)
    assert model.policy.gru.num_layers == 1 and model.policy.gru.batch_first
    assert s["policy.fc.0.weight"] == (2, 2048) and s["policy.fc.0.bias"] == (2,)
    assert isinstance(model.policy.fc[1], torch.nn.Sigmoid)
    # heads and the recurrent pooling classifier
    assert s["glance_head.1.weight"] == (200, dim) and s["local_head.1.weight"] == (200, 2048)
    assert s["classifier.mlp.0.weight"] == (4096, dim + 2048)  # 3328 (mbv2) / 4096 (res50) -> 4096
    assert s["classifier.mlp.1.weight"] == (4096,)  # BN1d
    assert s["classifier.head_weight"] == (16, 200, 4096) and s["classifier.head_bias"] == (16, 200)
    # focus: torchvision's ResNet-50 trunk, names and shapes, without its fc
    reference = {k: tuple(v.shape) for k, v in tvm.resnet50().state_dict().items() if not k.startswith("fc.")}
    assert {k.removeprefix("focus."): v for k, v in s.items() if k.startswith("focus.")} == reference
    # the same model in the published layout (SPEC §6)
    official = to_official_state_dict(model)
    assert {k for k in official if k.startswith("module.policy_stn.encoder.")} == {
        f"module.policy_stn.encoder.{i}.{p}"
        for i, params in [(0, ["weight"]), (1, _BN), (4, ["weight", "bias"]), (5, _BN)]
        for p in params
    }
    heads = r"module\.classifier\.classifiers\.(\d+)\.1\.(weight|bias)$"
    steps = [int(m.group(1)) for k in official if (m := re.match(heads, k))]
    assert sorted(steps) == sorted(2 * list(range(16)))  # a weight and a bias per step
    assert tuple(official["module.classifier.classifiers.15.1.weight"].shape) == (200, 4096)
    assert tuple(official["module.classifier.mlp.layers.0.weight"].shape) == (4096, dim + 2048)
    assert tuple(official["module.global_CNN_fc.1.weight"].shape) == (200, dim)
    assert tuple(official["module.local_CNN_fc.1.weight"].shape) == (200, 2048)
    assert tuple(official["module.policy_stn.fc.0.weight"].shape) == (2, 2048)


# ---------------------------------------------------------------- SPEC §4 GFLOPs
@pytest.mark.parametrize("glance", sorted(GLANCE))
def test_gflops_reproduce_spec_table(full_models, glance):
    model = full_models[glance]
    counts = model.flop_counts()
    assert model.gflops() == pytest.approx(SPEC_GFLOPS[glance, 96], rel=0.005)
    assert counts["total"] == pytest.approx(SPEC_GFLOPS[glance, 96], rel=0.005)
    parts = ("glance", "policy", "focus", "classifier")
    assert sum(counts[p] for p in parts) == pytest.approx(counts["total"], rel=1e-9)
    assert all(counts[p] > 0 for p in parts) and counts["focus"] > counts["policy"]
    assert counts["policy"] > 16 * 2 * 3 * 2048 * 2048 / 1e9  # the GRU's two gate matmuls per frame count
    assert not model.training  # counting leaves the mode as it was


# ---------------------------------------------------------------- gradients
def test_gradient_reaches_actions_through_the_interpolation():
    torch.manual_seed(0)
    model = tiny().train()
    video = torch.randn(3, 4, 3, 48, 48)
    out = model(video)
    out.actions.retain_grad()
    out.logits[:, -1].logsumexp(-1).sum().backward()
    grad = out.actions.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad.abs() > 0).any()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.policy.parameters())
    # the patch extractor alone: d patch / d action is the image gradient, non-zero on a ramp
    frames = torch.arange(48.0).repeat(1, 3, 48, 1)  # (1, 3, 48, 48), value = column index
    actions = torch.tensor([[0.3, 0.4]], requires_grad=True)
    model.patch_extractor(frames, actions).sum().backward()
    # moving the patch right by 1 px adds 1 to every pixel: d/da_col = (W - P) * 3 * P * P
    assert actions.grad[0, 1].item() == pytest.approx((48 - 16) * 3 * 16 * 16, rel=1e-4)
    assert actions.grad[0, 0].item() == pytest.approx(0, abs=1e-2)


def test_no_gradient_from_the_policy_into_the_glance():
    model = tiny().train()
    video = torch.randn(2, 4, 3, 48, 48)
    model(video).actions.square().sum().backward()  # a loss on the actions only
    assert all(p.grad is None for p in model.glance.parameters())
    assert all(p.grad is None for p in model.glance_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.policy.parameters())
    # while the classification loss does train the glance
    model.zero_grad()
    model(video).logits.sum().backward()
    assert all(p.grad is not None for p in model.glance.parameters())


# ---------------------------------------------------------------- causality
def test_causality_step_t_ignores_later_frames():
    torch.manual_seed(0)
    model = tiny(num_frames=5).eval()
    video = torch.randn(2, 5, 3, 48, 48)
    with torch.no_grad():
        base = model(video)
        for t in range(4):  # change frames t+1.. : steps <= t unchanged
            changed = video.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            out = model(changed)
            for field in ("actions", "logits", "global_logits", "local_logits"):
                a, b = getattr(base, field), getattr(out, field)
                assert torch.equal(a[:, : t + 1], b[:, : t + 1]), (field, t)
            assert not torch.equal(base.actions[:, t + 1 :], out.actions[:, t + 1 :])


def test_classifier_is_a_cumulative_max_with_one_head_per_step():
    torch.manual_seed(0)
    clf = tiny().classifier.eval()
    x = torch.randn(3, 4, clf.mlp[0].in_features)  # [B, T, Cg + Cf]
    with torch.no_grad():
        z = clf.mlp(x.flatten(0, 1)).view(3, 4, -1)
        logits = clf(x)
    h = z[:, 0]
    for t in range(4):
        h = torch.maximum(h, z[:, t])
        expected = h @ clf.head_weight[t].T + clf.head_bias[t]
        assert torch.allclose(logits[:, t], expected, atol=1e-5)


# ---------------------------------------------------------------- patches and policies
def test_patch_equals_the_crop_on_the_pixel_grid():
    model = tiny(input_size=64, patch_size=32)
    frames = torch.randn(4, 3, 64, 64)
    corners = torch.tensor([[0, 32], [5, 17], [32, 0], [13, 29]])  # top-left (row, col), H - P = 32
    actions = corners / 32  # a_row * (H - P) is an integer
    patches = model.patch_extractor(frames, actions)
    assert patches.shape == (4, 3, 32, 32)
    for i, (r, c) in enumerate(corners.tolist()):
        assert torch.allclose(patches[i], frames[i, :, r : r + 32, c : c + 32], atol=1e-5)
    # half-way between two pixel positions: the mean of the two crops (bilinear)
    half = model.patch_extractor(frames[:1], torch.tensor([[5 / 32, 17.5 / 32]]))[0]
    expected = (frames[0, :, 5:37, 17:49] + frames[0, :, 5:37, 18:50]) / 2
    assert torch.allclose(half, expected, atol=1e-5)


def test_model_reads_its_patches_at_the_actions():
    """The focus sees exactly the crops at the learned actions (end to end through run_focus)."""
    torch.manual_seed(0)
    model = tiny(input_size=64, patch_size=32).eval()
    video = torch.randn(1, 4, 3, 64, 64)
    with torch.no_grad():
        out = model(video)
        crops = model.patch_extractor(video[0], out.actions[0])
        local = model.local_head(model.focus(crops).mean(dim=(2, 3)))
    assert torch.allclose(out.local_logits[0], local, atol=1e-5)


def test_random_and_center_policies():
    model = tiny().eval()
    video = torch.randn(2, 4, 3, 48, 48)
    with torch.no_grad():
        center = model(video, policy="center")
        torch.manual_seed(1)
        r1 = model(video, policy="random").actions
        r2 = model(video, policy="random").actions
        torch.manual_seed(1)
        r3 = model(video, policy="random").actions
    assert torch.equal(center.actions, torch.full((2, 4, 2), 0.5))
    assert r1.shape == (2, 4, 2) and r1.min() >= 0 and r1.max() <= 1
    assert not torch.equal(r1, r2) and torch.equal(r1, r3)  # fresh per call, reproducible by seed
    assert len(set(r1.flatten().tolist())) == r1.numel()  # a draw per video, frame and coordinate
    crops = model.patch_extractor(video.flatten(0, 1), center.actions.flatten(0, 1))
    assert torch.allclose(crops, video.flatten(0, 1)[..., 16:32, 16:32], atol=1e-5)
    with pytest.raises(ValueError, match="learned"):
        model(video, policy="somewhere")


def test_glance_sees_the_resized_frame():
    """res50: bilinear (align_corners=True) to 96 px; mbv3s with glance_size: exact area downsample."""
    torch.manual_seed(0)
    frames = torch.randn(2, 3, 128, 128)
    res50 = tiny(glance_arch="res50", input_size=128).eval()
    with torch.no_grad():
        seen = res50.glance(frames)
        expected = res50.glance.trunk(
            F.interpolate(frames, size=(96, 96), mode="bilinear", align_corners=True)
        )
    assert seen.shape == (2, 2048, 3, 3) and torch.equal(seen, expected)
    mbv3s = tiny(input_size=64, patch_size=32, glance_size=16).eval()
    with torch.no_grad():
        seen = mbv3s.glance(frames[..., :64, :64])
        expected = mbv3s.glance.trunk(F.avg_pool2d(frames[..., :64, :64], 4))  # 64 -> 16: 4x4 means
    assert seen.shape == (2, mbv3s.glance.dim, 8, 8) and torch.allclose(seen, expected, atol=1e-6)
    # the policy's Linear is sized for the map it gets (64 * 8 * 8), and the whole model runs
    assert mbv3s.policy.encoder[4].in_features == 64 * 8 * 8
    assert mbv3s(torch.randn(1, 4, 3, 64, 64)).logits.shape == (1, 4, 5)
    full = tiny(input_size=64, patch_size=32).eval()  # glance_size=None: the whole 64 px frame
    assert full.glance.resize is None and full.policy.encoder[4].in_features == 64 * 32 * 32


def test_glance_once_focus_twice():
    """Training's step: one glance shared by a learned and a random focus pass (SPEC §2)."""
    torch.manual_seed(0)
    model = tiny().eval()
    video = torch.randn(2, 4, 3, 48, 48)
    with torch.no_grad():
        glance = model.run_glance(video)
        assert glance.feature_map.shape[:3] == (2, 4, model.glance.dim)
        assert glance.features.shape == (2, 4, model.glance.dim) and glance.global_logits.shape == (2, 4, 5)
        learned, rand = model.run_focus(video, glance, "learned"), model.run_focus(video, glance, "random")
        whole = model(video)
    for field in ("logits", "global_logits", "local_logits", "actions"):
        assert torch.equal(getattr(learned, field), getattr(whole, field)), field
    assert rand.global_logits is glance.global_logits  # the same glance, not recomputed
    assert not torch.equal(rand.actions, learned.actions) and not torch.equal(rand.logits, learned.logits)
    with pytest.raises(ValueError, match=r"run_focus: the glance is of \[2, 4\].*the video of \[1, 4\]"):
        model.run_focus(video[:1], glance)
    with pytest.raises(ValueError, match="input_size=48"):
        model.run_focus(video[..., :40], glance)


def test_param_groups_cover_every_parameter_once():
    model = tiny()
    groups = model.param_groups()
    assert sorted(groups) == ["classifier", "focus", "glance", "policy"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert set(ids) == {id(p) for p in model.parameters()}

    def of(*modules):
        return {id(p) for m in modules for p in m.parameters()}

    assert {id(p) for p in groups["policy"]} == of(model.policy)
    assert {id(p) for p in groups["glance"]} == of(model.glance, model.glance_head)
    assert {id(p) for p in groups["focus"]} == of(model.focus, model.local_head)
    assert {id(p) for p in groups["classifier"]} == of(model.classifier)


# ---------------------------------------------------------------- errors
def test_clear_errors_for_bad_input():
    model = tiny()
    for shape, expected in [
        ((1, 3, 3, 48, 48), "num_frames=4"),  # wrong T
        ((1, 5, 3, 48, 48), "num_frames=4"),
        ((1, 4, 3, 40, 48), "input_size=48"),  # wrong frame size
        ((1, 4, 3, 48, 40), "input_size=48"),
        ((1, 4, 1, 48, 48), r"\[B, 4, 3, 48, 48\]"),  # grey frames
        ((4, 3, 48, 48), r"got \[4, 3, 48, 48\]"),  # no batch dimension
    ]:
        with pytest.raises(ValueError, match=expected):
            model(torch.randn(*shape))
    model.eval()  # values are checked outside training (training batches come from uint8: never NaN)
    for bad in (float("nan"), float("inf"), -float("inf")):
        video = torch.randn(1, 4, 3, 48, 48)
        video[0, 2, 1, 3, 4] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            model(video)
    for patch in (48, 60, 0):
        with pytest.raises(ValueError, match=f"patch_size must be in \\(0, input_size=48\\), got {patch}"):
            tiny(patch_size=patch)


@pytest.mark.parametrize("which", ["glance_arch", "focus_arch"])
def test_unknown_backbone_lists_the_known_ones(which):
    with pytest.raises(ValueError, match="unknown backbone 'vit_b_16'") as err:
        tiny(**{which: "vit_b_16"})
    assert f"known backbones: {', '.join(sorted(BACKBONES))}" in str(err.value)
    assert {"mbv2", "res50", "mbv3s", "res18"} <= set(BACKBONES)


def _no_network(monkeypatch, torch_home: Path) -> None:
    """An empty torch hub cache and a proxy that refuses at once (whether or not the machine is online)."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: nothing listens
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_pretrained_without_network_names_the_cache_path(tmp_path, monkeypatch):
    _no_network(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="backbone.pretrained=false") as err:
        tiny(pretrained=True)
    url = BACKBONES["mbv3s"].weights.url
    assert str(tmp_path / "hub" / "checkpoints" / Path(url).name) in str(err.value)
    assert url in str(err.value)


def test_pretrained_weights_put_in_the_cache_are_used(tmp_path, monkeypatch):
    """The path the error names is the one that works: files there load without any network."""
    _no_network(monkeypatch, tmp_path)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    imagenet = {"mbv3s": tvm.mobilenet_v3_small(), "res18": tvm.resnet18()}
    for name, net in imagenet.items():
        torch.save(net.state_dict(), cache / Path(BACKBONES[name].weights.url).name)
    model = tiny(pretrained=True)
    glance = imagenet["mbv3s"].features.state_dict()
    for key, value in model.glance.trunk.state_dict().items():
        assert torch.equal(value, glance[key]), key
    focus = imagenet["res18"].state_dict()
    for key, value in model.focus.state_dict().items():
        assert torch.equal(value, focus[key]), key


# ---------------------------------------------------------------- glance_ckpt (the 96 px ResNet-50)
class _NotAWeight:  # pickled into a file, it must not be unpickled (weights_only=True)
    pass


def test_glance_checkpoint_loads_a_torchvision_resnet50(tmp_path):
    torch.manual_seed(0)
    reference = tvm.resnet50()
    path = tmp_path / "Initialization_model_prime_resnet50_patch_size_96_or_128.pth"
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)  # with fc
    model = tiny(glance_arch="res50", input_size=64, glance_ckpt=str(path))
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    loaded = model.glance.trunk.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # the plain (un-prefixed) and {"state_dict": ...} forms load too
    torch.save({"state_dict": reference.state_dict()}, path)
    model = tiny(glance_arch="res50", input_size=64, glance_ckpt=str(path))
    assert torch.equal(model.glance.trunk.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)


def test_glance_checkpoint_errors(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(tvm.resnet18().state_dict(), path)  # a ResNet-18 is not the ResNet-50 glance
    with pytest.raises(ValueError, match="does not match the glance trunk") as err:
        tiny(glance_arch="res50", input_size=64, glance_ckpt=str(path))
    message = str(err.value)
    assert str(path) in message
    assert "missing ['layer1.0.bn3.bias'" in message
    assert "shape-mismatched ['layer1.0.conv1.weight'" in message
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        tiny(glance_arch="res50", input_size=64, glance_ckpt=str(path))
    torch.save({"state_dict": tvm.resnet50().state_dict(), "args": _NotAWeight()}, path)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True: no arbitrary objects
        tiny(glance_arch="res50", input_size=64, glance_ckpt=str(path))
