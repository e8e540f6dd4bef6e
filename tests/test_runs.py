"""Runs that survive (issue 12): resume never changes the model or loses the run's history, a killed run
resumes bit-identical from its last checkpoint (inside an epoch, or before the epoch's validation),
checkpoints never pass through the system temporary directory, two runs do not share a directory, left-over
temporaries go, missing or broken videos are named or skipped, results that cannot be written are said
before the work."""

import csv
import math
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from videos import make_video_dataset

from adafocus.resume import ProgressCheckpoint
from adafocus.tasks import train
from adafocus.tasks.common import check_config, instantiate_callbacks

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset.generate.num_train=12", "dataset.generate.num_val=9", "dataset.generate.frames_per_video=6",
    "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=2",
    "patch=16", "batch_size=4", "workers=0", "backbone.stn_hidden_dim=32", "backbone.classifier_dim=64",
]  # fmt: skip


def cli(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert (result.returncode == 0) == ok, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def config(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def rows(run_dir: Path, key: str) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r.get(key)]


TWO_BY_TWO = ["epochs=2", "trainer.limit_train_batches=2"]  # of the 3 batches of an epoch


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed or removed meanwhile
        return 0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory) -> dict:
    """The final weights of a run of 2 epochs of 2 steps that nobody killed."""
    run = tmp_path_factory.mktemp("uninterrupted")
    cli("train.py", *TINY, f"data_root={data_root}", *TWO_BY_TWO, f"hydra.run.dir={run}")
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_resume_in_place_keeps_history_and_follows_new_epochs(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(*TINY, f"data_root={data_root}", "epochs=2", "trainer.max_epochs=1", f"output_dir={run}"))
    first = rows(run, "val/top1")
    assert [int(r["epoch"]) for r in first] == [0]
    with pytest.raises(ValueError, match="model.patch_size: checkpoint 16, now 24"):  # the model stays
        train(
            config(
                *TINY, f"data_root={data_root}", "patch=24", "epochs=3", "ckpt_path=last", f"output_dir={run}"
            )
        )
    capsys.readouterr()
    train(config(*TINY, f"data_root={data_root}", "epochs=3", "ckpt_path=last", f"output_dir={run}"))
    resumed = capsys.readouterr().out
    assert "resuming after epoch 1 of 2: the learning-rate schedule now runs over epochs=3" in resumed
    val = rows(run, "val/top1")
    assert [int(r["epoch"]) for r in val] == [0, 1, 2] and val[0] == first[0]  # nothing earlier lost
    best = max(float(r["val/top1"]) for r in val)
    assert re.search(rf"best val/top1 +{best:.2f}\n", resumed)  # best tracking over the whole run
    lrs = [float(r["lr-AdamW/focus"]) for r in rows(run, "lr-AdamW/focus")]  # one per epoch, in order
    assert len(lrs) == 3 and lrs[0] == pytest.approx(1e-3)
    assert lrs[1] == pytest.approx(0.5 * 1e-3 * (1 + math.cos(math.pi * 1 / 3)))  # epoch 1 of 3, not of 2
    assert lrs[2] == pytest.approx(0.5 * 1e-3 * (1 + math.cos(math.pi * 2 / 3)))


