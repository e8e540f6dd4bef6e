"""AdaFocusV2+: budgeted early exit on the recurrent classifier's per-step logits (SPEC §5).

No training: given every step's logits of a calibration set (training videos) and of an evaluation set,

- confidence ``c_k`` per video and step: max softmax probability (``criterion="softmax"``, the paper) or the
  max raw logit (``criterion="max_logit"``, the original code);
- budget ``p``: target share of videos exiting at step k is ``q_k ∝ p^k``, k = 1..T, normalised;
- thresholds on the calibration set: for k = 1..T-1, among videos not yet exited, sort ``c_k`` descending,
  the top ``⌊n·q_k⌋`` exit at k and ``η_k`` is the confidence of the last of them (+inf if none);
  ``η_T = -inf``;
- evaluation: a video exits at the first k with ``c_k >= η_k``, is predicted by ``logits_k`` and costs
  ``k · gflops / T``. Per p: mean GFLOPs per video and the dataset's metric (mAP or top-1, in %).

Everything is vectorised over videos and budgets (loops only over the T steps); the metric of all budgets is
one sort per chunk of budgets (:func:`average_precision`).
``q`` and ``⌊n·q_k⌋`` are computed in float32 exactly as the original code does, so with
``criterion="max_logit"`` the exits (hence the numbers) equal the original algorithm's on the same logits;
ties in confidence are broken by video index (stable sort).

The task around it (predictions, outputs, loggers) is :mod:`adafocus.tasks.early_exit`.
``python -m adafocus.early_exit --bench`` times the sweep next to the original's loops on random logits
(5 000 calibration / 1 250 evaluation videos, T 16, C 200).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from adafocus.metrics import multi_hot

CRITERIA = ("softmax", "max_logit")
DEFAULT_BUDGETS = [round(0.1 * i, 10) for i in range(5, 40)]  # 0.5, 0.6, ..., 3.9 (the original's sweep)
METRIC_LABELS = {"map": "mAP (%)", "top1": "top-1 accuracy (%)"}

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# algorithm
# ----------------------------------------------------------------------------------------------------
def confidences(logits: torch.Tensor, criterion: str = "softmax") -> torch.Tensor:
    """Per-step confidence. logits [N, T, C] -> [N, T] (float32)."""
    if criterion == "softmax":
        return F.softmax(logits.float(), dim=-1).amax(dim=-1)
    if criterion == "max_logit":
        return logits.float().amax(dim=-1)
    raise ValueError(f"criterion={criterion!r}: expected one of {list(CRITERIA)}")


def exit_fractions(p: float, num_steps: int) -> torch.Tensor:
    """Target exit shares q_k ∝ p^k, k = 1..T, float32 [T] — computed as the original code computes them."""
    if not p > 0:
        raise ValueError(f"budget p={p!r} must be > 0")
    p_t = torch.tensor([p], dtype=torch.float32)
    q = torch.exp(torch.log(p_t) * torch.arange(1, num_steps + 1, dtype=torch.float32))  # (T,)
    q /= q.sum()
    q /= q.sum()  # the original normalises twice (once when building, once in the threshold search)
    return q


def exit_counts_target(budgets: list[float], num_videos: int, num_steps: int) -> torch.Tensor:
    """⌊n·q_k⌋ per budget and step: long [P, T] (float32 product as in the original)."""
    q = torch.stack([exit_fractions(p, num_steps) for p in budgets])  # (P, T) float32
    return torch.floor(q * num_videos).long()


def find_thresholds(calib_conf: torch.Tensor, budgets: list[float]) -> torch.Tensor:
    """Thresholds η from calibration confidences [n, T] for each budget -> float32 [P, T].

    For k < T: among videos not yet exited, the ⌊n·q_k⌋ most confident at step k exit; η_k = confidence of the
    last of them (+inf if none). η_T = -inf.
    """
    n, t = calib_conf.shape
    num_b = len(budgets)
    out_n = exit_counts_target(budgets, n, t)  # (P, T)
    # per step, videos in descending confidence (ties by index): (T, n)
    sorted_conf, sorted_idx = torch.sort(calib_conf.t().contiguous(), dim=1, descending=True, stable=True)
    remaining = torch.ones(num_b, n, dtype=torch.bool)  # (P, n), in video order
    eta = torch.full((num_b, t), math.inf, dtype=torch.float32)
    for k in range(t - 1):
        idx = sorted_idx[k]  # (n,)
        rem_sorted = remaining[:, idx]  # (P, n) in step-k confidence order
        rank = rem_sorted.cumsum(dim=1)  # (P, n): 1-based rank among the remaining videos
        want = out_n[:, k].contiguous()  # (P,)
        if bool((want > rank[:, -1]).any()):  # cannot happen: Σ_k<T ⌊n·q_k⌋ < n
            raise RuntimeError("early exit: more videos asked to exit than remain")
        # position (in sorted order) of the want-th remaining video: first position where rank reaches want
        pos = torch.searchsorted(rank, want.unsqueeze(1).contiguous()).squeeze(1).clamp(max=n - 1)  # (P,)
        has = want > 0
        eta[:, k] = torch.where(has, sorted_conf[k, pos], torch.full_like(eta[:, k], math.inf))
        exit_sorted = rem_sorted & (rank <= want.unsqueeze(1))  # (P, n) exactly `want` videos each
        exited = torch.zeros_like(remaining)
        exited[:, idx] = exit_sorted  # back to video order
        remaining &= ~exited
    eta[:, t - 1] = -math.inf
    return eta


def exit_steps(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """First step k (0-based) with c_k >= η_k. conf [N, T], thresholds [P, T] -> long [P, N]."""
    n, t = conf.shape
    ge = conf.unsqueeze(0) >= thresholds.unsqueeze(1)  # (P, N, T)
    steps = torch.arange(t).expand_as(ge)
    return torch.where(ge, steps, t).amin(dim=-1).clamp(max=t - 1)  # η_T = -inf: always exits by T


def mean_average_precision_at_exits(
    probs: torch.Tensor, exits: torch.Tensor, target: torch.Tensor
) -> list[float]:
    """mAP (%) of each set of exits at once: probs [T, C, N] (softmax of every step's logits, class-major),
    exits long [S, N] (each video's step), target [N, C] in {0, 1} (CPU) -> S values.

    Per class, non-interpolated AP as torchmetrics' ``multilabel_average_precision(thresholds=None)`` and
    scikit-learn compute it: Σ over the distinct score thresholds of Δrecall × precision, i.e. each positive
    counts the precision among the videos scored at or above its score (without ties: the mean of the
    precision at each positive); the mean is over the classes with a positive (SPEC §4). Vectorised over sets
    and classes instead of torchmetrics' Python loop per class: each (set, class) column is sorted once
    (numpy's SIMD sort, ~10x torch's on CPU), then each positive's two counts are binary searches.
    """
    _, c, n = probs.shape
    positives = target.sum(dim=0)  # (C,)
    present = positives > 0
    m = int(positives.max())
    cls, video = target.t().nonzero(as_tuple=True)  # every positive, by class then video
    slot = torch.arange(len(cls)) - (positives.cumsum(0) - positives)[cls]  # its place among its class's
    videos = torch.zeros(c, m, dtype=torch.long).index_put_((cls, slot), video)  # (C, M): positive videos
    real = torch.arange(m) < positives[:, None]  # (C, M): not padding
    values: list[float] = []
    for chunk in exits.split(max(1, 8_000_000 // (c * n))):  # ~8M scores at a time: bounded memory
        s = chunk.shape[0]
        columns = probs.gather(0, chunk[:, None, :].expand(s, c, n))  # (S, C, N): scores at the exits
        ascending = torch.from_numpy(np.sort(columns.numpy(), axis=-1))  # (S, C, N)
        # the positives' scores (S, C, M); padding is +inf, above every score
        pos_scores = torch.where(real, columns.gather(-1, videos.expand(s, c, m)), torch.inf)
        videos_at_or_above = n - torch.searchsorted(ascending, pos_scores)  # (S, C, M)
        positives_at_or_above = positives[:, None] - torch.searchsorted(
            pos_scores.sort(dim=-1).values, pos_scores
        )
        precision = torch.where(real, positives_at_or_above.double() / videos_at_or_above, 0.0)  # (S, C, M)
        ap = precision.sum(dim=-1) / positives  # (S, C)
        values += (100.0 * ap[:, present].mean(dim=1)).tolist()
    return values


def metric_at_exits(
    logits: torch.Tensor, exits: torch.Tensor, labels: torch.Tensor, metric: str
) -> list[float]:
    """The dataset's metric in % for each set of exits: logits [N, T, C], exits long [S, N] (each video's
    step), labels [N, L] (-1 padded) -> S values.

    "map": SPEC §4 — softmax scores, per-class average precision against the multi-hot truth, mean over the
    classes that have a positive (the others have no defined AP and are left out). "top1": accuracy of the
    argmax against the video's first label.
    """
    n, _, num_classes = logits.shape
    if metric == "top1":
        right = logits.argmax(dim=-1) == labels[:, :1]  # (N, T): step t's prediction is the first label
        correct = right.gather(1, exits.t()).sum(dim=0)  # (S,)
        return (100.0 * (correct.float() / n).double()).tolist()
    if metric == "map":
        probs = F.softmax(logits.float(), dim=-1).permute(1, 2, 0).contiguous()  # (T, C, N)
        return mean_average_precision_at_exits(probs, exits, multi_hot(labels, num_classes))
    raise ValueError(f"metric={metric!r}: expected 'map' or 'top1'")


@contextlib.contextmanager
def _single_thread():
    """Run a block with one intra-op thread (restored afterwards).

    The sweep's tensors are small (P x n, P x C x N); on a loaded 2-core machine, intra-op threads made the
    threshold search 18x slower (1.6 s vs 0.09 s) and the mAP sweep 3x slower, and on an idle one they gain
    little.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class EarlyExitResult:
    """Outcome of a budget sweep. Lists are per budget; ``exit_counts`` [P, T]: videos exiting per step."""

    budgets: list[float]
    gflops: list[float]
    metric: list[float]
    metric_name: str
    criterion: str
    thresholds: torch.Tensor
    exit_counts: torch.Tensor
    full_gflops: float  # no early exit: all T steps
    full_metric: float
    num_calib: int = 0
    num_eval: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def rows(self) -> list[tuple[float, float, float]]:
        return list(zip(self.budgets, self.gflops, self.metric, strict=True))


def early_exit_sweep(
    calib_logits: torch.Tensor,
    eval_logits: torch.Tensor,
    eval_labels: torch.Tensor,
    gflops_per_video: float,
    metric: str,
    budgets: list[float] | None = None,
    criterion: str = "softmax",
) -> EarlyExitResult:
    """Run SPEC §5 for every budget. calib_logits [n, T, C], eval_logits [N, T, C], eval_labels [N, L]."""
    start = time.perf_counter()
    budgets = list(DEFAULT_BUDGETS if budgets is None else budgets)
    if not budgets:
        raise ValueError("early exit: the list of budgets is empty")
    if calib_logits.shape[1:] != eval_logits.shape[1:]:
        raise ValueError(
            f"calibration logits {list(calib_logits.shape)} and evaluation logits {list(eval_logits.shape)} "
            "differ in T or C"
        )
    n_eval, t, c = eval_logits.shape
    eval_logits = eval_logits.float()
    with _single_thread():
        thresholds = find_thresholds(confidences(calib_logits, criterion), budgets)  # (P, T)
        steps = exit_steps(confidences(eval_logits, criterion), thresholds)  # (P, N)
        exit_counts = F.one_hot(steps, t).sum(dim=1)  # (P, T)
        mean_steps = (steps + 1).double().mean(dim=1)  # (P,)
        gflops = (mean_steps * (float(gflops_per_video) / t)).tolist()
        exits = torch.cat([steps, steps.new_full((1, n_eval), t - 1)])  # (P + 1, N): the budgets', no exit
        *values, full_metric = metric_at_exits(eval_logits, exits, eval_labels, metric)
    return EarlyExitResult(
        budgets=[float(b) for b in budgets],
        gflops=gflops,
        metric=values,
        metric_name=metric,
        criterion=criterion,
        thresholds=thresholds,
        exit_counts=exit_counts,
        full_gflops=float(gflops_per_video),
        full_metric=full_metric,
        num_calib=int(calib_logits.shape[0]),
        num_eval=n_eval,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------------------
# benchmark: python -m adafocus.early_exit --bench
# ----------------------------------------------------------------------------------------------------
def _original_loops(calib, evals, labels, gflops_per_video, metric, budgets) -> tuple[list, list]:
    """The original's sweep as its loops run it (``ops/early_exit.py``, max-logit confidence; SPEC §5), for
    timing: per budget, the threshold search step by step, each evaluation video walking the steps with a
    ``.item()`` per step, then the metric (top-1, or AP class by class over the classes with a positive).
    Returns (GFLOPs, metric) per budget."""
    n, t, c = calib.shape
    m = evals.shape[0]
    calib_vals = [calib[:, k].amax(dim=-1) for k in range(t)]
    sorted_idx = [v.sort(descending=True, stable=True).indices for v in calib_vals]
    eval_vals = [evals[:, k].amax(dim=-1) for k in range(t)]
    target = multi_hot(labels, c).float()
    ranks = torch.arange(1, m + 1, dtype=torch.float32)
    gflops, values = [], []
    for p in budgets:
        probs = exit_fractions(p, t)
        filtered = torch.zeros(n)
        thresholds = torch.full((t,), 1e8)
        for k in range(t - 1):
            out_n = math.floor(n * probs[k])
            if out_n > 0:
                remain = sorted_idx[k][filtered[sorted_idx[k]] == 0]
                thresholds[k] = calib_vals[k][remain[out_n - 1]]
                filtered[remain[:out_n]] = 1
        thresholds[t - 1] = -1e8
        outputs = torch.zeros(m, c)
        exits = [0] * t
        for i in range(m):
            for k in range(t):
                if eval_vals[k][i].item() >= thresholds[k]:
                    outputs[i] = evals[i, k]
                    exits[k] += 1
                    break
        gflops.append(sum(exits[k] / m * (k + 1) * gflops_per_video / t for k in range(t)))
        if metric == "top1":
            values.append(100.0 * float((outputs.argmax(dim=1) == labels[:, 0]).float().mean()))
            continue
        probs_out = F.softmax(outputs, dim=1)
        aps = []
        for j in range(c):
            truth = target[probs_out[:, j].sort(descending=True).indices, j]
            if truth.sum() > 0:
                aps.append(float((truth.cumsum(0) / ranks)[truth.bool()].sum() / truth.sum()))
        values.append(100.0 * sum(aps) / len(aps))
    return gflops, values


def benchmark(
    num_calib: int = 5000, num_eval: int = 1250, num_steps: int = 16, num_classes: int = 200, seed: int = 0
) -> dict:
    """Time the sweep of the 35 default budgets on random logits of the given size, for each metric: the
    original's loops (max-logit confidence, as the original; one run) next to ours (both criteria; the median
    of three runs). Per metric: seconds of each, the ratio, and the largest difference between the numbers."""
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(num_calib, num_steps, num_classes, generator=g) * 3
    evals = torch.randn(num_eval, num_steps, num_classes, generator=g) * 3
    labels = torch.randint(0, num_classes, (num_eval, 1), generator=g)
    early_exit_sweep(calib[:50], evals[:50], labels[:50], 1.0, "map", [1.0])  # warm-up (lazy imports)
    out = {}
    for metric in ("top1", "map"):
        start = time.perf_counter()
        ref_gflops, ref_values = _original_loops(calib, evals, labels, 26.96, metric, DEFAULT_BUDGETS)
        original = time.perf_counter() - start
        row = {"original_max_logit": original}
        for criterion in CRITERIA:
            seconds = []
            for _ in range(3):  # the median of three runs
                start = time.perf_counter()
                ours = early_exit_sweep(calib, evals, labels, 26.96, metric, DEFAULT_BUDGETS, criterion)
                seconds.append(time.perf_counter() - start)
            row[f"ours_{criterion}"] = sorted(seconds)[1]
            if criterion == "max_logit":
                row["max_abs_diff"] = max(
                    abs(a - b)
                    for a, b in zip(ours.metric + ours.gflops, ref_values + ref_gflops, strict=True)
                )
        row["speedup_max_logit"] = original / row["ours_max_logit"]
        out[metric] = row
    return out


if __name__ == "__main__":  # pragma: no cover - manual benchmark
    import argparse

    parser = argparse.ArgumentParser(description="AdaFocusV2+ early-exit algorithm benchmark")
    parser.add_argument("--bench", action="store_true", help="time 5000 calib + 1250 eval, T=16, C=200")
    parser.add_argument("--calib", type=int, default=5000, help="calibration videos")
    parser.add_argument("--eval", type=int, default=1250, help="evaluation videos")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench:
        print(
            f"{len(DEFAULT_BUDGETS)} budgets, {args.calib} calibration / {args.eval} evaluation videos, "
            "T 16, C 200"
        )
        for metric, row in benchmark(args.calib, args.eval).items():
            print(
                f"{metric:>5s}: original loops {row['original_max_logit']:7.2f} s | ours max_logit "
                f"{row['ours_max_logit']:6.3f} s ({row['speedup_max_logit']:6.1f}x), softmax "
                f"{row['ours_softmax']:6.3f} s | largest difference in the numbers {row['max_abs_diff']:.2e}"
            )
    else:
        parser.print_help()
