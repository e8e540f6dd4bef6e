"""The published AdaFocusV2 checkpoints (SPEC §6): key layout, strict loading, inference from the tensors."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from torchvision import models as tvm

from adafocus.models import AdaFocusV2, from_official_state_dict, to_official_state_dict

CPU = dict(focus_arch="res18", stn_hidden_dim=32, classifier_dim=64, pretrained=False)  # toy widths


def published(model: AdaFocusV2, path, extra: dict | None = None):
    """Write ``model`` as the authors did: ``{"state_dict": ...}`` with ``module.`` keys, plus ``extra``."""
    state = to_official_state_dict(model)
    state.update(extra or {})
    torch.save({"state_dict": state}, path)
    return state


def imagenet_heads(glance: str, focus_dim: int) -> dict[str, torch.Tensor]:
    """The unused ImageNet classifiers the published files carry (mbv2 ``classifier``, ResNet ``fc``)."""
    heads = {
        "module.local_CNN.fc.weight": torch.randn(1000, focus_dim),
        "module.local_CNN.fc.bias": torch.randn(1000),
    }
    if glance == "mbv2":
        heads |= {"module.global_CNN.classifier.weight": torch.randn(1000, 1280)}
        heads |= {"module.global_CNN.classifier.bias": torch.randn(1000)}
    else:
        heads |= {
            "module.global_CNN.fc.weight": torch.randn(1000, 2048),
            "module.global_CNN.fc.bias": torch.randn(1000),
        }
    return heads


def test_mbv2_glance_keys_match_torchvision_one_to_one():
    """312 tensors under ``module.global_CNN.features.``, in torchvision's order, shape and value."""
    torch.manual_seed(0)
    model = AdaFocusV2(3, "mbv2", num_frames=2, input_size=64, patch_size=32, **CPU)
    reference = tvm.mobilenet_v2().features.state_dict()  # fresh random weights, loaded into the glance
    model.glance.trunk.load_state_dict(reference)
    state = to_official_state_dict(model)
    glance = [k for k in state if k.startswith("module.global_CNN.features.")]
    assert len(glance) == len(reference) == 312
    assert not any(k.startswith("module.global_CNN.") and k not in glance for k in state)
    nesting = {
        "0": {"0", "1"},  # stem conv, BN
        "1": {"conv.0", "conv.1", "conv.3", "conv.4"},  # no expansion: dw conv, BN, pw conv, BN
        "18": {"0", "1"},  # last 1x1 conv, BN
    }
    expanded = {"conv.0", "conv.1", "conv.3", "conv.4", "conv.6", "conv.7"}
    torchvision_of = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}  # SPEC §6
    torchvision_of_first = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
    seen: dict[str, set[str]] = {}
    for ours, (ref_key, ref_value) in zip(glance, reference.items(), strict=True):
        assert state[ours].shape == ref_value.shape and torch.equal(state[ours], ref_value), (ours, ref_key)
        m = re.match(r"module\.global_CNN\.features\.(\d+)\.(conv\.\d+|\d+)\.(\w+)$", ours)
        assert m, ours
        block, sub, param = m.groups()
        seen.setdefault(block, set()).add(sub)
        if sub.startswith("conv."):  # the flat published index names torchvision's nested module
            table = torchvision_of_first if block == "1" else torchvision_of
            assert ref_key == f"{block}.conv.{table[sub.removeprefix('conv.')]}.{param}"
        else:
            assert ref_key == f"{block}.{sub}.{param}"
    assert sorted(seen, key=int) == [str(i) for i in range(19)]
    for block, subs in seen.items():
        assert subs == nesting.get(block, expanded), block


