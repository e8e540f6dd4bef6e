"""Per-class report (issue 11) from a real prediction file, checked against counts and APs computed here."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from adafocus.predictions import PredictionFileError, make_predictions, save_predictions
from adafocus.report import class_report, log_class_report, run_report, shown_classes

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["archery", "bowling", "cycling", "diving", "fencing", "golf"]


def prediction_file(tmp_path: Path, multilabel: bool) -> tuple[Path, dict]:
    """60 videos, T = 3, C = 6; logits lean to the true class so that there are hits and confusions;
    class 5 ("golf") is never a first label (and, multi-label, never a label at all)."""
    g = torch.Generator().manual_seed(1 if multilabel else 0)
    n, c = 60, 6
    first = torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(n, 3, c, generator=g)
    logits[torch.arange(n), :, first] += 1.2
    labels = first[:, None]
    if multilabel:
        second = (first + torch.randint(1, 5, (n,), generator=g)) % 5
        labels = torch.stack([first, torch.where(torch.rand(n, generator=g) < 0.4, second, -1)], dim=1)
    (tmp_path / "classInd.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(NAMES)))
    config = {"data": {"data_dir": str(tmp_path), "class_index": "classInd.txt"}}
    preds = make_predictions(logits, labels, [f"v{i}" for i in range(n)], 1.5,
                             "map" if multilabel else "top1", "toy", config)  # fmt: skip
    return save_predictions(tmp_path / "preds.pt", preds), preds


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def expected_confusion(preds: dict) -> np.ndarray:
    pred = preds["logits"][:, -1].argmax(-1).numpy()
    cm = np.zeros((6, 6), dtype=int)
    np.add.at(cm, (preds["labels"][:, 0].numpy(), pred), 1)
    return cm


def test_single_label_report_cli(tmp_path):
    path, preds = prediction_file(tmp_path, multilabel=False)
    out = tmp_path / "out"
    args = [f"predictions={path}", "top_k=4", "pairs=3", f"hydra.run.dir={out}"]
    result = subprocess.run(
        [sys.executable, "-m", "adafocus.report", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cm = expected_confusion(preds)
    rows = read_csv(out / "per_class.csv")
    assert [r["class"] for r in rows] == NAMES and "ap" not in rows[0]
    for c, row in enumerate(rows):
        assert int(row["videos"]) == cm[c].sum()
        if cm[c].sum():
            assert float(row["accuracy"]) == pytest.approx(100 * cm[c, c] / cm[c].sum(), abs=1e-3)
        else:
            assert row["accuracy"] == ""  # no video of this class: no accuracy
        errors = cm[c].copy()
        errors[c] = 0
        assert int(row["confused_videos"]) == errors.max()
        if errors.max():
            assert row["most_confused_with"] == NAMES[int(errors.argmax())]
    off = [(cm[i, j], i, j) for i in range(6) for j in range(6) if i != j and cm[i, j]]
    top3 = sorted(off, key=lambda e: (-e[0], e[1], e[2]))[:3]
    pairs = read_csv(out / "confused_pairs.csv")
    assert [(r["true"], r["predicted"], int(r["videos"])) for r in pairs] == [
        (NAMES[i], NAMES[j], int(n)) for n, i, j in top3
    ]
    assert float(pairs[0]["share_of_true"]) == pytest.approx(
        100 * top3[0][0] / cm[top3[0][1]].sum(), abs=1e-3
    )
    with Image.open(out / "confusion.png") as image:
        assert min(image.size) >= 400
    assert f"{NAMES[top3[0][1]]}" in result.stdout and "names from" in result.stdout
    # the PNG's 4 of 6 classes: those with the most errors as true + as predicted class
    errors = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
    report = class_report(preds, NAMES)
    assert shown_classes(report, 4) == sorted(np.argsort(-errors, kind="stable")[:4].tolist())
    assert shown_classes(report, 6) == list(range(6))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Non-interpolated AP: mean of the precision at each positive in descending score order."""
    hits = positive[np.argsort(-scores, kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def test_multilabel_report_has_per_class_ap(tmp_path):
    path, preds = prediction_file(tmp_path, multilabel=True)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("report", [f"predictions={path}", f"output_dir={tmp_path / 'out'}"])
    run_report(cfg)
    rows = read_csv(tmp_path / "out" / "per_class.csv")
    scores = preds["logits"][:, -1].softmax(-1).numpy()
    labels = preds["labels"].numpy()
    for c, row in enumerate(rows):
        positive = (labels == c).any(axis=1)
        assert int(row["positives"]) == positive.sum()
        if positive.any():
            assert float(row["ap"]) == pytest.approx(
                100 * average_precision(scores[:, c], positive), abs=1e-3
            )
        else:
            assert row["ap"] == ""  # golf: no positive video, no AP
    assert rows[5]["ap"] == "" and int(rows[0]["positives"]) > int(rows[0]["videos"]) - 1
    with pytest.raises(PredictionFileError, match="missing.pt: prediction file not found"):
        run_report(compose_missing(tmp_path))


def compose_missing(tmp_path):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("report", [f"predictions={tmp_path / 'missing.pt'}", f"output_dir={tmp_path}"])


@pytest.mark.slow
def test_class_report_logs_a_wandb_table(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    _, preds = prediction_file(tmp_path, multilabel=True)
    report = class_report(preds, NAMES)
    run = wandb.init(project="adafocus-test", mode="offline", dir=str(tmp_path))
    log_class_report(run, report)
    files = list(Path(run.dir).glob("media/table/report/per_class_*.table.json"))
    run.finish()
    wandb.teardown()  # the process-wide wandb state, else later offline runs in this process try to log in
    table = json.loads(files[0].read_text())
    assert table["columns"] == report.columns()
    assert [r[1] for r in table["data"]] == NAMES and table["data"][5][5] is None  # golf: no AP
    assert table["data"][0][3] == pytest.approx(report.rows()[0][3])
