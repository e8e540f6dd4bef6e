"""The training framework (issue 4): configs, the training step, train/evaluate/resume, DDP, W&B, multirun."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adafocus.module import AdaFocusModule
from adafocus.tasks import early_exit, evaluate, train
from adafocus.tasks.common import check_config, plain_config, set_threads

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset.generate.num_train=12", "dataset.generate.num_val=9", "dataset.generate.frames_per_video=6",
    "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=2",
    "patch=16", "batch_size=4", "epochs=1", "workers=0", "backbone.stn_hidden_dim=32",
    "backbone.classifier_dim=64",
]  # fmt: skip
# SPEC §2: the ten published recipes and their numbers
RECIPES = [("actnet", g, p) for g in ("mbv2", "res50") for p in (96, 128, 160)]
RECIPES += [("fcvid", g, 128) for g in ("mbv2", "res50")] + [("minik", g, 128) for g in ("mbv2", "res50")]
SPEC = {
    "actnet": dict(lr=0.002, batch=32, classes=200, metric="map"),
    "fcvid": dict(lr=0.002, batch=32, classes=239, metric="map"),
    "minik": dict(lr=0.003, batch=48, classes=200, metric="top1"),
}


def config(*overrides: str, name: str = "train"):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def val_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r.get("val/top1")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("run")
    return train(config(*TINY, f"data_root={data_root}", f"output_dir={out}")), out


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("dataset, backbone, patch", RECIPES)
def test_published_recipes_compose(dataset, backbone, patch):
    short = config(f"dataset={dataset}", f"backbone={backbone}", f"patch={patch}", "data_dir=/data/x")
    preset = config(f"experiment={dataset}_{backbone}_p{patch}", "data_dir=/data/x")
    without_loggers = [OmegaConf.to_container(c, resolve=False) for c in (short, preset)]
    for c in without_loggers:
        c.pop("logger")
    assert without_loggers[0] == without_loggers[1]  # both spellings give the same run
    assert list(preset.logger) == ["csv", "wandb"] and list(short.logger) == ["csv"]
    spec = SPEC[dataset]
    for cfg in (short, preset):
        assert (cfg.lr, cfg.batch_size, cfg.data.batch_size, cfg.epochs, cfg.trainer.max_epochs) == (
            spec["lr"], spec["batch"], spec["batch"], 50, 50,
        )  # fmt: skip
        assert cfg.model.patch_size == patch and cfg.model.num_frames == cfg.data.num_frames == 16
        assert cfg.model.num_classes == cfg.data.num_classes == spec["classes"]
        assert cfg.dataset.metric == spec["metric"] and cfg.dataset.multilabel == (spec["metric"] == "map")
        assert cfg.model.glance_arch == backbone and cfg.model.focus_arch == "res50"
        assert cfg.model.input_size == 224 and cfg.model.dropout == cfg.model.fc_dropout == 0.2
        assert cfg.policy.hidden_dim == 2048 and cfg.model.classifier_dim == 4096 and cfg.model.pretrained
        assert cfg.policy._target_ == "adafocus.models.policy.PolicyNetwork"
        assert [p._target_ for p in cfg.aux_policies] == ["adafocus.models.policy.RandomPolicy"]
        assert dict(cfg.optim.lr_ratios) == {"policy": 0.1, "glance": 0.5, "focus": 1.0, "classifier": 5.0}
        opt = cfg.optim.optimizer
        assert (opt._target_, opt.momentum, opt.weight_decay) == ("torch.optim.SGD", 0.9, 1e-4)
        assert opt.nesterov is False
        assert cfg.data.data_dir == "/data/x" and cfg.data.decode_short_side == 360
        assert cfg.trainer.accelerator == "auto"  # runs anywhere; the recipe's GPUs are a warning on a CPU


def test_bad_configuration_is_caught_before_work(tmp_path):
    with pytest.raises(ConfigCompositionException, match="synthetic"):  # Hydra lists the options
        config("dataset=kinetics")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "actnet_train_split.txt")):
        check_config(config("dataset=actnet", f"data_dir={tmp_path}"))
    for name in ("actnet_train_split.txt", "actnet_val_split.txt", "classInd.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(FileNotFoundError, match="videos/"):  # lists there, but no videos
        check_config(config("dataset=actnet", f"data_dir={tmp_path}"))
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        check_config(config(f"ckpt_path={tmp_path / 'missing.ckpt'}"))
    with pytest.raises(ValueError, match="epochs=0"):
        check_config(config("epochs=0"))
    with pytest.raises(ValueError, match="patch=64"):
        check_config(config("patch=64", "dataset.input_size=64"))
    with pytest.warns(UserWarning, match="glance_ckpt"):
        check_config(config("backbone=res50"))
    with pytest.warns(UserWarning, match="batch_size=8 differs"):
        check_config(config("batch_size=8"))
    with pytest.raises(ValueError, match="divisible"):
        ddp = ["trainer=ddp", "trainer.accelerator=cpu"]
        train(config(*TINY, "batch_size=5", *ddp, f"output_dir={tmp_path}", f"data_root={tmp_path}"))
    with pytest.raises(ValueError, match="threads must be >= 1"):  # before any data is generated
        train(config(*TINY, "threads=0", f"output_dir={tmp_path}", f"data_root={tmp_path / 'none'}"))
    assert not (tmp_path / "none").exists()


def test_threads_sets_this_process_and_the_ddp_processes_lightning_starts(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after the test
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    try:
        set_threads(other)
        assert torch.get_num_threads() == other and os.environ["OMP_NUM_THREADS"] == str(other)
        set_threads(None)  # null: PyTorch's default, left as it is
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be >= 1"):
            set_threads(bad)


# ------------------------------------------------------------------ the training step
def test_one_step_reaches_every_parameter_and_sets_group_lrs(data_root, tmp_path):
    cfg = config(*TINY, f"data_root={data_root}", f"output_dir={tmp_path}", "optimizer=sgd")
    module = AdaFocusModule(plain_config(cfg))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)  # normalised
    loss = module.training_step(batch, 0)
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    optimizer = module.configure_optimizers()["optimizer"]
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {k: cfg.lr * r for k, r in cfg.optim.lr_ratios.items()}
    )
    assert type(optimizer).__name__ == "SGD" and optimizer.defaults["momentum"] == 0.9


def test_per_epoch_cosine_schedule(data_root, tmp_path):
    cfg = config(*TINY, f"data_root={data_root}", f"output_dir={tmp_path}", "epochs=5")
    module = AdaFocusModule(plain_config(cfg))
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert setup["lr_scheduler"]["interval"] == "epoch"
    for epoch in range(6):
        lr = {g["name"]: g["lr"] for g in optimizer.param_groups}
        expected = 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / 5))
        assert lr["focus"] == pytest.approx(expected, abs=1e-12)
        assert lr["policy"] == pytest.approx(expected * cfg.optim.lr_ratios.policy, abs=1e-12)
        optimizer.step()
        scheduler.step()


# ------------------------------------------------------------------ train, evaluate, resume
def test_train_then_evaluate_agree(trained, tmp_path):
    results, out = trained
    best = Path(results["best_checkpoint"])
    ckpt = torch.load(best, map_location="cpu", weights_only=True)  # plain containers only
    assert ckpt["hyper_parameters"]["config"]["dataset"]["name"] == "synthetic"
    assert results["gflops"] > 0 and len(val_rows(out)) == 1
    # evaluate.py with nothing but the checkpoint: its stored config, in a subprocess
    eval_dir = tmp_path / "eval"
    run("evaluate.py", f"ckpt_path={best}", f"hydra.run.dir={eval_dir}")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert set(metrics) >= {"top1", "top5", "gflops", "num_videos"} and metrics["num_videos"] == 9
    assert metrics["top1"] == pytest.approx(results["best_top1"])
    assert metrics["gflops"] == pytest.approx(results["gflops"])


def test_evaluate_a_checkpoint_in_the_published_layout(trained, data_root, tmp_path):
    from adafocus.models import to_official_state_dict

    results, _ = trained
    ours = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    module = AdaFocusModule(ours["hyper_parameters"]["config"])
    module.load_state_dict(ours["state_dict"])
    published = tmp_path / "synthetic_p16_mbv3s.pth.tar"
    torch.save({"state_dict": to_official_state_dict(module.model)}, published)
    overrides = [f"ckpt_path={published}", *TINY, "backbone=cpu", f"data_root={data_root}"]
    metrics = evaluate(config(*overrides, f"output_dir={tmp_path}", name="evaluate"), overrides=overrides)
    assert metrics["top1"] == pytest.approx(results["best_top1"]) and metrics["num_videos"] == 9


def test_evaluate_multilabel_map_and_pictures(trained, data_root, tmp_path):
    results, _ = trained
    root = data_root / "synthetic"  # a multi-label list over the same videos: video i also has class (i+1)%4
    lines = (root / "val_split.txt").read_text().splitlines()
    multi = [f"{line},{(int(line.split(',')[2]) + 1) % 4}" if i % 2 else line for i, line in enumerate(lines)]
    (root / "multi_val.txt").write_text("\n".join(multi) + "\n")
    extra = ["dataset.multilabel=true", "dataset.val_list=multi_val.txt", "visualize=2"]
    best = results["best_checkpoint"]
    cfg = config(
        *TINY,
        f"data_root={data_root}",
        f"output_dir={tmp_path}",
        f"ckpt_path={best}",
        *extra,
        name="evaluate",
    )
    metrics = evaluate(cfg, overrides=extra)
    assert 0 <= metrics["map"] <= 100 and metrics["num_videos"] == 9
    assert json.loads((tmp_path / "metrics.json").read_text())["map"] == pytest.approx(metrics["map"])
    assert len(list((tmp_path / "focus").glob("*.png"))) == len(list((tmp_path / "focus").glob("*.gif"))) == 2


def test_resume_continues_epoch_and_schedule(data_root, tmp_path):
    first = train(config(*TINY, f"data_root={data_root}", f"output_dir={tmp_path / 'a'}", "epochs=2",
                         "trainer.max_epochs=1"))  # fmt: skip
    resumed = train(config(*TINY, f"data_root={data_root}", f"output_dir={tmp_path / 'b'}", "epochs=2",
                           f"ckpt_path={first['last_checkpoint']}"))  # fmt: skip
    rows = val_rows(tmp_path / "b")
    assert [int(r["epoch"]) for r in rows] == [1]  # only the second epoch ran
    assert resumed["epochs"] == 2
    with (tmp_path / "b" / "csv" / "metrics.csv").open() as f:
        lrs = [float(r["lr-AdamW/focus"]) for r in csv.DictReader(f) if r.get("lr-AdamW/focus")]
    assert lrs[0] == pytest.approx(0.5 * 1e-3 * (1 + math.cos(math.pi * 1 / 2)))  # epoch 1 of 2


def test_same_seed_same_metrics(trained, data_root, tmp_path):
    again = train(config(*TINY, f"data_root={data_root}", f"output_dir={tmp_path}"))
    assert again["best_top1"] == trained[0]["best_top1"]
    assert val_rows(tmp_path) == val_rows(trained[1])


# ------------------------------------------------------------------ DDP, W&B, multirun (real CLI)
def test_cpu_ddp_matches_one_process(trained, data_root, tmp_path):
    results, _ = trained
    best = results["best_checkpoint"]
    two = tmp_path / "two"
    a = evaluate(config(f"ckpt_path={best}", f"output_dir={tmp_path / 'one'}", name="evaluate"), overrides=[])
    run("evaluate.py", f"ckpt_path={best}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={two}")  # fmt: skip
    b = json.loads((two / "metrics.json").read_text())
    assert b["num_videos"] == a["num_videos"] == 9  # an odd number: nothing duplicated or dropped
    assert b["top1"] == a["top1"] and b["top5"] == a["top5"]
    # and DDP training runs end to end (gloo), validating every video once
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    run("train.py", *TINY, f"data_root={data_root}", *ddp, f"hydra.run.dir={tmp_path / 'train'}")
    assert len(list((tmp_path / "train" / "checkpoints").glob("best-*.ckpt"))) == 1


def test_wandb_offline_without_credentials(data_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"), WANDB_DIR=str(tmp_path))
    out = tmp_path / "run"
    result = run("train.py", *TINY, f"data_root={data_root}", "logger=wandb", f"hydra.run.dir={out}", env=env)
    hint = [line for line in result.stdout.splitlines() if line.startswith("W&B:")]  # one line, how to sync
    assert len(hint) == 1 and hint[0].endswith(f"wandb sync {out / 'wandb'}/offline-run-*"), result.stdout
    best = next((out / "checkpoints").glob("best-*.ckpt"))
    assert f"best checkpoint  {best}" in result.stdout  # the summary's path, whole
    assert list(out.glob("wandb/offline-run-*"))
    assert val_rows(out)  # the CSV log is always written


def test_evaluate_logs_metrics_and_the_class_report_to_wandb(trained, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"), WANDB_DIR=str(tmp_path))
    out = tmp_path / "eval"
    run("evaluate.py", f"ckpt_path={trained[0]['best_checkpoint']}", "logger=wandb", f"hydra.run.dir={out}",
        env=env)  # fmt: skip
    tables = list(out.glob("wandb/offline-run-*/files/media/table/report/per_class_*.table.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 4  # one row per class
    assert (out / "confusion.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["num_videos"] == 9


def test_multirun_jobs_get_their_own_directories(data_root, tmp_path):
    run("train.py", "-m", *TINY, f"data_root={data_root}", "patch=16,24", f"hydra.sweep.dir={tmp_path}")
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert list((job / "checkpoints").glob("best-*.ckpt"))
        assert OmegaConf.load(job / ".hydra" / "config.yaml").patch in (16, 24)


def test_trainer_arguments_logger_lists_and_debug_presets(data_root, tmp_path):
    out = tmp_path / "limited"
    train(config(*TINY, f"data_root={data_root}", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
                 "logger=[csv,tensorboard]", f"output_dir={out}"))  # fmt: skip
    rows = [r for r in csv.DictReader((out / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert len(rows) <= 2 and list((out / "tensorboard").glob("events.out.tfevents.*"))
    fdr = config(*TINY, f"data_root={data_root}", "debug=fdr", f"output_dir={tmp_path / 'fdr'}")
    assert fdr.trainer.fast_dev_run is True and fdr.workers == 0
    assert train(fdr)["epochs"] == 1  # one batch of each, then done


def test_evaluate_keeps_the_checkpoints_model(trained, tmp_path):
    """Runtime knobs come from the command line; a model-defining one that differs is an error."""
    results, _ = trained
    best = results["best_checkpoint"]

    def evaluate_with(*overrides: str, out: str) -> dict:
        cfg = config(f"ckpt_path={best}", f"output_dir={tmp_path / out}", *overrides, name="evaluate")
        return evaluate(cfg, overrides=list(overrides))

    metrics = evaluate_with("dataset.skip_bad_eval=true", "workers=0", "batch_size=3", out="a")
    assert metrics["top1"] == pytest.approx(results["best_top1"]) and metrics["skipped"] == 0
    assert evaluate_with("policy=learned", out="l")["top1"] == pytest.approx(
        metrics["top1"]
    )  # the trained one
    with pytest.raises(ValueError, match="model.patch_size: checkpoint 16, command line 24"):
        evaluate_with("patch=24", out="b")
    assert evaluate_with("patch=24", "allow_model_override=true", out="c")["gflops"] > metrics["gflops"]


@pytest.mark.slow
def test_predict_task_writes_a_prediction_file(trained, tmp_path):
    from adafocus.predictions import load_predictions

    results, _ = trained
    out = tmp_path / "train_preds.pt"
    run("-m", "adafocus.tasks.predict", f"ckpt_path={results['best_checkpoint']}", "split=train", "limit=5",
        "transform=train", f"out={out}", f"hydra.run.dir={tmp_path}")  # fmt: skip
    preds = load_predictions(out)
    assert preds["logits"].shape == (5, 2, 4) and len(preds["paths"]) == 5
    assert preds["paths"] == sorted(preds["paths"]) and all(p.startswith("train/") for p in preds["paths"])


@pytest.mark.slow
def test_train_on_your_own_videos_from_a_published_checkpoint(trained, tmp_path, capsys):
    """The README's path: a ROOT/<class>/<video> folder -> prepare build -> fine-tune a published-layout
    checkpoint with another class count (init_from) -> evaluate -> early exit."""
    from videos import numbered_frames, write_video

    from adafocus.models import to_official_state_dict

    results, _ = trained
    ours = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    module = AdaFocusModule(ours["hyper_parameters"]["config"])
    module.load_state_dict(ours["state_dict"])
    published = tmp_path / "synthetic_p16_mbv3s.pth.tar"  # 4 classes
    torch.save({"state_dict": to_official_state_dict(module.model)}, published)
    for c, name in enumerate(["jump", "run", "swim"]):
        for v in range(4):
            write_video(tmp_path / "root" / name / f"v{v}.mp4", numbered_frames(8, 48, 64, seed=4 * c + v))
    data = tmp_path / "data"
    run("-m", "adafocus.data.prepare", "build", str(tmp_path / "root"), str(data), "--val-fraction", "0.25",
        "--quiet")  # fmt: skip
    own = [
        "dataset=custom", "dataset.num_classes=3", f"data_dir={data}", "dataset.input_size=64",
        "dataset.decode_short_side=null", "backbone=cpu", "backbone.glance_size=8", "patch=16",
        "num_frames=2", "batch_size=3", "workers=0", "backbone.stn_hidden_dim=32",
        "backbone.classifier_dim=64",
    ]  # fmt: skip
    out = tmp_path / "finetune"
    capsys.readouterr()
    best = train(config(*own, "epochs=1", f"init_from={published}", f"output_dir={out}"))["best_checkpoint"]
    summary = capsys.readouterr().out
    assert "re-initialised" in summary and "glance_head.1.weight" in summary, summary
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert state["model.glance_head.1.weight"].shape[0] == 3
    metrics = evaluate(config(f"ckpt_path={best}", f"output_dir={tmp_path / 'eval'}", name="evaluate"), [])
    assert metrics["num_videos"] == 3 and 0 <= metrics["top1"] <= 100  # one val video per class
    curve = early_exit(
        config(f"ckpt_path={best}", "budgets=[1.0]", f"output_dir={tmp_path / 'ee'}", name="early_exit")
    )
    assert Path(curve["csv"]).is_file() and Path(curve["thresholds"]).is_file()


def test_multi_view_testing_averages_views_and_multiplies_gflops(trained, tmp_path):
    from adafocus.predictions import load_predictions

    best = trained[0]["best_checkpoint"]
    out = {}
    for name, views in {
        "single": [],
        "clips": ["test_clips=3"],
        "both": ["test_clips=2", "test_crops=3"],
    }.items():
        overrides = [*views, f"predictions_out={tmp_path / name}.pt"]
        cfg = config(f"ckpt_path={best}", f"output_dir={tmp_path / name}", *overrides, name="evaluate")
        out[name] = (evaluate(cfg, overrides=overrides), load_predictions(tmp_path / f"{name}.pt"))
    single, clips, both = (out[k][0] for k in ("single", "clips", "both"))
    assert (clips["views"], both["views"]) == (3, 6)
    assert clips["gflops"] == pytest.approx(3 * single["gflops"]) and both["gflops"] == pytest.approx(
        6 * single["gflops"]
    )
    assert out["clips"][1]["gflops_per_video"] == pytest.approx(clips["gflops"])
    assert not torch.allclose(out["single"][1]["logits"], out["clips"][1]["logits"])  # other frames were read
    assert not torch.allclose(out["clips"][1]["logits"], out["both"][1]["logits"])


def test_user_errors_are_one_clear_message(tmp_path):
    """A damaged checkpoint or a bad value: the message names it, no traceback (status 1)."""
    garbage, empty = tmp_path / "garbage.ckpt", tmp_path / "empty.ckpt"
    garbage.write_bytes(os.urandom(4096))
    empty.write_bytes(b"")
    args = [sys.executable, "evaluate.py", f"ckpt_path={garbage}", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and f"ckpt_path={garbage} cannot be read as a checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    for path, expected in [
        (empty, "cannot be read as a checkpoint"),
        (tmp_path / "missing.ckpt", "no such file"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=f"ckpt_path={path}.*{expected}"):
            evaluate(config(f"ckpt_path={path}", f"output_dir={tmp_path}", name="evaluate"), overrides=[])
    with pytest.raises(ValueError, match="epochs=0"):
        train(config("epochs=0", f"output_dir={tmp_path}"))


def test_evaluate_with_a_faster_cpu_runtime_gives_the_same_numbers(trained, tmp_path):
    from adafocus.predictions import load_predictions

    best = trained[0]["best_checkpoint"]
    out = {}
    for runtime in ("eager", "onnxruntime"):
        overrides = [f"runtime={runtime}", f"predictions_out={tmp_path / runtime}.pt"]
        cfg = config(f"ckpt_path={best}", f"output_dir={tmp_path / runtime}", *overrides, name="evaluate")
        out[runtime] = evaluate(cfg, overrides=overrides)
    assert out["onnxruntime"]["runtime"] == "onnxruntime"
    assert (
        out["onnxruntime"]["top1"] == out["eager"]["top1"]
        and out["onnxruntime"]["gflops"] == out["eager"]["gflops"]
    )
    a, b = (load_predictions(tmp_path / f"{r}.pt")["logits"] for r in ("eager", "onnxruntime"))
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_train_and_evaluate_from_a_transcoded_copy_with_either_decoder_and_sampling(tmp_path):
    """The Fast video data path end to end: transcode a dataset's videos (keyframes every 2 frames), then
    train with torchcodec + keyframe sampling and evaluate with decord + exact sampling (and the reverse)."""
    import shutil

    from videos import make_video_dataset

    videos = [(f"c{k % 2}/v{k}", 10, [k % 2]) for k in range(8)]
    raw = make_video_dataset(tmp_path / "raw", videos, num_classes=2, val_videos=videos[:4])
    fast = tmp_path / "fast"
    run("-m", "adafocus.data.prepare", "transcode", str(raw / "videos"), str(fast / "videos"),
        "--keyint", "2", "--short-side", "48", "--workers", "1")  # fmt: skip
    for name in ("train_split.txt", "val_split.txt", "classInd.txt"):
        shutil.copy(raw / name, fast / name)
    assert (fast / "videos" / "manifest.jsonl").is_file()
    own = [
        "dataset=custom", "dataset.num_classes=2", f"data_dir={fast}", "dataset.input_size=48",
        "dataset.decode_short_side=null", "backbone=cpu", "backbone.glance_size=6", "patch=16",
        "num_frames=2", "batch_size=4", "workers=0", "backbone.stn_hidden_dim=32",
        "backbone.classifier_dim=64", "epochs=1",
    ]  # fmt: skip
    for train_with, evaluate_with in [
        (["dataset.decoder=torchcodec", "dataset.sampling=keyframe"], ["dataset.decoder=decord"]),
        (["dataset.decoder=decord", "dataset.sampling=keyframe"], ["dataset.decoder=torchcodec"]),
    ]:
        out = tmp_path / train_with[0].split("=")[1]
        best = train(config(*own, *train_with, f"output_dir={out}"))["best_checkpoint"]
        evaluate_with = [*evaluate_with, "dataset.sampling=exact"]
        cfg = config(f"ckpt_path={best}", *evaluate_with, f"output_dir={out / 'eval'}", name="evaluate")
        assert evaluate(cfg, overrides=evaluate_with)["num_videos"] == 4
