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

Everything is vectorised over videos and budgets (loops only over the T steps and, for the metric, budgets).
``q`` and ``⌊n·q_k⌋`` are computed in float32 exactly as the original code does, so with
``criterion="max_logit"`` the exits (hence the numbers) equal the original algorithm's on the same logits;
ties in confidence are broken by video index (stable sort).

The task around it (predictions, outputs, loggers) is :mod:`adafocus.tasks.early_exit`.
``python -m adafocus.early_exit --bench`` times the algorithm on random logits of the Mini-Kinetics size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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


def video_metric(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """The dataset's metric in % for per-video logits [N, C] and labels [N, L] (-1 padded).

    "map": SPEC §4 — softmax scores, per-class average precision against the multi-hot truth, mean over the
    classes that have a positive (the others have no defined AP and are left out). "top1": accuracy of the
    argmax against the video's first label.
    """
    num_classes = logits.shape[1]
    if metric == "top1":
        from torchmetrics.functional.classification import multiclass_accuracy

        return 100.0 * float(
            multiclass_accuracy(logits, labels[:, 0], num_classes=num_classes, average="micro", top_k=1)
        )
    if metric == "map":
        from adafocus.metrics import mean_average_precision

        value, _ = mean_average_precision(F.softmax(logits.float(), dim=-1), labels)
        return value
    raise ValueError(f"metric={metric!r}: expected 'map' or 'top1'")


@contextlib.contextmanager
def _single_thread():
    """Run a block with one intra-op thread (restored afterwards).

    The metric is ~10 small tensor ops per class and budget; on a loaded machine, intra-op threads made the
    35-budget mAP sweep 25x slower (123 s vs 5 s on 2 shared cores).
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
    thresholds = find_thresholds(confidences(calib_logits, criterion), budgets)  # (P, T)
    steps = exit_steps(confidences(eval_logits, criterion), thresholds)  # (P, N)
    exit_counts = F.one_hot(steps, t).sum(dim=1)  # (P, T)
    mean_steps = (steps + 1).double().mean(dim=1)  # (P,)
    gflops = (mean_steps * (float(gflops_per_video) / t)).tolist()
    rows = torch.arange(n_eval)
    with _single_thread():  # torchmetrics' per-class AP is many tiny ops: threads only add overhead
        values = [video_metric(eval_logits[rows, steps[i]], eval_labels, metric) for i in range(len(budgets))]
        full_metric = video_metric(eval_logits[:, -1], eval_labels, metric)
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
def benchmark(
    num_calib: int = 20000, num_eval: int = 5000, num_steps: int = 16, num_classes: int = 200, seed: int = 0
) -> dict:
    """Time the full sweep (35 default budgets, both metrics) on random logits of the given size."""
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(num_calib, num_steps, num_classes, generator=g) * 3
    evals = torch.randn(num_eval, num_steps, num_classes, generator=g) * 3
    labels = torch.randint(0, num_classes, (num_eval, 1), generator=g)
    video_metric(evals[:8, -1], labels[:8], "map")  # warm-up: lazy torchmetrics imports are not the algorithm
    times = {}
    for metric in ("top1", "map"):
        for criterion in CRITERIA:
            start = time.perf_counter()
            early_exit_sweep(calib, evals, labels, 26.96, metric, DEFAULT_BUDGETS, criterion)
            times[f"{metric}/{criterion}"] = time.perf_counter() - start
    return times


if __name__ == "__main__":  # pragma: no cover - manual benchmark
    import argparse

    parser = argparse.ArgumentParser(description="AdaFocusV2+ early-exit algorithm benchmark")
    parser.add_argument("--bench", action="store_true", help="time 20000 calib + 5000 eval, T=16, C=200")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench:
        for key, seconds in benchmark().items():
            print(f"{key:>20s}: {seconds:6.2f} s for {len(DEFAULT_BUDGETS)} budgets")
    else:
        parser.print_help()
