"""early_exit.py and evaluate.py's prediction files end to end on a tiny checkpoint trained here."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from adafocus.predictions import load_predictions
from adafocus.tasks import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset.generate.num_train=12", "dataset.generate.num_val=7", "dataset.generate.frames_per_video=6",
    "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=2",
    "patch=16", "batch_size=4", "epochs=1", "workers=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ee")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"data_root={tmp}", f"output_dir={tmp / 'run'}"])
    return Path(train(cfg)["best_checkpoint"])


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_early_exit_cli_on_a_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "ee"
    result = _run("early_exit.py", f"ckpt_path={checkpoint}", "budgets=[0.5,2.0]", f"hydra.run.dir={out}")
    rows = list(csv.reader((out / "early_exit.csv").open()))
    assert rows[0] == ["p", "gflops", "metric"]
    assert [float(r[0]) for r in rows[1:]] == [0.5, 2.0]
    gflops = [float(r[1]) for r in rows[1:]]
    assert 0 < gflops[0] <= gflops[1]
    assert all(0 <= float(r[2]) <= 100 for r in rows[1:])
    with Image.open(next(out.glob("*.png"))) as image:
        assert image.size[0] > 100
    assert "no exit" in result.stdout


def test_prediction_files_from_evaluate_feed_early_exit(checkpoint, tmp_path):
    calib, evals = tmp_path / "calib.pt", tmp_path / "eval.pt"
    with initialize_config_dir(
        str(ROOT / "conf"), version_base="1.3"
    ):  # evaluate in-process: its CLI is tested
        cfg = compose("evaluate", overrides=[f"ckpt_path={checkpoint}", f"predictions_out={evals}",
                                             f"output_dir={tmp_path / 'e'}"])  # fmt: skip
    evaluate(cfg, overrides=[])
    preds = load_predictions(evals)
    assert preds["logits"].shape == (7, 2, 4) and preds["labels"].shape[0] == 7 and len(preds["paths"]) == 7
    assert preds["metric"] == "top1" and preds["num_classes"] == 4 and preds["gflops_per_video"] > 0
    assert preds["paths"] == sorted(preds["paths"])  # list order, whatever the loader order
    calib.write_bytes(evals.read_bytes())
    out = tmp_path / "ee"
    _run("early_exit.py", f"calib_predictions={calib}", f"eval_predictions={evals}", f"hydra.run.dir={out}")
    assert len((out / "early_exit.csv").read_text().splitlines()) == 36  # header + 35 default budgets
