"""The per-epoch learning-rate schedules (SPEC §2, issue 10): ``optim.schedule=cosine|step`` on the real
optimiser that ``AdaFocusModule.configure_optimizers`` builds from the composed config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from adafocus.module import AdaFocusModule

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.input_size=64", "num_frames=2", "patch=16", "backbone.stn_hidden_dim=32",
        "backbone.classifier_dim=64", "output_dir=unused", "optimizer=sgd", "lr=0.02"]  # fmt: skip


def lrs_per_epoch(*overrides: str) -> tuple[list[dict[str, float]], dict]:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=[*TINY, *overrides]), resolve=True)
    setup = AdaFocusModule(cfg).configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert setup["lr_scheduler"]["interval"] == "epoch"
    out = []
    for _ in range(cfg["epochs"] + 1):  # what Lightning does: one scheduler step after each epoch
        out.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    return out, cfg["optim"]["lr_ratios"]


def test_cosine_is_the_default():
    lrs, ratios = lrs_per_epoch("epochs=4")
    assert len(lrs) == 5
    for epoch, lr in enumerate(lrs):
        expected = 0.5 * 0.02 * (1 + math.cos(math.pi * epoch / 4))
        assert lr == pytest.approx({k: expected * r for k, r in ratios.items()}, abs=1e-12)


def test_step_decays_by_gamma_at_each_milestone():
    lrs, ratios = lrs_per_epoch("epochs=6", "optim.schedule=step", "optim.milestones=[2,5]")
    # the original's adjust_learning_rate: lr = base_lr * 0.1 ** (number of milestones <= epoch)
    decay = [1, 1, 0.1, 0.1, 0.1, 0.01, 0.01]
    for epoch, lr in enumerate(lrs):
        assert lr == pytest.approx({k: 0.02 * decay[epoch] * r for k, r in ratios.items()}, rel=1e-9), epoch
    lrs, _ = lrs_per_epoch("epochs=3", "optim.schedule=step", "optim.milestones=[1]", "optim.gamma=0.5")
    assert [lr["focus"] for lr in lrs] == pytest.approx([0.02, 0.01, 0.01, 0.01])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.schedule=linear"], "optim.schedule='linear'"),
        (["optim.schedule=step"], r"optim.schedule=step needs optim.milestones.*got \[\]"),
        (["optim.schedule=step", "optim.milestones=[0,3]"], r"epochs >= 1.*got \[0, 3\]"),
    ],
)
def test_bad_schedule_is_an_error_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        lrs_per_epoch("epochs=3", *overrides)
