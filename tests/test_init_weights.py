"""Initial weights from files (issue 10): the original's ImageNet MobileNetV2 glance file (``glance_ckpt``)
and fine-tuning from a trained checkpoint (``init_from_checkpoint``)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from adafocus.models import AdaFocusV2, to_official_state_dict
from adafocus.models.finetune import init_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------- fine-tuning: init_from_checkpoint
def randomised(model: AdaFocusV2) -> AdaFocusV2:
    """Non-trivial BN statistics and counters, so a buffer that is not loaded shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return model


def small(num_classes: int, **kwargs) -> AdaFocusV2:
    args = dict(glance_arch="mbv2", patch_size=32, num_frames=3, input_size=64, **CPU)
    return AdaFocusV2(num_classes, **{**args, **kwargs})


IMAGENET_HEADS = {
    "module.global_CNN.classifier.weight": torch.zeros(1000, 1280),
    "module.global_CNN.classifier.bias": torch.zeros(1000),
    "module.local_CNN.fc.weight": torch.zeros(1000, 512),
    "module.local_CNN.fc.bias": torch.zeros(1000),
}
# our names of the three classifier heads (the recurrent classifier's T step heads are stacked)
HEAD_NAMES = {"glance_head.1.weight", "glance_head.1.bias", "local_head.1.weight", "local_head.1.bias",
              "classifier.head_weight", "classifier.head_bias"}  # fmt: skip


@pytest.fixture(scope="module")
def published_5_classes(tmp_path_factory):
    """A published-layout file (SPEC §6, with the unused ImageNet heads) of a 5-class model, and the model."""
    torch.manual_seed(1)
    source = randomised(small(5))
    state = to_official_state_dict(source)
    assert "module.classifier.classifiers.2.1.weight" in state and "module.global_CNN_fc.1.bias" in state
    path = tmp_path_factory.mktemp("published") / "actnet_p32_mbv2.pth.tar"
    torch.save({"state_dict": {**state, **IMAGENET_HEADS}}, path)
    return path, source


def test_published_file_into_a_model_with_other_classes(published_5_classes):
    path, source = published_5_classes
    torch.manual_seed(2)
    model = small(3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    summary = init_from_checkpoint(model, path)
    state, expected = model.state_dict(), source.state_dict()
    assert expected["classifier.head_weight"].shape == (3, 5, 64)
    assert state["classifier.head_weight"].shape == (3, 3, 64)
    for key, value in state.items():
        if key in HEAD_NAMES:
            assert torch.equal(value, fresh[key]), key  # the fresh initialisation kept
        else:
            assert torch.equal(value, expected[key]), key
    assert len(state) - len(HEAD_NAMES) == len(summary.loaded) and not summary.missing
    assert (summary.source, summary.source_classes, summary.num_classes) == ("published", 5, 3)
    assert sorted(r.split(":")[0] for r in summary.reinitialised) == sorted(HEAD_NAMES)
    assert "classifier.head_weight: file (3, 5, 64) -> model (3, 3, 64)" in summary.reinitialised
    assert summary.ignored == sorted(IMAGENET_HEADS)
    text = str(summary)
    assert text.startswith(f"init_from {path} (published checkpoint, 5 classes -> 3)")
    assert f"loaded ({len(summary.loaded)}): classifier 7, focus 120, glance 312, policy 19" in text
    assert "re-initialised (6): glance_head.1.weight: file (5, 1280) -> model (3, 1280)," in text
    assert "ignored from the file (4): module.global_CNN.classifier.bias" in text


def test_same_class_count_loads_everything_exactly(published_5_classes):
    path, source = published_5_classes
    torch.manual_seed(3)
    model = small(5)
    summary = init_from_checkpoint(model, path)
    assert not summary.reinitialised and len(summary.loaded) == len(model.state_dict())
    expected = source.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    video = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(video).logits, source.eval()(video).logits)


def test_other_mismatches_are_errors_naming_the_tensor(published_5_classes, tmp_path):
    path, _ = published_5_classes
    state = torch.load(path, weights_only=True)["state_dict"]
    bad = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": {**state, "module.policy_stn.fc.0.weight": torch.zeros(2, 16)}}, bad)
    torch.manual_seed(4)
    model = small(3)  # other classes too: the heads are excused, the policy's Linear is not
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"policy.fc.0.weight: file \(2, 16\) vs model \(2, 32\)") as err:
        init_from_checkpoint(model, bad)
    assert str(bad) in str(err.value) and "shape-mismatched (1)" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded
    # a model of another width: every differing tensor is listed with both shapes
    with pytest.raises(ValueError, match=r"classifier.mlp.0.weight: file \(64, 1792\) vs model \(32, 1792\)"):
        init_from_checkpoint(small(5, classifier_dim=32), path)
    missing = {k: v for k, v in state.items() if k != "module.local_CNN.layer1.0.conv1.weight"}
    torch.save({"state_dict": missing}, bad)
    with pytest.raises(ValueError, match=r"missing \(1\): \['focus.layer1.0.conv1.weight'\]"):
        init_from_checkpoint(small(3), bad)
    torch.save({"state_dict": {**state, "module.policy_stn.extra.bias": torch.zeros(2)}}, bad)
    with pytest.raises(ValueError, match=r"unexpected \(1\): \['policy.extra.bias'\]"):
        init_from_checkpoint(small(3), bad)
    torch.save({"state_dict": state, "args": object.__new__(_NotAWeight)}, bad)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True
        init_from_checkpoint(small(3), bad)
    torch.save({"epoch": 3}, bad)
    with pytest.raises(ValueError, match="state_dict"):
        init_from_checkpoint(small(3), bad)


def test_our_lightning_checkpoint_into_a_model_with_other_classes(tmp_path):
    """A real Lightning checkpoint (one training step of the composed tiny config) as the source."""
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from adafocus.module import AdaFocusModule

    tiny = ["dataset.input_size=64", "num_frames=2", "patch=16", "batch_size=2", "epochs=1",
            "backbone.stn_hidden_dim=32", "backbone.classifier_dim=64", f"output_dir={tmp_path}"]  # fmt: skip
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=tiny), resolve=True)
    torch.manual_seed(5)
    module = AdaFocusModule(cfg)
    batches = [{"video": torch.randn(2, 3, 64, 64), "label": torch.tensor(i % 4)} for i in range(2)]
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=2))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    source = {k: v.clone() for k, v in module.model.state_dict().items()}

    cfg["model"]["num_classes"] = 7
    model = AdaFocusModule(cfg).model
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    summary = init_from_checkpoint(model, path)
    assert (summary.source, summary.source_classes, summary.num_classes) == ("lightning", 4, 7)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key] if key in HEAD_NAMES else source[key]), key
    assert not torch.equal(source["policy.encoder.1.running_mean"], fresh["policy.encoder.1.running_mean"])