@pytest.mark.parametrize("glance", ["mbv2", "res50"])
def test_published_layout_round_trip(tmp_path, glance):
    torch.manual_seed(0)
    model = AdaFocusV2(7, glance, patch_size=64, num_frames=2, input_size=96, **CPU)
    with torch.no_grad():  # non-trivial BN statistics, so a buffer that is not loaded shows in the outputs
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    path = tmp_path / f"actnet_p64_{glance}.pth.tar"
    state = published(model, path, imagenet_heads(glance, focus_dim=512))
    assert all(k.startswith("module.") for k in state)
    assert not any(k.startswith("module.classifier.") and "head" in k for k in state)
    assert "module.policy_stn.encoder.4.weight" in state and "module.classifier.classifiers.1.1.bias" in state

    converted = from_official_state_dict(state)  # the ImageNet classifiers are dropped
    assert converted.keys() == model.state_dict().keys()
    loaded = AdaFocusV2.from_official_checkpoint(path, focus_arch="res18", input_size=96).eval()
    inferred = (loaded.num_classes, loaded.num_frames, loaded.patch_size, loaded.glance.dim)
    assert inferred == (7, 2, 64, model.glance.dim)  # classes, frames from tensors; patch from the name
    video = torch.randn(1, 2, 3, 96, 96)
    with torch.no_grad():
        a, b = model(video), loaded(video)
    for field in ("logits", "global_logits", "local_logits", "actions"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    # and it really was loaded (a fresh model has running_var 1 and other random weights)
    assert torch.equal(loaded.policy.encoder[1].running_var, model.policy.encoder[1].running_var)
    assert not torch.equal(model.policy.encoder[1].running_var, torch.ones(64))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A small published-layout state dict (mbv2 glance, res18 focus) and a writer for damaged copies."""
    torch.manual_seed(0)
    model = AdaFocusV2(5, "mbv2", patch_size=32, num_frames=3, input_size=64, **CPU)
    state = to_official_state_dict(model)
    root = tmp_path_factory.mktemp("published")

    def write(state, name="minik_p32_mbv2.pth.tar"):
        path = root / name
        torch.save({"state_dict": state}, path)
        return path

    return state, write


def load(path, **kwargs):
    return AdaFocusV2.from_official_checkpoint(path, focus_arch="res18", input_size=64, **kwargs)


def test_small_file_loads(small_file):
    state, write = small_file
    model = load(write(state))
    assert (model.num_classes, model.num_frames, model.patch_size) == (5, 3, 32)
    # without DataParallel's prefix too
    model = load(write({k.removeprefix("module."): v for k, v in state.items()}))
    assert model.num_classes == 5


@pytest.mark.parametrize(
    "damage, listed",
    [
        ("missing", r"missing \(1\): \['focus.layer1.0.conv1.weight'\]"),
        ("unexpected", r"unexpected \(1\): \['policy.extra.weight'\]"),
        ("shape", r"shape-mismatched \(1\): \['local_head.1.bias: checkpoint \(6,\) vs model \(5,\)'\]"),
    ],
)
def test_corrupted_file_lists_the_bad_keys(small_file, damage, listed):
    state, write = small_file
    state = dict(state)
    if damage == "missing":
        del state["module.local_CNN.layer1.0.conv1.weight"]
    elif damage == "unexpected":
        state["module.policy_stn.extra.weight"] = torch.zeros(1)
    else:
        state["module.local_CNN_fc.1.bias"] = torch.zeros(6)
    path = write(state, f"actnet_p32_{damage}.pth.tar")
    with pytest.raises(ValueError, match=listed) as err:
        load(path)
    assert str(path) in str(err.value)


def test_other_bad_files(small_file, tmp_path):
    state, write = small_file
    # the given kwargs win over what the tensors say, and a disagreement is listed, never a partial load
    with pytest.raises(ValueError, match=r"shape-mismatched \(\d+\): \['classifier.head_bias"):
        load(write(state), num_classes=6)
    gap = {k: v for k, v in state.items() if not k.startswith("module.classifier.classifiers.1.")}
    with pytest.raises(ValueError, match=r"not numbered 0..T-1: \[0, 2\]"):
        load(write(gap))
    path = tmp_path / "empty.pth.tar"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="not an AdaFocusV2 checkpoint"):
        load(path)


class _Namespace:  # an arbitrary pickled object: weights_only=True must refuse it
    pass


def test_loading_uses_weights_only(small_file):
    state, write = small_file
    path = write(state)
    torch.save({"state_dict": state, "args": _Namespace()}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load(path)
