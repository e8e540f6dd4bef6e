"""Frame sampling and processing order (SPEC §3), on real encoded videos."""

from __future__ import annotations

import pytest
import torch
from videos import frame_index_of, make_video_dataset

from adafocus.data import VideoClipDataset, VideoTransform, parse_list, processing_order, sample_clip_indices
from adafocus.data.sampling import eval_indices, train_indices

ORDER_16 = (7, 0, 15, 3, 11, 1, 5, 9, 13, 2, 4, 6, 8, 10, 12, 14)
ORDER_8 = (3, 0, 7, 1, 5, 2, 4, 6)


def test_processing_order_matches_spec():
    assert processing_order(16) == ORDER_16
    assert processing_order(8) == ORDER_8
    for t in range(1, 33):
        assert sorted(processing_order(t)) == list(range(t))


def test_eval_indices_formula():
    assert eval_indices(100, 8) == [int(100 / 8 / 2 + 100 / 8 * t) for t in range(8)]
    assert eval_indices(8, 8) == list(range(8))
    assert eval_indices(5, 8) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert train_indices(5, 8) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert train_indices(16, 16) == list(range(16))


def test_train_indices_one_per_segment():
    for n, t in [(20, 8), (37, 16), (16, 16), (100, 16)]:
        avg = n // t
        for seed in range(5):
            idx = train_indices(n, t, torch.Generator().manual_seed(seed))
            assert all(s * avg <= i < (s + 1) * avg for s, i in enumerate(idx))


# (frames in the video, T): N > T, N == T, N < T, for T = 8 and 16
CASES = [(20, 8), (8, 8), (5, 8), (40, 16), (16, 16), (12, 16)]


@pytest.fixture(scope="module")
def sampling_dataset(tmp_path_factory):
    videos = [(f"v{n}", n, [0]) for n in sorted({n for n, _ in CASES})]
    # the list claims 999 frames: the decoder's count must be used
    root = make_video_dataset(tmp_path_factory.mktemp("sampling"), videos, 1, list_num_frames=999)
    return root, parse_list(root / "train_split.txt", "comma", 1)


@pytest.mark.parametrize("n,t", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_decoded_clip_frames_and_order(sampling_dataset, n, t, train):
    root, entries = sampling_dataset
    (index,) = [i for i, e in enumerate(entries) if e.path == f"v{n}"]
    ds = VideoClipDataset(entries, root, t, VideoTransform(32), train=train, decode_short_side=None)
    torch.manual_seed(123)
    frames = ds.load_frames(index)  # (T, 3, H, W) uint8, processing order
    torch.manual_seed(123)
    expected = sample_clip_indices(n, t, train)
    sampled = train_indices(n, t, torch.Generator().manual_seed(0)) if train else eval_indices(n, t)
    assert frames.shape == (t, 3, 48, 64) and frames.dtype == torch.uint8
    assert max(expected) < n
    got = [frame_index_of(f.permute(1, 2, 0).numpy()) for f in frames]
    assert got == [i % 15 for i in expected]
    if not train:
        assert expected == [sampled[k] for k in (ORDER_16 if t == 16 else ORDER_8)]


def test_multi_clip_eval_spreads_clips_over_each_segment():
    assert eval_indices(160, 16) == [5 + 10 * i for i in range(16)]  # one clip: the segment centres
    assert eval_indices(160, 16, clip=0, num_clips=2) == [2 + 10 * i for i in range(16)]  # tick * 0.25
    assert eval_indices(160, 16, clip=1, num_clips=2) == [7 + 10 * i for i in range(16)]  # tick * 0.75
    thirds = [eval_indices(90, 3, clip=c, num_clips=3) for c in range(3)]
    assert thirds == [[5, 35, 65], [15, 45, 75], [25, 55, 85]]  # tick 30: 30 * (c + 0.5) / 3 + 30 t
