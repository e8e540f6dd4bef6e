"""AdaFocusV2+ early exit (SPEC §5): hand-computed thresholds and exits, the original algorithm as a per-video
reference, the budget sweep, metrics, and the early_exit.py CLI on prediction files."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from adafocus.early_exit import (
    DEFAULT_BUDGETS,
    confidences,
    early_exit_sweep,
    exit_counts_target,
    exit_steps,
    find_thresholds,
    metric_at_exits,
)
from adafocus.metrics import mean_average_precision
from adafocus.predictions import save_predictions
from adafocus.tasks.early_exit import budgets_from_cfg

REPO = Path(__file__).resolve().parents[1]
INF = math.inf


def one_hot_logits(conf: list[list[float]], cls: list[list[int]], num_classes: int) -> torch.Tensor:
    """Logits [N, T, C] whose max logit at (n, t) is conf[n][t], on class cls[n][t]; other classes -10."""
    n, t = len(conf), len(conf[0])
    logits = torch.full((n, t, num_classes), -10.0)
    for i in range(n):
        for k in range(t):
            logits[i, k, cls[i][k]] = conf[i][k]
    return logits


# ---- hand-made example: n = 4 calibration videos, T = 3, C = 3, criterion max_logit ----
# calibration max logits c_k (rows = videos, columns = steps 1..3)
CALIB_CONF = [
    [5.0, 1.0, 0.5],  # v0
    [3.0, 6.0, 0.5],  # v1
    [4.0, 2.0, 0.5],  # v2
    [1.0, 4.0, 0.5],  # v3
]
# evaluation videos: confidences, predicted class per step, true label
EVAL_CONF = [
    [5.5, 0.0, 1.0],  # e0
    [5.0, 0.0, 1.0],  # e1: ties with eta_1 = 5 at p = 1 (>= exits)
    [4.9, 6.0, 1.0],  # e2
    [1.0, 5.9, 1.0],  # e3
]
EVAL_CLS = [
    [0, 1, 1],  # e0: label 0 -> right at step 1, wrong at step 3
    [1, 1, 2],  # e1: label 2 -> wrong at step 1, right at step 3
    [0, 2, 2],  # e2: label 2 -> wrong at step 1, right at steps 2 and 3
    [0, 0, 1],  # e3: label 1 -> right at step 3 only
]
EVAL_LABELS = torch.tensor([[0], [2], [2], [1]])
GFLOPS = 3.0  # 1 GFLOP per step


def test_hand_thresholds_and_exits():
    calib = one_hot_logits(CALIB_CONF, [[0, 0, 0]] * 4, 3)
    evals = one_hot_logits(EVAL_CONF, EVAL_CLS, 3)
    budgets = [1.0, 0.5, 4.0]
    # p = 1:   q = (1/3, 1/3, 1/3)      -> floor(4 q_k) = 1, 1
    # p = 0.5: q = (4/7, 2/7, 1/7)      -> floor(16/7) = 2, floor(8/7) = 1
    # p = 4:   q = (1/21, 4/21, 16/21)  -> floor(4/21) = 0, floor(16/21) = 0
    assert exit_counts_target(budgets, 4, 3)[:, :2].tolist() == [[1, 1], [2, 1], [0, 0]]

    eta = find_thresholds(confidences(calib, "max_logit"), budgets)
    # p = 1: step 1 sorted v0(5) v2(4) v1(3) v3(1): v0 exits, eta_1 = 5;
    #        step 2 among v1, v2, v3: v1(6) v3(4) v2(2): v1 exits, eta_2 = 6
    # p = 0.5: step 1: v0, v2 exit, eta_1 = 4; step 2 among v1, v3: v1 exits, eta_2 = 6
    # p = 4: nobody exits early: eta_1 = eta_2 = +inf; always eta_3 = -inf
    assert eta.tolist() == [[5.0, 6.0, -INF], [4.0, 6.0, -INF], [INF, INF, -INF]]

    steps = exit_steps(confidences(evals, "max_logit"), eta)
    # p = 1:   e0 5.5>=5 -> 1; e1 5>=5 -> 1; e2 4.9<5, 6>=6 -> 2; e3 1<5, 5.9<6 -> 3
    # p = 0.5: e0, e1, e2 >= 4 -> 1; e3 -> 3
    # p = 4:   all at 3
    assert (steps + 1).tolist() == [[1, 1, 2, 3], [1, 1, 1, 3], [3, 3, 3, 3]]

    res = early_exit_sweep(calib, evals, EVAL_LABELS, GFLOPS, "top1", budgets, "max_logit")
    # GFLOPs = mean exit step x 1: (1+1+2+3)/4 = 1.75; (1+1+1+3)/4 = 1.5; 3
    assert res.gflops == pytest.approx([1.75, 1.5, 3.0])
    # p = 1:   e0 right (step 1), e1 wrong (step 1), e2 right (step 2), e3 right (step 3) -> 75 %
    # p = 0.5: e0 right, e1 wrong, e2 wrong (step 1 says 0), e3 right -> 50 %
    # p = 4:   the last step: e0 wrong, e1 right, e2 right, e3 right -> 75 %
    assert res.metric == pytest.approx([75.0, 50.0, 75.0])
    assert res.full_gflops == 3.0 and res.full_metric == pytest.approx(75.0)
    assert res.exit_counts.tolist() == [[2, 1, 1], [3, 0, 1], [0, 0, 4]]


def test_softmax_confidence_and_criterion_change_exits():
    # softmax of (0, ln 3) = (1/4, 3/4): confidence 0.75; max logit = ln 3
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert confidences(logits, "softmax").item() == pytest.approx(0.75)
    assert confidences(logits, "max_logit").item() == pytest.approx(math.log(3.0))
    with pytest.raises(ValueError, match="criterion"):
        confidences(logits, "entropy")
    # max logit prefers the video with large logits, softmax the one with the larger margin
    calib = torch.tensor([[[10.0, 9.9], [0.0, 0.0]], [[2.0, -2.0], [0.0, 0.0]]])  # (2, T=2, C=2)
    # p = 1: q = (1/2, 1/2): one video exits at step 1
    eta_ml = find_thresholds(confidences(calib, "max_logit"), [1.0])
    eta_sm = find_thresholds(confidences(calib, "softmax"), [1.0])
    assert eta_ml[0, 0].item() == 10.0  # video 0 (max logit 10 > 2)
    assert eta_sm[0, 0].item() == pytest.approx(torch.softmax(torch.tensor([2.0, -2.0]), 0)[0].item())


def test_ties_break_by_video_index():
    # three calibration videos with the same step-1 confidence; p = 1, T = 2, n = 3: floor(3/2) = 1 exits
    calib = torch.zeros(3, 2, 2)
    calib[:, 0, 0] = 2.0
    eta = find_thresholds(confidences(calib, "max_logit"), [1.0])
    assert eta.tolist() == [[2.0, -INF]]
    # ties at evaluation: c >= eta exits
    steps = exit_steps(torch.tensor([[2.0, 0.0], [1.99, 0.0]]), eta)
    assert steps.tolist() == [[0, 1]]


# ---- the ORIGINAL algorithm, per video, as the original code runs it (SPEC §5, max-logit confidence) ----
def original_early_exit(calib_logits, eval_logits, eval_targets, budgets, gflops_total):
    """Per-video loops: thresholds on the calibration set, then each evaluation video walks the steps.

    Returns, per budget, (expected GFLOPs, top-1 in %, outputs [N, C])."""
    n, t, _ = calib_logits.shape
    m = eval_logits.shape[0]
    calib_vals = [calib_logits[:, k].max(dim=-1).values for k in range(t)]
    sorted_idx = [torch.sort(v, descending=True, stable=True).indices for v in calib_vals]
    eval_vals = [eval_logits[:, k].max(dim=-1).values for k in range(t)]
    flops_exits = [(k + 1) * gflops_total / t for k in range(t)]
    results = []
    for p in budgets:
        probs = torch.exp(
            torch.log(torch.FloatTensor(1).fill_(p)) * torch.arange(1, t + 1, dtype=torch.float32)
        )
        probs /= probs.sum()
        probs /= probs.sum()
        filtered = [False] * n
        thresholds = [1e8] * t
        for k in range(t - 1):
            out_n = math.floor(n * probs[k])
            count = 0
            for i in sorted_idx[k].tolist():
                if filtered[i]:
                    continue
                if count == out_n:
                    break
                count += 1
                filtered[i] = True
                if count == out_n:
                    thresholds[k] = calib_vals[k][i].item()
        thresholds[t - 1] = -1e8
        outputs = torch.zeros(m, eval_logits.shape[2])
        exp = [0] * t
        correct = 0
        for i in range(m):
            for k in range(t):
                if eval_vals[k][i].item() >= thresholds[k]:
                    outputs[i] = eval_logits[i, k]
                    exp[k] += 1
                    correct += int(eval_logits[i, k].argmax().item() == int(eval_targets[i]))
                    break
        expected = sum(exp[k] / m * flops_exits[k] for k in range(t))
        results.append((expected, 100.0 * correct / m, outputs))
    return results


@pytest.mark.parametrize("seed", [0, 1])
def test_max_logit_equals_original_algorithm(seed):
    g = torch.Generator().manual_seed(seed)
    n, m, t, c = 997, 401, 8, 12
    calib = torch.randn(n, t, c, generator=g) * 2 + torch.linspace(0, 2, t).view(1, t, 1) * torch.randn(
        n, 1, c, generator=g
    )
    evals = torch.randn(m, t, c, generator=g) * 2 + torch.linspace(0, 2, t).view(1, t, 1) * torch.randn(
        m, 1, c, generator=g
    )
    labels = torch.randint(0, c, (m, 1), generator=g)
    budgets = DEFAULT_BUDGETS
    ours = early_exit_sweep(calib, evals, labels, 16.0, "top1", budgets, "max_logit")
    ref = original_early_exit(calib, evals, labels[:, 0], budgets, 16.0)
    assert ours.gflops == pytest.approx([r[0] for r in ref], rel=1e-6)
    assert ours.metric == pytest.approx([r[1] for r in ref], abs=1e-4)  # float32 accuracy; 1 video = 0.25
    # mAP is computed on the same per-video outputs: identical exits give identical numbers
    multi = torch.stack([labels[:, 0], torch.randint(-1, c, (m,), generator=g)], dim=1)
    ours_map = early_exit_sweep(calib, evals, multi, 16.0, "map", budgets[::7], "max_logit")
    ref_map = original_early_exit(calib, evals, labels[:, 0], budgets[::7], 16.0)
    for value, (_, _, outputs) in zip(ours_map.metric, ref_map, strict=True):
        assert value == pytest.approx(reference_metric(outputs, multi, "map"), abs=1e-4)


def test_sweep_monotone_in_gflops_on_random_logits():
    g = torch.Generator().manual_seed(3)
    calib = torch.randn(3000, 16, 20, generator=g) * 3
    evals = torch.randn(1000, 16, 20, generator=g) * 3
    labels = torch.randint(0, 20, (1000, 1), generator=g)
    for criterion in ("softmax", "max_logit"):
        res = early_exit_sweep(calib, evals, labels, 26.96, "top1", None, criterion)
        assert res.budgets == pytest.approx([0.5 + 0.1 * i for i in range(35)])
        assert all(b >= a for a, b in zip(res.gflops, res.gflops[1:], strict=False)), res.gflops
        assert res.gflops[0] < res.gflops[-1] < 26.96
        assert int(res.exit_counts.sum(dim=1).unique().item()) == 1000


def test_map_leaves_out_classes_without_positive():
    # C = 3, class 2 has no positive. Class 0 positives v0, v2: ranking by softmax score v0 > v1 > v2
    # -> AP = (1/1 + 2/3) / 2 = 5/6. Class 1 positives v1, v2: ranking v1 > v2 > v0 -> AP = 1.
    # mAP = (5/6 + 1) / 2 = 11/12
    logits = torch.tensor([[3.0, 0.0, 0.0], [1.0, 3.0, 0.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([[0, -1], [1, -1], [0, 1]])
    # as the only step, and as step 1 of two (step 0: the opposite scores) for the second of two exit sets
    one = metric_at_exits(logits[:, None], torch.zeros(1, 3, dtype=torch.long), labels, "map")
    assert one == pytest.approx([100 * 11 / 12])
    two_steps = torch.stack([-logits, logits], dim=1)  # (N, T = 2, C)
    exits = torch.tensor([[0, 0, 0], [1, 1, 1]])
    assert metric_at_exits(two_steps, exits, labels, "map")[1] == pytest.approx(100 * 11 / 12)
    # step 0's argmax: class 1 (ties go to the first), 2, 0 -> only video 2 right
    assert metric_at_exits(two_steps, exits, labels, "top1") == pytest.approx([100 / 3, 100 * 2 / 3])


def reference_metric(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """One budget's metric the straightforward way: torchmetrics' per-class AP (adafocus.metrics) / argmax."""
    if metric == "map":
        return mean_average_precision(torch.softmax(logits.float(), dim=-1), labels)[0]
    return 100.0 * float((logits.argmax(dim=-1) == labels[:, 0]).float().mean())


def regression_case(seed: int, ties: bool):
    """n 300 calibration / 120 evaluation videos, T 6, C 9; classes 7 and 8 never a label; with ``ties``,
    integer logits (many equal scores and confidences)."""
    g = torch.Generator().manual_seed(seed)
    n, m, t, c = 300, 120, 6, 9
    if ties:
        calib = torch.randint(-3, 4, (n, t, c), generator=g).float()
        evals = torch.randint(-3, 4, (m, t, c), generator=g).float()
    else:
        calib = torch.randn(n, t, c, generator=g) * 2
        evals = torch.randn(m, t, c, generator=g) * 2
    labels = torch.randint(0, c - 2, (m, 2), generator=g)
    labels[::3, 1] = -1
    return calib, evals, labels


# the sweep's (metric per budget, no-exit metric) on regression_case, by the per-budget torchmetrics
# implementation before the metric was batched (commit 2b3128f), budgets [0.5, 1.0, 1.7, 3.9]
BEFORE_BATCHING = {
    (0, False, "softmax", "map"): ([24.549713, 24.921013, 24.752953, 24.945633], 22.822039),
    (0, False, "softmax", "top1"): ([5.0, 6.666667, 8.333334, 9.166667], 10.833333),
    (0, False, "max_logit", "map"): ([26.816797, 25.79846, 24.115791, 25.299839], 22.822039),
    (0, False, "max_logit", "top1"): ([10.833333, 5.0, 10.833333, 10.0], 10.833333),
    (1, True, "softmax", "map"): ([23.355427, 25.82683, 25.795109, 25.456833], 25.972048),
    (1, True, "softmax", "top1"): ([8.333334, 14.166667, 11.666667, 9.166667], 10.0),
    (1, True, "max_logit", "map"): ([25.012857, 25.012857, 25.012857, 24.955057], 25.972048),
    (1, True, "max_logit", "top1"): ([10.833333, 10.833333, 10.833333, 10.833333], 10.0),
}


@pytest.mark.parametrize("case", sorted(BEFORE_BATCHING))
def test_batched_metric_gives_the_numbers_of_before(case):
    seed, ties, criterion, metric = case
    calib, evals, labels = regression_case(seed, ties)
    res = early_exit_sweep(calib, evals, labels, 12.0, metric, [0.5, 1.0, 1.7, 3.9], criterion)
    values, full = BEFORE_BATCHING[case]
    # equal up to the float32 rounding of the torchmetrics computation (the batched one sums in float64)
    assert res.metric == pytest.approx(values, abs=1e-5)
    assert res.full_metric == pytest.approx(full, abs=1e-5)
    # and per budget against the straightforward computation on the videos' exit logits
    steps = exit_steps(confidences(evals, criterion), res.thresholds)
    for value, exits in zip(res.metric, steps, strict=True):
        assert value == pytest.approx(
            reference_metric(evals[torch.arange(len(evals)), exits], labels, metric), abs=1e-4
        )


def test_budgets_from_cfg():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"budgets": None, "budget_start": 0.5, "budget_stop": 3.9, "budget_step": 0.1})
    assert budgets_from_cfg(cfg) == DEFAULT_BUDGETS and len(DEFAULT_BUDGETS) == 35
    assert budgets_from_cfg(OmegaConf.merge(cfg, {"budgets": [1, 2.5]})) == [1.0, 2.5]
    assert budgets_from_cfg(
        OmegaConf.merge(cfg, {"budget_start": 1.0, "budget_stop": 2.0, "budget_step": 0.5})
    ) == [
        1.0,
        1.5,
        2.0,
    ]
    with pytest.raises(ValueError, match="budget"):
        budgets_from_cfg(OmegaConf.merge(cfg, {"budgets": [1.0, -1.0]}))
    with pytest.raises(ValueError, match="budget_step"):
        budgets_from_cfg(OmegaConf.merge(cfg, {"budget_step": 0}))


# ---- CLI end to end on prediction files ----
def _prediction_file(path, n, t, c, seed, metric="top1", dataset="synthetic", gflops=4.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n, 1), generator=g)
    # a classifier that gets more accurate with more steps
    signal = torch.nn.functional.one_hot(labels[:, 0], c).float().unsqueeze(1) * torch.linspace(
        0.5, 4, t
    ).view(1, t, 1)
    logits = torch.randn(n, t, c, generator=g) + signal
    save_predictions(
        path,
        {
            "logits": logits,
            "labels": labels,
            "paths": [f"videos/{i:05d}.mp4" for i in range(n)],
            "gflops_per_video": gflops,
            "num_classes": c,
            "metric": metric,
            "dataset": dataset,
            "config": {"dataset": {"name": dataset}},
        },
    )
    return path


def _run_cli(tmp_path, *overrides, wandb_mode="disabled"):
    env = dict(os.environ, HYDRA_FULL_ERROR="1", WANDB_MODE=wandb_mode, WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, str(REPO / "early_exit.py"), f"hydra.run.dir={tmp_path / 'out'}", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_on_prediction_files(tmp_path):
    calib = _prediction_file(tmp_path / "calib.pt", 400, 4, 5, seed=0)
    evals = _prediction_file(tmp_path / "eval.pt", 150, 4, 5, seed=1)
    proc = _run_cli(
        tmp_path,
        f"calib_predictions={calib}",
        f"eval_predictions={evals}",
        "criterion=max_logit",
        "logger=csv",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    with open(out / "early_exit.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["p", "gflops", "metric"]
    assert len(rows) == 1 + 35
    values = [[float(x) for x in r] for r in rows[1:]]
    assert [r[0] for r in values] == pytest.approx(DEFAULT_BUDGETS)
    # the same numbers as the library on the same files
    from adafocus.predictions import load_predictions

    c, e = load_predictions(calib), load_predictions(evals)
    ref = early_exit_sweep(c["logits"], e["logits"], e["labels"], 4.0, "top1", DEFAULT_BUDGETS, "max_logit")
    assert [r[1] for r in values] == pytest.approx(ref.gflops, abs=1e-5)
    assert [r[2] for r in values] == pytest.approx(ref.metric, abs=1e-5)
    with Image.open(out / "early_exit.png") as img:
        img.verify()
    with Image.open(out / "early_exit.png") as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
    assert "no exit" in proc.stdout and "GFLOPs" in proc.stdout

    # explicit budgets, the paper's criterion, W&B (offline: no credentials) gets the table and the plot
    proc = _run_cli(
        tmp_path,
        f"calib_predictions={calib}",
        f"eval_predictions={evals}",
        "budgets=[0.5,1,2]",
        "logger=wandb",
        wandb_mode="offline",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "out" / "early_exit.csv") as f:
        assert [r["p"] for r in csv.DictReader(f)] == ["0.5", "1", "2"]
    assert "wandb sync" in proc.stdout
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert list((run_dir / "files" / "media" / "images" / "early_exit").glob("plot_*.png"))
    assert list((run_dir / "files" / "media" / "table" / "early_exit").glob("table_*.table.json"))


def test_cli_rejects_mismatched_files(tmp_path):
    from hydra import compose, initialize_config_dir

    from adafocus.predictions import PredictionFileError
    from adafocus.tasks import early_exit

    def early_exit_with(*overrides: str):
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            return early_exit(compose("early_exit", [*overrides, f"output_dir={tmp_path / 'out'}"]))

    calib = _prediction_file(tmp_path / "calib.pt", 50, 4, 5, seed=0)
    evals = _prediction_file(tmp_path / "eval.pt", 30, 3, 5, seed=1)
    with pytest.raises(PredictionFileError, match=r"T = 4.*calib.pt|calib.pt.*T = 4"):
        early_exit_with(f"calib_predictions={calib}", f"eval_predictions={evals}")
    with pytest.raises(ValueError, match="ckpt_path"):  # no checkpoint and no prediction files
        early_exit_with()
    # the dataset chosen on the command line must match the files' class count (the real CLI: it reads
    # which groups the command line chose)
    evals = _prediction_file(tmp_path / "eval.pt", 30, 4, 5, seed=1)
    proc = _run_cli(tmp_path, f"calib_predictions={calib}", f"eval_predictions={evals}", "dataset=minik")
    assert proc.returncode != 0
    assert "dataset.num_classes" in proc.stderr and "200" in proc.stderr
