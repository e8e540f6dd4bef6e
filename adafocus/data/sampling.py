"""TSN-style frame sampling (exact, or keyframe-aware) and the coarse-to-fine processing order (SPEC §3)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch


def _short_video(num_video_frames: int, num_segments: int) -> list[int]:
    """All N frames, then the last one repeated up to T (N <= T)."""
    return [min(i, num_video_frames - 1) for i in range(num_segments)]


def train_indices(
    num_video_frames: int, num_segments: int, generator: torch.Generator | None = None
) -> list[int]:
    """Random frame per segment (SPEC §3, train), in temporal order: T 0-based indices into [0, N).

    ``avg = N // T``; if ``avg > 0``: ``t*avg + randint(avg)``; elif ``N > T``: T sorted draws with
    replacement from ``[0, N)``; else all N frames, then the last repeated. Random draws use ``generator``
    (default: torch's global RNG, which DataLoader seeds per worker).
    """
    n, t = int(num_video_frames), int(num_segments)
    if n <= 0:
        raise ValueError(f"cannot sample from a video with {n} frames")
    avg = n // t
    if avg > 0:
        offsets = torch.randint(avg, (t,), generator=generator)
        return [i * avg + int(o) for i, o in enumerate(offsets)]
    if n > t:  # unreachable for new_length = 1 (avg > 0 whenever N >= T), kept as in SPEC
        return sorted(int(x) for x in torch.randint(n, (t,), generator=generator))
    return _short_video(n, t)


def eval_indices(num_video_frames: int, num_segments: int, clip: int = 0, num_clips: int = 1) -> list[int]:
    """Segment centres (SPEC §3, eval): ``int(tick/2 + tick*t)`` with ``tick = N/T``; N <= T as for train.

    Multi-clip testing (``num_clips`` > 1, MMAction2's ``num_clips``): clip ``c`` takes the frame at
    ``tick * (c + 0.5) / num_clips`` inside each segment, so the clips spread evenly over every segment."""
    n, t = int(num_video_frames), int(num_segments)
    if n <= 0:
        raise ValueError(f"cannot sample from a video with {n} frames")
    if n <= t:
        return list(range(t)) if n == t else _short_video(n, t)
    tick = n / t
    if num_clips == 1:
        return [int(tick / 2.0 + tick * i) for i in range(t)]
    return [int(tick * (clip + 0.5) / num_clips + tick * i) for i in range(t)]


@functools.cache
def processing_order(num_segments: int) -> tuple[int, ...]:
    """Coarse-to-fine order in which the T sampled frames are fed to the model (the recipes' ``--sample``).

    Start ``[floor((T-1)/2), 0, T-1]``; then for q = 2, 4, 8, ...: over the q+1 points
    ``floor(linspace(0, T-1, q+1))`` append ``floor((a+b)/2)`` of each consecutive pair when new; stop at T.
    T=16 -> (7, 0, 15, 3, 11, 1, 5, 9, 13, 2, 4, 6, 8, 10, 12, 14); T=8 -> (3, 0, 7, 1, 5, 2, 4, 6).
    """
    t = int(num_segments)
    if t < 1:
        raise ValueError(f"num_frames must be >= 1, got {t}")
    order: list[int] = []
    for i in ((t - 1) // 2, 0, t - 1):
        if i not in order:
            order.append(i)
    q = 2
    while len(order) < t:
        points = np.floor(np.linspace(0, t - 1, q + 1)).astype(int)
        for a, b in zip(points[:-1], points[1:], strict=True):
            mid = int((a + b) // 2)
            if mid not in order and len(order) < t:
                order.append(mid)
        q *= 2
        if q > 4 * t:  # every integer in [0, T) is reached long before this
            raise AssertionError(f"processing_order({t}) did not terminate: {order}")
    return tuple(order)


SAMPLINGS = ("exact", "keyframe")


def keyframe_train_indices(
    num_video_frames: int,
    num_segments: int,
    keyframes: Sequence[int],
    generator: torch.Generator | None = None,
) -> list[int]:
    """Train sampling on keyframes: in each TSN segment ``[t*avg, (t+1)*avg)`` (``avg = N // T``) a random
    keyframe of that segment; a segment holding none gets the exact random frame of :func:`train_indices`.
    Videos with ``N < T`` segments (``avg = 0``) are sampled exactly. T 0-based indices, temporal order.
    """
    n, t = int(num_video_frames), int(num_segments)
    avg = n // t
    if avg == 0:
        return train_indices(n, t, generator)
    keys = np.asarray(keyframes, dtype=np.int64)
    starts = np.arange(t) * avg
    lo, hi = np.searchsorted(keys, starts), np.searchsorted(keys, starts + avg)  # keys[lo:hi] in segment
    out = []
    for s in range(t):
        count = int(hi[s] - lo[s])
        if count:
            out.append(int(keys[lo[s] + int(torch.randint(count, (), generator=generator))]))
        else:
            out.append(int(starts[s]) + int(torch.randint(avg, (), generator=generator)))
    return out


def keyframe_eval_indices(num_video_frames: int, num_segments: int, keyframes: Sequence[int]) -> list[int]:
    """Eval sampling on keyframes: in each segment ``[tick*t, tick*(t+1))`` (``tick = N/T``) the keyframe
    nearest the segment centre ``tick/2 + tick*t`` (the earlier one on a tie); a segment holding none gets
    the exact centre frame of :func:`eval_indices`. ``N <= T`` is sampled exactly.
    """
    n, t = int(num_video_frames), int(num_segments)
    exact = eval_indices(n, t)
    if n <= t:
        return exact
    keys = np.asarray(keyframes, dtype=np.int64)
    tick = n / t
    out = []
    for s in range(t):
        first, end = np.ceil(tick * s), np.ceil(tick * (s + 1))  # integer frames f with tick*s <= f < end
        inside = keys[(keys >= first) & (keys < end)]
        if len(inside):
            centre = tick / 2.0 + tick * s
            out.append(int(inside[np.argmin(np.abs(inside - centre))]))
        else:
            out.append(exact[s])
    return out


def sample_clip_indices(
    num_video_frames: int,
    num_segments: int,
    train: bool,
    generator: torch.Generator | None = None,
    keyframes: Sequence[int] | None = None,
    clip: int = 0,
    num_clips: int = 1,
) -> list[int]:
    """Frame indices of one clip in processing order: ``sampled[processing_order(T)]``.

    ``clip`` of ``num_clips`` (eval, exact sampling): multi-clip testing, see :func:`eval_indices`.

    ``keyframes`` (sorted 0-based indices): keyframe-aware sampling (:func:`keyframe_train_indices` /
    :func:`keyframe_eval_indices`); None: the exact TSN sampling of SPEC §3.
    """
    if keyframes is None:
        sampled = (
            train_indices(num_video_frames, num_segments, generator)
            if train
            else eval_indices(num_video_frames, num_segments, clip, num_clips)
        )
    elif train:
        sampled = keyframe_train_indices(num_video_frames, num_segments, keyframes, generator)
    else:
        sampled = keyframe_eval_indices(num_video_frames, num_segments, keyframes)
    return [sampled[i] for i in processing_order(num_segments)]
