"""End to end (issue 4): train -> evaluate agree, checkpoints, resume, determinism, and through the real
``train.py`` / ``evaluate.py``: evaluation from the checkpoint alone, CPU DDP (gloo) on an odd number of
videos, W&B offline without credentials, Hydra multirun. Tiny synthetic data (real H.264 mp4s)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from adafocus.data.synthetic import ensure_synthetic
from adafocus.metrics import mean_average_precision
from adafocus.pipeline import evaluate, train
from adafocus.predictions import load_predictions

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset.generate.num_train=16", "dataset.generate.num_val=9", "dataset.generate.frames_per_video=6",
    "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=2", "patch=16",
    "batch_size=4", "epochs=2", "workers=0", "backbone.stn_hidden_dim=32", "backbone.classifier_dim=64",
]  # fmt: skip
# a multi-label view of the same videos (ActivityNet comma format, two labels on every other line)
MULTILABEL = [
    "dataset.multilabel=true", "dataset.metric=map",
    "dataset.train_list=multi_train.txt", "dataset.val_list=multi_val.txt",
]  # fmt: skip
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
NUM_VAL = 9  # odd: a distributed sampler that pads or drops would show


def compose_cfg(*overrides: str, name: str = "train"):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=[*TINY, *overrides])


def cli(script: str, *args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def csv_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def val_rows(run_dir: Path, metric: str = "top1") -> list[dict]:
    return [r for r in csv_rows(run_dir) if r.get(f"val/{metric}")]


def lr_rows(run_dir: Path) -> list[dict[str, float]]:
    """The LearningRateMonitor series, one row per epoch: {group: lr}."""
    rows = [
        {k.split("/")[-1]: float(v) for k, v in r.items() if k.startswith("lr-") and v}
        for r in csv_rows(run_dir)
    ]
    return [r for r in rows if r]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The synthetic dataset at the tiny size, plus multi-label lists over its videos."""
    root = tmp_path_factory.mktemp("data")
    ensure_synthetic(root / "synthetic", **compose_cfg().dataset.generate)
    for split in ("train", "val"):
        lines = (root / "synthetic" / f"{split}_split.txt").read_text().splitlines()
        assert len(lines) == {"train": 16, "val": NUM_VAL}[split]
        multi = [
            f"{line},{(int(line.split(',')[2]) + 1) % 4}" if i % 2 else line for i, line in enumerate(lines)
        ]
        (root / "synthetic" / f"multi_{split}.txt").write_text("\n".join(multi) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> tuple[dict, Path]:
    """Two epochs of tiny training in-process (the checkpoint the other tests share)."""
    out = tmp_path_factory.mktemp("run")
    return train(compose_cfg(f"data_root={data_root}", f"output_dir={out}")), out


# ------------------------------------------------------------------ train -> evaluate
def test_train_writes_best_and_last_checkpoints_loadable_with_weights_only(trained):
    results, out = trained
    assert results["epochs"] == 2 and results["gflops"] > 0
    best, last = Path(results["best_checkpoint"]), Path(results["last_checkpoint"])
    assert best.parent == last.parent == out / "checkpoints" and last.name == "last.ckpt"
    for path in (best, last):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain containers only
        config = ckpt["hyper_parameters"]["config"]
        assert (
            config["dataset"]["name"] == "synthetic"
            and config["patch"] == 16
            and config["output_dir"] == str(out)
        )
        assert ckpt["state_dict"] and all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())
    assert torch.load(last, weights_only=True)["epoch"] == 1
    # the CSV log: one val row per epoch, gflops once, four LR series per epoch on the cosine
    rows = val_rows(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert max(float(r["val/top1"]) for r in rows) == pytest.approx(results["best_top1"])
    assert [float(r["model/gflops"]) for r in csv_rows(out) if r.get("model/gflops")] == [
        pytest.approx(results["gflops"])
    ]
    lrs = lr_rows(out)
    cfg = compose_cfg()
    assert len(lrs) == 2 and set(lrs[0]) == {"policy", "glance", "focus", "classifier"}
    for epoch, row in enumerate(lrs):
        for group, lr in row.items():
            expected = 0.5 * cfg.lr * cfg.optim.lr_ratios[group] * (1 + math.cos(math.pi * epoch / 2))
            assert lr == pytest.approx(expected, rel=1e-9)


def test_evaluate_reproduces_the_best_val_metric(trained, data_root, tmp_path):
    results, out = trained
    best = results["best_checkpoint"]
    best_row = max(val_rows(out), key=lambda r: float(r["val/top1"]))
    assert Path(best).name == f"best-epoch{int(best_row['epoch']):02d}.ckpt"
    cfg = compose_cfg(f"ckpt_path={best}", f"output_dir={tmp_path}", name="evaluate")
    metrics = evaluate(cfg, overrides=[f"ckpt_path={best}"])
    assert metrics["top1"] == pytest.approx(float(best_row["val/top1"]), abs=1e-4)
    assert metrics["top5"] == pytest.approx(float(best_row["val/top5"]), abs=1e-4)
    assert metrics["num_videos"] == NUM_VAL and metrics["gflops"] == pytest.approx(results["gflops"])
    written = read_metrics(tmp_path)
    assert {"top1", "top5", "gflops", "num_videos"} <= set(written) and "map" not in written
    assert written["top1"] == pytest.approx(metrics["top1"]) and written["num_videos"] == NUM_VAL


def test_evaluate_predictions_and_pictures(trained, tmp_path):
    results, _ = trained
    best = results["best_checkpoint"]
    preds_file = tmp_path / "preds.pt"
    cfg = compose_cfg(
        f"ckpt_path={best}", f"output_dir={tmp_path}", f"predictions_out={preds_file}", "visualize=2",
        name="evaluate",
    )  # fmt: skip
    metrics = evaluate(cfg, overrides=[f"ckpt_path={best}", "visualize=2"])
    preds = load_predictions(preds_file, num_classes=4, metric="top1")
    assert preds["logits"].shape == (NUM_VAL, 2, 4) and len(set(preds["paths"])) == NUM_VAL
    top1 = (preds["logits"][:, -1].argmax(-1) == preds["labels"][:, 0]).float().mean().item() * 100
    assert top1 == pytest.approx(metrics["top1"], abs=1e-4)
    assert preds["gflops_per_video"] == pytest.approx(results["gflops"])
    pngs, gifs = sorted((tmp_path / "focus").glob("*.png")), sorted((tmp_path / "focus").glob("*.gif"))
    assert len(pngs) == len(gifs) == 2 and all(p.stat().st_size > 0 for p in pngs + gifs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(g.read_bytes()[:6] in (b"GIF89a", b"GIF87a") for g in gifs)


def test_evaluate_multilabel_writes_map(trained, data_root, tmp_path):
    results, _ = trained
    best = results["best_checkpoint"]
    preds_file = tmp_path / "preds.pt"
    overrides = [f"ckpt_path={best}", *MULTILABEL, f"predictions_out={preds_file}"]
    cfg = compose_cfg(f"data_root={data_root}", f"output_dir={tmp_path}", *overrides, name="evaluate")
    metrics = evaluate(cfg, overrides=overrides)
    written = read_metrics(tmp_path)
    assert {"top1", "top5", "map", "gflops", "num_videos"} <= set(written) and written[
        "num_videos"
    ] == NUM_VAL
    preds = load_predictions(preds_file, num_classes=4, metric="map")
    assert (preds["labels"] >= 0).sum(1).tolist().count(2) == NUM_VAL // 2  # two labels on every other video
    expected, _ = mean_average_precision(preds["logits"][:, -1].softmax(-1), preds["labels"])
    assert written["map"] == pytest.approx(expected, abs=1e-4) == metrics["map"]


# ------------------------------------------------------------------ resume, determinism
def test_resume_continues_epoch_and_lr_schedule(trained, data_root, tmp_path):
    # an interrupted 2-epoch run (stopped after epoch 0), resumed
    first = train(
        compose_cfg(f"data_root={data_root}", f"output_dir={tmp_path / 'a'}", "+trainer.max_epochs=1")
    )
    assert first["epochs"] == 1 and [int(r["epoch"]) for r in val_rows(tmp_path / "a")] == [0]
    resumed = train(compose_cfg(f"data_root={data_root}", f"output_dir={tmp_path / 'b'}",
                                f"ckpt_path={first['last_checkpoint']}"))  # fmt: skip
    assert resumed["epochs"] == 2
    assert [int(r["epoch"]) for r in val_rows(tmp_path / "b")] == [1]  # only epoch 1 ran
    steps = [int(r["step"]) for r in val_rows(tmp_path / "a") + val_rows(tmp_path / "b")]
    assert steps[1] > steps[0]  # the global step goes on
    cfg = compose_cfg()
    ratios = cfg.optim.lr_ratios
    (lr1,) = lr_rows(tmp_path / "b")
    assert lr1 == pytest.approx({g: 0.5 * cfg.lr * r for g, r in ratios.items()}, rel=1e-9)  # cos(pi/2)

    # a finished 1-epoch run extended to 2: epoch 1 continues the cosine of the new E (not lr 0)
    one = train(compose_cfg(f"data_root={data_root}", f"output_dir={tmp_path / 'c'}", "epochs=1"))
    train(
        compose_cfg(
            f"data_root={data_root}", f"output_dir={tmp_path / 'd'}", f"ckpt_path={one['last_checkpoint']}"
        )
    )
    (lr1,) = lr_rows(tmp_path / "d")
    assert lr1 == pytest.approx({g: 0.5 * cfg.lr * r for g, r in ratios.items()}, rel=1e-9)
    assert [int(r["epoch"]) for r in val_rows(tmp_path / "d")] == [1]


def test_same_seed_same_metrics_and_weights(trained, data_root, tmp_path):
    results, out = trained
    again = train(compose_cfg(f"data_root={data_root}", f"output_dir={tmp_path}"))
    assert again["best_top1"] == results["best_top1"] and again["val/top1"] == results["val/top1"]
    assert val_rows(tmp_path) == val_rows(out)  # every logged val number, epoch by epoch
    a = torch.load(results["last_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(again["last_checkpoint"], weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the real CLI
def test_cpu_ddp_train_and_evaluate_match_one_process(data_root, tmp_path):
    """DDP (gloo, 2 processes) on 9 val videos: the validation during DDP training and DDP evaluation both
    count every video exactly once — the same mAP / top-1 / per-video logits as one process."""
    train_dir, one, two = tmp_path / "train", tmp_path / "one", tmp_path / "two"
    cli(
        "train.py",
        *TINY,
        "epochs=1",
        *MULTILABEL,
        *DDP,
        f"data_root={data_root}",
        f"hydra.run.dir={train_dir}",
    )
    (row,) = val_rows(train_dir, "map")
    best = next((train_dir / "checkpoints").glob("best-*.ckpt"))
    # evaluate.py with nothing but the checkpoint (its stored config), one process
    cli("evaluate.py", f"ckpt_path={best}", f"predictions_out={one / 'p.pt'}", f"hydra.run.dir={one}")
    # the same under DDP
    cli("evaluate.py", f"ckpt_path={best}", *DDP, f"predictions_out={two / 'p.pt'}", f"hydra.run.dir={two}")
    a, b = read_metrics(one), read_metrics(two)
    assert a["num_videos"] == b["num_videos"] == NUM_VAL
    assert a["map"] == pytest.approx(float(row["val/map"]), abs=1e-4)  # DDP validation == one process
    assert a["top1"] == pytest.approx(float(row["val/top1"]), abs=1e-4)
    for key in ("map", "top1", "top5"):
        assert b[key] == pytest.approx(a[key], abs=1e-4), key
    pa, pb = load_predictions(one / "p.pt"), load_predictions(two / "p.pt")
    assert pa["paths"] == pb["paths"] and len(set(pa["paths"])) == NUM_VAL
    assert torch.allclose(pa["logits"], pb["logits"], atol=1e-5) and torch.equal(pa["labels"], pb["labels"])
    # policy=random too: each video's draws do not depend on the batching or the process it lands on
    cli("evaluate.py", f"ckpt_path={best}", "policy=random", *DDP, f"hydra.run.dir={tmp_path / 'random2'}")
    overrides = [f"ckpt_path={best}", "policy=random", "batch_size=2"]  # one process, another batching
    single = evaluate(
        compose_cfg(*overrides, f"output_dir={tmp_path / 'random1'}", name="evaluate"), overrides
    )
    ddp = read_metrics(tmp_path / "random2")
    assert single["policy"] == ddp["policy"] == "random" and ddp["num_videos"] == NUM_VAL
    assert ddp["map"] == pytest.approx(single["map"], abs=1e-4) and ddp["top1"] == pytest.approx(
        single["top1"]
    )


def no_credentials_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), NETRC=str(home / "netrc"))  # an empty home: no ~/.netrc, no wandb settings
    return env


def test_wandb_offline_without_credentials(data_root, tmp_path):
    out = tmp_path / "run"
    log = cli("train.py", *TINY, "epochs=1", "logger=wandb", f"data_root={data_root}", f"hydra.run.dir={out}",
              env=no_credentials_env(tmp_path / "home"))  # fmt: skip
    # one line says how to upload the run later
    hint = [line for line in log.splitlines() if line.startswith("W&B:")]
    assert len(hint) == 1 and "no credentials" in hint[0] and "offline" in hint[0], log[-3000:]
    assert hint[0].endswith(f"wandb sync {out / 'wandb'}/offline-run-*")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert val_rows(out) and (out / "checkpoints" / "last.ckpt").is_file()  # the CSV log is written too


def wandb_groups(run_file: Path, suffix: str) -> set[bytes]:
    """The ``run_group`` strings ending in ``suffix`` in a run-*.wandb file (length-delimited protobuf)."""
    from wandb.proto import wandb_internal_pb2

    number = wandb_internal_pb2.RunRecord.DESCRIPTOR.fields_by_name["run_group"].number
    data = run_file.read_bytes()
    found = set()
    for m in re.finditer(re.escape(bytes([number << 3 | 2])) + rb"([\x01-\x7f])", data):
        value = data[m.end() : m.end() + m.group(1)[0]]
        if value.endswith(suffix.encode()):
            found.add(value)
    return found


def test_multirun_jobs_have_their_own_directories_and_share_a_wandb_group(data_root, tmp_path):
    sweep = tmp_path / "sweep-e2e"
    cli("train.py", "-m", *TINY, "epochs=1", "logger=wandb", "patch=16,24", f"data_root={data_root}",
        f"hydra.sweep.dir={sweep}", env=no_credentials_env(tmp_path / "home"))  # fmt: skip
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    run_ids, groups = set(), set()
    for job, patch in zip(jobs, (16, 24), strict=True):
        assert OmegaConf.load(job / ".hydra" / "config.yaml").patch == patch
        best = list((job / "checkpoints").glob("best-*.ckpt"))
        assert len(best) == 1 and (job / "checkpoints" / "last.ckpt").is_file()
        config = torch.load(best[0], weights_only=True)["hyper_parameters"]["config"]
        assert config["model"]["patch_size"] == patch and config["output_dir"] == str(job)
        assert len(val_rows(job)) == 1
        (run,) = (job / "wandb").glob("offline-run-*")  # each job its own W&B run ...
        run_ids.add(run.name)
        (group,) = wandb_groups(next(run.glob("run-*.wandb")), sweep.name)  # ... in the sweep's group
        groups.add(group)
    assert len(run_ids) == 2 and len(groups) == 1
