"""Initial weights from files (issue 10): the original's ImageNet MobileNetV2 glance file (``glance_ckpt``)
and fine-tuning from a trained checkpoint (``init_from_checkpoint``)."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from torchvision import models as tvm

from adafocus.models import AdaFocusV2

CPU = dict(focus_arch="res18", stn_hidden_dim=32, classifier_dim=64, pretrained=False)  # toy widths


# ------------------------------------------------------ glance_ckpt: mobilenetv2_1.0-f2a8633.pth.tar
def published_mbv2_name(tv_key: str) -> str:
    """torchvision ``mobilenet_v2().features`` key -> the original MobileNetV2's key (SPEC §6), by a fixed
    table: inverted residual ``conv.0.0, conv.0.1, conv.1.0, conv.1.1, conv.2, conv.3`` are the flat
    ``conv.0, 1, 3, 4, 6, 7``; the first block (no expansion) ``conv.0.0, conv.0.1, conv.1, conv.2`` are
    ``conv.0, 1, 3, 4``; the stem ``0.{0,1}`` and the last ``18.{0,1}`` are the same."""
    expanded = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}
    first = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
    m = re.match(r"(\d+)\.conv\.(\d+(?:\.\d+)?)\.(\w+)$", tv_key)
    if m is None:
        assert re.match(r"(0|18)\.[01]\.\w+$", tv_key), tv_key
        return f"features.{tv_key}"
    block, sub, param = m.groups()
    return f"features.{block}.conv.{(first if block == '1' else expanded)[sub]}.{param}"


def original_mbv2_file(path, wrap: bool = False, drop_counters: bool = False) -> dict[str, torch.Tensor]:
    """Write a MobileNetV2 ImageNet file in the original's layout from a random torchvision model; return
    the torchvision-named trunk weights it holds."""
    reference = tvm.mobilenet_v2()
    with torch.no_grad():
        for module in reference.modules():  # non-trivial BN statistics: a buffer not loaded would show
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    trunk = reference.features.state_dict()
    state = {published_mbv2_name(k): v for k, v in trunk.items()}
    assert state["features.2.conv.7.weight"].shape == (24,)  # the last BN of block 2 (24 channels)
    assert state["features.1.conv.3.weight"].shape == (16, 32, 1, 1)  # the pw-linear conv of block 1
    state["classifier.weight"], state["classifier.bias"] = torch.randn(1000, 1280), torch.randn(1000)
    if drop_counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if wrap:
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(state, path)
    return trunk


@pytest.mark.parametrize(
    "wrap, drop_counters",
    [(False, False), (True, False), (False, True)],
    ids=["plain", "wrapped", "no-bn-counters"],
)
def test_glance_ckpt_loads_the_original_mobilenetv2_file(tmp_path, wrap, drop_counters):
    torch.manual_seed(0)
    path = tmp_path / "mobilenetv2_1.0-f2a8633.pth.tar"
    expected = original_mbv2_file(path, wrap, drop_counters)
    model = AdaFocusV2(3, "mbv2", patch_size=32, num_frames=2, input_size=64, glance_ckpt=str(path), **CPU)
    loaded = model.glance.trunk.state_dict()
    assert loaded.keys() == expected.keys() and len(expected) == 312
    for key, value in expected.items():
        if drop_counters and key.endswith("num_batches_tracked"):
            assert loaded[key] == 0, key  # what load_state_dict gives a file without the counters
        else:
            assert torch.equal(loaded[key], value), key


def test_glance_ckpt_mobilenetv2_errors_name_file_and_keys(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mobilenetv2_1.0-f2a8633.pth.tar"
    original_mbv2_file(path)
    state = torch.load(path, weights_only=True)
    state["features.3.conv.6.weight"] = torch.zeros(24, 144, 3, 3)  # a 1x1 conv of another shape
    del state["features.18.1.running_var"]
    state["features.4.conv.2.weight"] = torch.zeros(1)  # index 2 is a ReLU6 in the original: no weights
    bad = tmp_path / "bad_mbv2.pth.tar"
    torch.save(state, bad)
    with pytest.raises(ValueError, match="does not match the glance trunk") as err:
        AdaFocusV2(3, "mbv2", patch_size=32, num_frames=2, input_size=64, glance_ckpt=str(bad), **CPU)
    message = str(err.value)
    assert str(bad) in message
    assert "missing ['18.1.running_var'] (1)" in message
    assert "unexpected ['features.4.conv.2.weight'] (1)" in message
    assert "shape-mismatched ['3.conv.2.weight']" in message  # torchvision's name of features.3.conv.6
    torch.save({"state_dict": state, "args": object.__new__(_NotAWeight)}, bad)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True
        AdaFocusV2(3, "mbv2", patch_size=32, num_frames=2, input_size=64, glance_ckpt=str(bad), **CPU)
    # a ResNet glance given the MobileNetV2 file
    with pytest.raises(ValueError, match=r"missing \['bn1.bias'"):
        AdaFocusV2(3, "res50", patch_size=32, num_frames=2, input_size=64, glance_ckpt=str(path), **CPU)


class _NotAWeight:
    pass
