"""Early-exit thresholds file (issue 11): written from a sweep, read back exactly; a stream that stops with it
exits where the offline early-exit evaluation exits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adafocus.early_exit import confidences, early_exit_sweep, exit_steps
from adafocus.models import AdaFocusV2
from adafocus.thresholds import ThresholdsFileError, read_thresholds, write_thresholds

BUDGETS = [0.5, 1.0, 2.0]


def sweep(calib, evals, labels, criterion="softmax"):
    return early_exit_sweep(calib, evals, labels, 2.5, "top1", BUDGETS, criterion)


def test_round_trip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    calib, evals = torch.randn(200, 6, 7, generator=g) * 3, torch.randn(50, 6, 7, generator=g) * 3
    result = sweep(calib, evals, torch.randint(0, 7, (50, 1), generator=g))
    assert torch.isinf(result.thresholds).any()  # the file must carry +inf / -inf
    path = write_thresholds(tmp_path / "thresholds.json", result, num_classes=7, dataset="toy")
    data = json.loads(path.read_text())  # standard JSON (no Infinity literals)
    assert data["budgets"][0]["thresholds"][-1] == "-inf"
    th = read_thresholds(path, num_steps=6, num_classes=7)
    assert (th.criterion, th.num_steps, th.num_classes, th.dataset) == ("softmax", 6, 7, "toy")
    assert th.gflops_per_video == 2.5 and th.no_exit_metric == result.full_metric
    for i, p in enumerate(BUDGETS):
        b = th.budget(p)
        assert torch.equal(b.eta, result.thresholds[i])  # bit-exact float32
        assert (b.gflops, b.metric) == (result.gflops[i], result.metric[i])


@pytest.mark.parametrize("criterion", ["softmax", "max_logit"])
def test_stream_with_thresholds_exits_like_the_offline_evaluation(tmp_path, criterion):
    torch.manual_seed(0)
    model = AdaFocusV2(
        num_classes=6, glance_arch="mbv3s", focus_arch="res18", patch_size=16, num_frames=5, input_size=48,
        glance_size=24, stn_hidden_dim=32, classifier_dim=64, pretrained=False,
    ).eval()  # fmt: skip
    model.classifier.head_weight.data *= 20  # confident, well-spread predictions (random weights are not)
    calib_videos, eval_videos = torch.randn(40, 5, 3, 48, 48), torch.randn(20, 5, 3, 48, 48)
    with torch.no_grad():
        calib, evals = model(calib_videos).logits, model(eval_videos).logits  # (N, T, C)
    labels = evals[:, -1].argmax(-1, keepdim=True)
    path = write_thresholds(tmp_path / "th.json", sweep(calib, evals, labels, criterion), 6, "toy")
    th = read_thresholds(path, model.num_frames, model.num_classes)
    conf = confidences(evals, criterion)  # (N, T)
    early = 0
    for p in BUDGETS:
        budget = th.budget(p)
        finite = torch.isfinite(budget.eta)
        # no eval confidence sits on a threshold: float-level differences cannot flip an exit
        assert ((conf - budget.eta).abs()[:, finite] > 1e-5).all()
        offline_steps = exit_steps(conf, budget.eta[None])[0]  # (N,)
        offline_pred = evals[torch.arange(20), offline_steps].argmax(-1)
        state, steps, pred = model.init_state(20), torch.full((20,), -1), torch.full((20,), -1)
        while (steps < 0).any():  # one batch of 20 streams; stop reading frames once every video exited
            out, state = model.step(eval_videos[:, state.step], state)
            now = budget.exits(out.logits, out.step) & (steps < 0)
            steps[now], pred[now] = out.step, out.logits.argmax(-1)[now]
        assert torch.equal(steps, offline_steps) and torch.equal(pred, offline_pred)
        assert state.step == int(offline_steps.max()) + 1  # frames actually read
        early += int((offline_steps < model.num_frames - 1).sum())
    assert early > 0  # some videos do stop early


def test_errors_name_the_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    result = sweep(
        torch.randn(60, 4, 3, generator=g), torch.randn(9, 4, 3, generator=g), torch.zeros(9, 1).long()
    )
    good = json.loads(write_thresholds(tmp_path / "t.json", result, 3, "toy").read_text())
    with pytest.raises(ThresholdsFileError, match="not found"):
        read_thresholds(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "format": \n}')
    with pytest.raises(ThresholdsFileError, match=r"bad.json:3: not valid JSON"):
        read_thresholds(bad)

    def broken(change) -> str:
        data = json.loads(json.dumps(good))
        change(data)
        bad.write_text(json.dumps(data))
        with pytest.raises(ThresholdsFileError) as e:
            read_thresholds(bad)
        assert str(bad) in str(e.value)
        return str(e.value)

    assert "format" in broken(lambda d: d.pop("format"))
    assert "criterion" in broken(lambda d: d.update(criterion="entropy"))
    assert "num_steps=4" in broken(lambda d: d["budgets"][1]["thresholds"].pop())
    assert "-inf" in broken(lambda d: d["budgets"][0]["thresholds"].__setitem__(-1, 0.5))
    assert "thresholds[0]" in broken(lambda d: d["budgets"][0]["thresholds"].__setitem__(0, "high"))
    th = read_thresholds(tmp_path / "t.json")
    with pytest.raises(ThresholdsFileError, match=r"no budget p=7.*p=0.5 .*p=2 "):
        th.budget(7)
    with pytest.raises(ThresholdsFileError, match="3 budgets; choose one"):
        th.budget()
    with pytest.raises(ThresholdsFileError, match=r"T=4 steps and C=3 classes but the model has T=16, C=3"):
        read_thresholds(tmp_path / "t.json", num_steps=16, num_classes=3)
    assert not math.isnan(th.budget(1.0).gflops)