@pytest.mark.slow
def test_a_second_run_in_the_same_directory_stops_and_stale_temporaries_go(data_root, tmp_path):
    run = tmp_path / "run"
    stale = run / "checkpoints" / ".last.ckpt.abc123.tmp"  # what a kill -9 during a save leaves
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    # epochs=1000: the first run outlives the second on any machine (it is killed below, never finishes)
    first = subprocess.Popen(
        [sys.executable, "train.py", *TINY, f"data_root={data_root}", "epochs=1000", f"hydra.run.dir={run}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        lock = run / ".adafocus.lock"
        for _ in range(600):  # the first run holds the lock once it starts
            if lock.is_file() and f"pid {first.pid}" in lock.read_text():
                break
            time.sleep(0.1)
        assert not stale.exists()
        second = cli("train.py", *TINY, f"data_root={data_root}", f"hydra.run.dir={run}", ok=False)
        assert f"is in use by another run (pid {first.pid} on" in second.stderr
    finally:
        first.kill()  # kill -9: the OS drops the lock with the process
        first.wait()
    import fcntl

    with open(run / ".adafocus.lock", "a+") as lock:  # free again: the OS dropped it with the killed run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_missing_videos_are_named_before_training_and_a_broken_val_video_is_skipped(tmp_path, capsys):
    videos = [(f"c{k % 2}/v{k}", 6, [k % 2]) for k in range(8)]
    data = make_video_dataset(tmp_path / "data", videos, num_classes=2, val_videos=videos[:3])
    own = ["dataset=custom", "dataset.num_classes=2", f"data_dir={data}", "dataset.input_size=64",
           "dataset.decode_short_side=null", "backbone=cpu", "backbone.glance_size=8", "patch=16",
           "num_frames=2", "batch_size=4", "workers=0", "backbone.stn_hidden_dim=32",
           "backbone.classifier_dim=64", "epochs=1", "dataset.max_bad_fraction=0.5"]  # fmt: skip
    (data / "videos" / "c1" / "v5.mp4").rename(tmp_path / "away.mp4")
    with pytest.raises(
        FileNotFoundError, match=r"1 listed videos are missing:\n  .*train_split.txt:6: .*c1/v5"
    ):
        train(config(*own, f"output_dir={tmp_path / 'a'}"))
    assert not (tmp_path / "a" / "checkpoints").exists()  # before any epoch
    (tmp_path / "away.mp4").rename(data / "videos" / "c1" / "v5.mp4")
    (data / "videos" / "c0" / "v2.mp4").write_bytes(os.urandom(2048))  # a val video (also in train)
    capsys.readouterr()
    train(config(*own, f"output_dir={tmp_path / 'b'}"))
    summary = capsys.readouterr().out
    assert "skipped in val" in summary and "bad videos" in summary
    assert [float(r["val/skipped"]) for r in rows(tmp_path / "b", "val/skipped")][-1] == 1.0
    assert list((tmp_path / "b" / "checkpoints").glob("best-*.ckpt"))


def test_evaluate_checks_its_output_directory_before_the_work(tmp_path):
    from adafocus.tasks import evaluate

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt_path=/nonexistent.ckpt", f"output_dir={blocker / 'sub'}"])
    with pytest.raises(PermissionError, match=f"output_dir={blocker / 'sub'} cannot be written"):
        evaluate(cfg, overrides=[])  # before the checkpoint is even looked for


def test_checkpoint_settings_are_checked_and_real_datasets_save_every_ten_minutes():
    assert config(*TINY).checkpoint.every_n_minutes is None  # the short synthetic epochs: per epoch only
    for dataset in ("actnet", "fcvid", "minik", "custom"):
        cfg = config(f"dataset={dataset}", "data_dir=/data/x", "dataset.num_classes=3", "output_dir=/tmp/x")
        (progress,) = [c for c in instantiate_callbacks(cfg) if isinstance(c, ProgressCheckpoint)]
        assert progress._train_time_interval == timedelta(minutes=10) and progress._every_n_train_steps == 0
    for overrides, error in (
        (["+checkpoint.every_n_train_step=1"], r"checkpoint.every_n_train_step: no such setting"),
        (["checkpoint.every_n_train_steps=0"], r"checkpoint.every_n_train_steps=0: a number of steps >= 1"),
        (
            ["checkpoint.every_n_train_steps=5", "checkpoint.every_n_minutes=10"],
            r"checkpoint.every_n_train_steps=5 and checkpoint.every_n_minutes=10: give one of them",
        ),
    ):
        with pytest.raises(ValueError, match=error):
            check_config(config(*TINY, *overrides))


@pytest.mark.slow
def test_a_checkpoint_is_written_next_to_its_file_never_in_the_system_temp_dir(data_root, tmp_path):
    """Lightning's writer stages a checkpoint's bytes in the system temporary directory (a small /tmp fails
    the save, a kill leaves them there); ours writes them into a temporary next to the file. kill -9 while a
    save is under way: no bytes were ever put in TMPDIR, the partial file is in checkpoints/ (a run there
    removes it)."""
    system_tmp, run = tmp_path / "tmp", tmp_path / "run"
    system_tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "train.py", *TINY, f"data_root={data_root}", "epochs=1", f"hydra.run.dir={run}"],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(system_tmp)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    staged, saving = set(), []
    try:
        while proc.poll() is None and not saving:
            # with bytes: Python's tempfile probes a temp dir with an empty file it removes at once
            staged.update(p.name for p in system_tmp.iterdir() if size(p))
            saving = [p for p in [*run.glob("checkpoints/.*.tmp"), *system_tmp.iterdir()] if size(p)]
            time.sleep(0.005)
    finally:
        proc.kill()  # kill -9, in the middle of the save
        proc.wait()
    assert saving, "the run ended before a checkpoint save was seen"
    assert not staged and not list(system_tmp.iterdir()), f"staged in TMPDIR: {staged}"
    assert [p.parent for p in saving] == [run / "checkpoints"] and size(saving[0])


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["mid-epoch", "in validation"])
def test_a_killed_run_resumes_bit_identical(kill, uninterrupted, data_root, tmp_path):
    """kill -9 once the first last.ckpt exists. With checkpoint.every_n_train_steps=1 it is written inside
    epoch 0 (the kill lands in its next step); by default it is epoch 0's, written when its training batches
    were done and before its validation (the kill lands in that validation). ckpt_path=last in the same
    directory continues at the next batch (data order and random states restored) or with the next epoch,
    and ends with the uninterrupted run's weights, tensor by tensor."""
    run = tmp_path / "run"
    args = [*TINY, f"data_root={data_root}", *TWO_BY_TWO, f"hydra.run.dir={run}"]
    args += ["checkpoint.every_n_train_steps=1"] if kill == "mid-epoch" else []
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = run / "checkpoints" / "last.ckpt"
    try:
        while proc.poll() is None and not last.exists():
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    killed = torch.load(last, map_location="cpu", weights_only=True)
    (best,) = [v for k, v in killed["callbacks"].items() if k.startswith("ModelCheckpoint")]
    if kill == "mid-epoch":
        assert (killed["epoch"], killed["global_step"]) == (0, 1)
    else:  # the epoch's training is kept; its validation had not finished (no score yet)
        assert (killed["epoch"], killed["global_step"], best["best_model_score"]) == (0, 2, None)
    cli("train.py", *args, "ckpt_path=last")
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["state_dict"].keys() == uninterrupted.keys()
    differ = [k for k, v in uninterrupted.items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(uninterrupted)} tensors differ: {differ[:5]}"
