"""Configuration (issue 4): the ten published recipes compose to SPEC §2's numbers, and bad configuration
is caught with a clear message before any work starts."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from adafocus.pipeline import check_config, train

ROOT = Path(__file__).resolve().parents[1]

# SPEC §2, typed from the spec: the ten published runs and each dataset's recipe.
RECIPES = [("actnet", glance, patch) for glance in ("mbv2", "res50") for patch in (96, 128, 160)]
RECIPES += [(dataset, glance, 128) for dataset in ("fcvid", "minik") for glance in ("mbv2", "res50")]
SPEC = {  # classes, base_lr, total batch, metric, multi-label
    "actnet": (200, 0.002, 32, "map", True),
    "fcvid": (239, 0.002, 32, "map", True),
    "minik": (200, 0.003, 48, "top1", False),
}
LISTS = {  # SPEC §3: the files the original's splits come as
    "actnet": ("actnet_train_split.txt", "actnet_val_split.txt", "classInd.txt"),
    "fcvid": ("fcvid_train_split.txt", "fcvid_val_split.txt", "classInd.txt"),
    "minik": ("mini_train_videofolder.txt", "mini_val_videofolder.txt", "minik_classInd.txt"),
}
TINY = [
    "dataset.generate.num_train=16", "dataset.generate.num_val=9", "dataset.generate.frames_per_video=6",
    "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=2", "patch=16",
    "batch_size=4", "epochs=1", "workers=0", "backbone.stn_hidden_dim=32", "backbone.classifier_dim=64",
]  # fmt: skip


def compose_cfg(*overrides: str, name: str = "train"):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def recipe_data_dir(tmp_path: Path, dataset: str) -> Path:
    """A data_dir holding the dataset's list and class files and videos/ (what check_config looks for)."""
    for name in LISTS[dataset]:
        (tmp_path / name).write_text("")
    (tmp_path / "videos").mkdir(exist_ok=True)
    return tmp_path


def warnings_of(fn, *args) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------------ the ten published recipes
@pytest.mark.parametrize("dataset, glance, patch", RECIPES)
def test_published_recipe_resolves_to_spec(dataset, glance, patch, tmp_path):
    data_dir = recipe_data_dir(tmp_path, dataset)
    cfg = compose_cfg(f"dataset={dataset}", f"backbone={glance}", f"patch={patch}", f"data_dir={data_dir}")
    classes, lr, batch, metric, multilabel = SPEC[dataset]

    # the knobs and the nodes that are actually instantiated agree with the recipe
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.num_frames, cfg.patch) == (lr, batch, 50, 16, patch)
    assert (cfg.dataset.metric, cfg.dataset.multilabel, cfg.dataset.num_classes) == (
        metric,
        multilabel,
        classes,
    )
    model = cfg.model
    assert model._target_ == "adafocus.models.AdaFocusV2"
    assert (model.num_classes, model.patch_size, model.num_frames, model.input_size) == (
        classes,
        patch,
        16,
        224,
    )
    assert (model.glance_arch, model.focus_arch) == (glance, "res50")
    assert (model.dropout, model.fc_dropout) == (0.2, 0.2)
    assert (model.stn_hidden_dim, model.classifier_dim) == (2048, 4096)
    assert model.pretrained is True and model.glance_size is None and model.glance_ckpt is None
    data = cfg.data
    assert (data.batch_size, data.num_frames, data.input_size, data.num_classes) == (batch, 16, 224, classes)
    assert (data.train_list, data.val_list, data.class_index) == LISTS[dataset]
    assert data.multilabel is multilabel and data.augment is True and data.generate is None
    assert data.data_dir == str(data_dir) and data.decode_short_side == 360
    assert data.list_format == ("space" if dataset == "minik" else "comma")
    assert data.frame_template == ("img_{:05d}.jpg" if dataset == "minik" else "image_{:05d}.jpg")

    # optimiser: SGD momentum 0.9, wd 1e-4 everywhere, no Nesterov; groups lr x (0.1, 0.5, 1, 5)
    opt = cfg.optim.optimizer
    assert (opt._target_, opt._partial_, opt.momentum, opt.weight_decay, opt.nesterov) == (
        "torch.optim.SGD", True, 0.9, 1e-4, False,
    )  # fmt: skip
    assert dict(cfg.optim.lr_ratios) == {"policy": 0.1, "glance": 0.5, "focus": 1.0, "classifier": 5.0}

    # W&B by default on the real datasets, a GPU trainer, best + last checkpoints
    assert cfg.logger.name == "wandb" and cfg.logger.project == "adafocus"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert cfg.checkpoint.save_last is True and cfg.checkpoint.save_top_k == 1

    # the recipe is the recipe exactly: no lr/batch warning; only res50 without glance_ckpt warns
    caught = warnings_of(check_config, cfg, "train")
    assert not [w for w in caught if "differs" in w], caught
    assert [w for w in caught if "glance_ckpt" in w] == ([] if glance == "mbv2" else caught), caught
    assert len(caught) == (glance == "res50")


