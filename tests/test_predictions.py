"""Prediction files: layout round trip, atomic write, bad files rejected naming the file and the field."""

from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf

from adafocus.predictions import (
    PredictionFileError,
    check_compatible,
    load_predictions,
    make_predictions,
    save_predictions,
)


def make_preds(n=6, t=4, c=5, metric="top1", **changes):
    g = torch.Generator().manual_seed(0)
    preds = {
        "logits": torch.randn(n, t, c, generator=g),
        "labels": torch.cat([torch.randint(0, c, (n, 1), generator=g), torch.full((n, 1), -1)], dim=1),
        "paths": [f"v{i}.mp4" for i in range(n)],
        "gflops_per_video": 2.5,
        "num_classes": c,
        "metric": metric,
        "dataset": "synthetic",
        "config": OmegaConf.create({"dataset": {"name": "synthetic", "num_classes": c}, "seed": 0}),
    }
    preds.update(changes)
    return preds


def test_round_trip_weights_only(tmp_path):
    path = save_predictions(tmp_path / "sub" / "p.pt", make_preds(logits=torch.randn(6, 4, 5).double()))
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name != "p.pt"]  # no temp left
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["logits"].dtype == torch.float32 and raw["labels"].dtype == torch.long
    assert isinstance(raw["config"], dict) and raw["config"]["dataset"]["num_classes"] == 5
    loaded = load_predictions(path, num_classes=5, metric="top1")
    assert loaded["logits"].shape == (6, 4, 5) and loaded["paths"][2] == "v2.mp4"
    assert loaded["gflops_per_video"] == 2.5 and loaded["dataset"] == "synthetic"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"logits": torch.randn(6, 5)}, "'logits' has shape [6, 5], expected [N, T, C]"),
        (
            {"labels": torch.zeros(5, 1, dtype=torch.long)},
            "'labels' has shape [5, 1], expected [N, L] with N = 6",
        ),
        ({"labels": torch.full((6, 1), 7)}, "'labels' values must be in [0, 4]"),
        ({"labels": torch.full((6, 1), -1)}, "have no label"),
        ({"num_classes": 4}, "'num_classes' is 4 but 'logits' has C = 5"),
        ({"metric": "top5"}, "'metric' is 'top5', expected one of"),
        ({"paths": ["a"]}, "'paths' must be a list of 6 strings"),
        ({"gflops_per_video": 0.0}, "'gflops_per_video' must be a positive number"),
        ({"logits": torch.full((6, 4, 5), float("nan"))}, "non-finite"),
    ],
)
def test_bad_predictions_rejected_on_save(tmp_path, changes, message):
    with pytest.raises(PredictionFileError) as err:
        save_predictions(tmp_path / "bad.pt", make_preds(**changes))
    assert message in str(err.value) and "bad.pt" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_bad_files_rejected_on_load(tmp_path):
    good = save_predictions(tmp_path / "good.pt", make_preds())
    with pytest.raises(
        PredictionFileError, match=r"good\.pt: has 5 classes, but the dataset config expects 200"
    ):
        load_predictions(good, num_classes=200)
    with pytest.raises(
        PredictionFileError, match=r"good\.pt: 'metric' is 'top1', but the dataset config uses 'map'"
    ):
        load_predictions(good, metric="map")
    # files written by hand with a wrong layout
    bad = tmp_path / "wrong_shape.pt"
    preds = make_preds()
    preds["config"] = {}
    torch.save({**preds, "logits": torch.randn(6, 4)}, bad)
    with pytest.raises(PredictionFileError, match=r"wrong_shape\.pt: 'logits' has shape \[6, 4\]"):
        load_predictions(bad)
    torch.save({k: v for k, v in preds.items() if k != "labels"}, bad)
    with pytest.raises(PredictionFileError, match=r"wrong_shape\.pt: missing key\(s\) \['labels'\]"):
        load_predictions(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(PredictionFileError, match=r"garbage\.pt: cannot be read"):
        load_predictions(garbage)
    with pytest.raises(PredictionFileError, match="not found"):
        load_predictions(tmp_path / "missing.pt")


def test_calibration_and_evaluation_must_agree():
    calib = make_preds(t=4, c=5)
    with pytest.raises(
        PredictionFileError, match=r"calibration file c\.pt has T = 4 .* evaluation file e\.pt"
    ):
        check_compatible(calib, make_preds(t=8, c=5), "c.pt", "e.pt")
    with pytest.raises(PredictionFileError, match=r"C = 5 classes but evaluation file e\.pt has C = 7"):
        check_compatible(calib, make_preds(t=4, c=7), "c.pt", "e.pt")
    with pytest.warns(UserWarning, match="gflops_per_video"):
        check_compatible(calib, make_preds(gflops_per_video=3.0), "c.pt", "e.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible(calib, make_preds(n=9), "c.pt", "e.pt")


def test_make_predictions(tmp_path):
    cfg = OmegaConf.create({"a": 1, "b": "${a}"})
    preds = make_predictions(
        torch.randn(3, 2, 4), torch.tensor([[0], [1], [3]]), ("x", "y", "z"), 1.5, "map", "actnet", cfg
    )
    assert (
        preds["num_classes"] == 4
        and preds["config"] == {"a": 1, "b": 1}
        and preds["paths"] == ["x", "y", "z"]
    )
    loaded = load_predictions(save_predictions(tmp_path / "p.pt", preds), num_classes=4, metric="map")
    assert torch.equal(loaded["logits"], preds["logits"])
