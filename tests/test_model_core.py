"""AdaFocusV2 model core (issue 2): layer shapes, the published key layout, gradients, errors, GFLOPs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import mobilenet_v2, resnet50

from adafocus.models import AdaFocusV2, to_official_state_dict

ROOT = Path(__file__).resolve().parents[1]
# SPEC §4: GFLOPs (multiply-accumulates, G) per video, T = 16, 224 px
SPEC_GFLOPS = {("mbv2", 96): 17.61, ("mbv2", 128): 26.96, ("res50", 96): 24.76, ("res50", 160): 46.11}


def tiny(**kwargs) -> AdaFocusV2:
    args = dict(num_classes=5, glance_arch="mbv3s", focus_arch="res18", patch_size=16, num_frames=4,
                input_size=48, stn_hidden_dim=32, classifier_dim=64, pretrained=False)  # fmt: skip
    return AdaFocusV2(**{**args, **kwargs})


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("glance, dim, hw", [("mbv2", 1280, 49), ("res50", 2048, 9)])
def test_layer_shapes_of_spec(glance, dim, hw):
    s = shapes(AdaFocusV2(200, glance, "res50", 128, pretrained=False))
    assert s["policy.encoder.0.weight"] == (64, dim, 1, 1) and "policy.encoder.0.bias" not in s
    assert s["policy.encoder.1.weight"] == (64,)  # BN2d
    assert s["policy.encoder.4.weight"] == (2048, 64 * hw)
    assert s["policy.encoder.5.weight"] == (2048,)  # BN1d
    assert s["policy.gru.weight_ih_l0"] == (3 * 2048, 2048) and s["policy.gru.weight_hh_l0"] == (
        3 * 2048,
        2048,
    )
    assert s["policy.fc.0.weight"] == (2, 2048)
    assert s["glance_head.1.weight"] == (200, dim) and s["local_head.1.weight"] == (200, 2048)
    assert s["classifier.mlp.0.weight"] == (4096, dim + 2048)  # 3328 (mbv2) / 4096 (res50) -> 4096
    assert s["classifier.mlp.1.weight"] == (4096,)
    assert s["classifier.head_weight"] == (16, 200, 4096) and s["classifier.head_bias"] == (16, 200)


def test_published_layout_round_trip(tmp_path):
    torch.manual_seed(0)
    model = AdaFocusV2(7, "mbv2", "res50", 96, num_frames=4, input_size=112, stn_hidden_dim=64,
                       pretrained=False).eval()  # fmt: skip
    state = to_official_state_dict(model)
    glance = [k for k in state if k.startswith("module.global_CNN.features.")]
    reference = mobilenet_v2().features.state_dict()
    assert len(glance) == len(reference) == 312
    for ours, (ref_key, ref_value) in zip(glance, reference.items(), strict=True):
        assert state[ours].shape == ref_value.shape, (ours, ref_key)
    assert "module.global_CNN.features.1.conv.3.weight" in state  # first block: conv.{0,1,3,4}
    assert "module.global_CNN.features.2.conv.7.running_var" in state  # others: conv.{0,1,3,4,6,7}
    assert "module.classifier.classifiers.3.1.weight" in state and "module.policy_stn.fc.0.bias" in state
    # the published files also carry the two unused ImageNet classifiers
    state["module.global_CNN.classifier.1.weight"] = torch.zeros(1000, 1280)
    state["module.local_CNN.fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "actnet_p96_mbv2.pth.tar"
    torch.save({"epoch": 50, "state_dict": state}, path)

    loaded = AdaFocusV2.from_official_checkpoint(path, input_size=112, stn_hidden_dim=64).eval()
    assert (loaded.num_classes, loaded.num_frames, loaded.patch_size) == (7, 4, 96)  # inferred
    video = torch.randn(2, 4, 3, 112, 112)
    with torch.no_grad():
        a, b = model(video), loaded(video)
    for field in ("logits", "global_logits", "local_logits", "actions"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_bad_published_checkpoint_lists_keys(tmp_path, damage):
    state = to_official_state_dict(tiny(glance_arch="res50", focus_arch="res18", input_size=64))
    key = "module.policy_stn.fc.0.weight"
    if damage == "missing":
        del state[key]
    elif damage == "unexpected":
        state["module.policy_stn.extra.weight"] = torch.zeros(1)
    else:
        state[key] = torch.zeros(3, 32)
    path = tmp_path / "x_p16_res50.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=damage if damage != "shape" else "shape-mismatched") as err:
        AdaFocusV2.from_official_checkpoint(path, focus_arch="res18", input_size=64, classifier_dim=64)
    assert ("policy" in str(err.value)) and str(path) in str(err.value)


def test_gradient_reaches_actions_through_interpolation_and_not_the_glance():
    model = tiny().train()
    video = torch.randn(3, 4, 3, 48, 48)
    glance = model.run_glance(video)
    out = model.run_focus(video, glance, "learned")
    actions = out.actions
    actions.retain_grad()
    out.local_logits.sum().backward(retain_graph=True)
    assert actions.grad is not None and torch.isfinite(actions.grad).all() and actions.grad.abs().sum() > 0
    # a loss on the actions alone trains the policy but never the glance (stop-gradient)
    model.zero_grad()
    model.run_focus(video, model.run_glance(video), "learned").actions.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.glance.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.policy.parameters())


def test_causality_action_t_ignores_later_frames():
    model = tiny().eval()
    video = torch.randn(2, 4, 3, 48, 48)
    changed = video.clone()
    changed[:, 2:] = torch.randn_like(changed[:, 2:])
    with torch.no_grad():
        a, b = model(video).actions, model(changed).actions
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.equal(a[:, 2:], b[:, 2:])


def test_patch_equals_crop_on_the_pixel_grid():
    model = tiny()
    frames = torch.randn(2, 3, 48, 48)
    rows, cols = torch.tensor([0, 20]), torch.tensor([32, 7])  # top-left corners, integers
    actions = torch.stack([rows / (48 - 16), cols / (48 - 16)], dim=1)
    patches = model.patch_extractor(frames, actions)
    for i in range(2):
        crop = frames[i, :, rows[i] : rows[i] + 16, cols[i] : cols[i] + 16]
        assert torch.allclose(patches[i], crop, atol=1e-5)


def test_policies_and_param_groups():
    model = tiny().eval()
    video = torch.randn(2, 4, 3, 48, 48)
    assert torch.equal(model(video, policy="center").actions, torch.full((2, 4, 2), 0.5))
    random = model(video, policy="random").actions
    assert random.min() >= 0 and random.max() <= 1 and random.std() > 0
    with pytest.raises(ValueError, match="learned"):
        model(video, policy="somewhere")
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(groups) == ["classifier", "focus", "glance", "policy"]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_clear_errors_for_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="num_frames=4"):
        model(torch.randn(1, 3, 3, 48, 48))
    with pytest.raises(ValueError, match="input_size=48"):
        model(torch.randn(1, 4, 3, 40, 48))
    bad = torch.randn(1, 4, 3, 48, 48)
    bad[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    with pytest.raises(ValueError, match="patch_size"):
        tiny(patch_size=48)
    with pytest.raises(ValueError, match="known backbones: mbv2, mbv3s, res18, res50"):
        tiny(glance_arch="vit")


def test_pretrained_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there: fails at once
    with pytest.raises(RuntimeError, match="backbone.pretrained=false") as err:
        tiny(pretrained=True)
    assert str(tmp_path / "hub" / "checkpoints") in str(err.value)


def test_glance_checkpoint(tmp_path):
    reference = resnet50()
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}  # DataParallel names, with fc
    path = tmp_path / "glance.pth"
    torch.save(state, path)
    model = tiny(glance_arch="res50", input_size=64, glance_ckpt=str(path))
    assert torch.equal(model.glance.trunk.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="missing"):
        tiny(glance_arch="res50", input_size=64, glance_ckpt=str(path))


@pytest.mark.parametrize("glance, patch", sorted(SPEC_GFLOPS))
def test_gflops_reproduce_spec_table(glance, patch):
    model = AdaFocusV2(200, glance, "res50", patch, pretrained=False)
    assert model.gflops() == pytest.approx(SPEC_GFLOPS[glance, patch], rel=0.005)


def test_profile_cli_json():
    result = subprocess.run(
        [sys.executable, "-m", "adafocus.profile", "backbone=cpu", "patch=16", "input_size=48",
         "num_frames=4", "num_classes=5", "format=json", "repeats=2", "warmup=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    model = tiny(stn_hidden_dim=256, classifier_dim=1024)
    assert sorted(out["parts"]) == ["classifier", "focus", "glance", "policy"]
    assert out["gflops"] == pytest.approx(model.gflops())
    assert sum(p["gflops"] for p in out["parts"].values()) == pytest.approx(out["gflops"], rel=1e-6)
    assert out["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert out["latency_ms_per_video"] > 0