def test_res50_with_its_glance_checkpoint_is_the_recipe_without_warnings(tmp_path):
    data_dir = recipe_data_dir(tmp_path, "actnet")
    ckpt = tmp_path / "Initialization_model_prime_resnet50_patch_size_96_or_128.pth"
    cfg = compose_cfg(
        "dataset=actnet", "backbone=res50", f"data_dir={data_dir}", f"backbone.glance_ckpt={ckpt}"
    )
    assert cfg.model.glance_ckpt == str(ckpt)
    assert warnings_of(check_config, cfg, "train") == []
    # evaluating a checkpoint does not need the glance initialisation: no warning either
    assert (
        warnings_of(
            check_config, compose_cfg("dataset=actnet", "backbone=res50", f"data_dir={data_dir}"), "eval"
        )
        == []
    )


def test_embedded_default_composes_to_the_cpu_task():
    cfg = compose_cfg()
    assert cfg.dataset.name == "synthetic" and cfg.logger.name == "csv" and cfg.trainer.accelerator == "cpu"
    assert (cfg.model.glance_arch, cfg.model.focus_arch, cfg.model.pretrained) == ("mbv3s", "res18", False)
    assert cfg.data.generate.size % cfg.data.generate.grid == 0
    assert cfg.data.data_dir == "data/synthetic"


# ------------------------------------------------------------------ bad configuration, before any work
def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("dataset=kinetics")
    for option in ("synthetic", "actnet", "fcvid", "minik"):
        assert option in str(err.value)
    with pytest.raises(ConfigCompositionException, match="mbv2"):
        compose_cfg("backbone=vit")


def test_unknown_group_option_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "backbone=vit", f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Could not find 'backbone/vit'" in result.stderr
    for option in ("cpu", "mbv2", "res50"):
        assert option in result.stderr
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("dataset", ["actnet", "fcvid", "minik"])
def test_missing_data_dir_names_the_expected_list_file(dataset, tmp_path):
    data_dir = tmp_path / "nowhere"
    cfg = compose_cfg(f"dataset={dataset}", f"data_dir={data_dir}")
    train_list, val_list, class_index = LISTS[dataset]
    with pytest.raises(FileNotFoundError) as err:
        check_config(cfg, "train")
    message = str(err.value)
    assert "data_dir" in message
    for name in (train_list, val_list, class_index):
        assert str(data_dir / name) in message
    assert f"{data_dir / 'videos'}/" in message  # and where the videos go
    # evaluation needs only the val list and the class index
    with pytest.raises(FileNotFoundError) as err:
        check_config(cfg, "eval")
    assert str(data_dir / val_list) in str(err.value) and train_list not in str(err.value)


def test_missing_data_dir_stops_train_before_work(tmp_path):
    cfg = compose_cfg("dataset=actnet", "backbone=cpu", "logger=csv", "trainer=cpu",
                      f"data_dir={tmp_path / 'x'}", f"output_dir={tmp_path / 'out'}")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="actnet_train_split.txt"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_missing_ckpt_path_file_errors_before_work(tmp_path):
    cfg = compose_cfg(*TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}", f"data_root={tmp_path / 'data'}",
                      f"output_dir={tmp_path / 'out'}")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_res50_without_glance_ckpt_warns(tmp_path):
    data_dir = recipe_data_dir(tmp_path, "minik")
    cfg = compose_cfg("dataset=minik", "backbone=res50", f"data_dir={data_dir}")
    with pytest.warns(UserWarning, match=r"backbone=res50 without backbone\.glance_ckpt"):
        check_config(cfg, "train")


@pytest.mark.parametrize("patch, size", [(64, 64), (96, 64), (0, 64)])
def test_patch_not_smaller_than_frame_errors(patch, size, tmp_path):
    cfg = compose_cfg(*TINY, f"patch={patch}", f"dataset.input_size={size}", f"data_root={tmp_path / 'data'}",
                      f"output_dir={tmp_path / 'out'}")  # fmt: skip
    with pytest.raises(ValueError, match=f"patch={patch} must be smaller than .*dataset.input_size={size}"):
        check_config(cfg)
    with pytest.raises(ValueError, match=f"patch={patch}"):
        train(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # before any work


def test_batch_not_divisible_by_devices_errors_before_work(tmp_path):
    cfg = compose_cfg(*TINY, "batch_size=5", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      f"data_root={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}")  # fmt: skip
    with pytest.raises(ValueError, match=r"batch_size=5 .*divisible by the 2 processes"):
        train(cfg)
    assert not (tmp_path / "data").exists()  # no data generated, no training
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("knob, value", [("batch_size", 8), ("lr", 0.01)])
def test_lr_or_batch_differing_from_recipe_warns(knob, value, tmp_path):
    data_dir = recipe_data_dir(tmp_path, "actnet")
    cfg = compose_cfg("dataset=actnet", f"data_dir={data_dir}", f"{knob}={value}")
    recipe = {"batch_size": 32, "lr": 0.002}[knob]
    caught = warnings_of(check_config, cfg, "train")
    assert (
        len(caught) == 1 and f"{knob}={value} differs from the dataset=actnet recipe's {recipe}" in caught[0]
    )
    assert cfg.data.batch_size == cfg.batch_size  # the knob is what the data module gets
    assert warnings_of(check_config, cfg, "eval") == []  # evaluation does not care
