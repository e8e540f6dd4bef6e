"""Keyframe-aware sampling (``sampling="keyframe"``) on real encoded videos: the decoded frames are keyframes,
stay inside their TSN segments and cover every keyframe of a segment; segments without one fall back."""

from __future__ import annotations

import av
import pytest
import torch
from videos import frame_index_of, numbered_frames, skip_without_torchcodec, write_video

from adafocus.data import VideoClipDataset, VideoTransform, parse_list, processing_order

N, T = 60, 8  # train segments [7s, 7s + 7); eval segments [7.5s, 7.5s + 7.5)


def keyframes_of(path) -> list[int]:
    """Indices of the I-frames, read from the decoded pictures with PyAV (not from the manifest)."""
    with av.open(str(path)) as c:
        return [i for i, f in enumerate(c.decode(video=0)) if f.pict_type == av.video.frame.PictureType.I]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """``dense``: a keyframe every 3 frames (2-3 per segment); ``sparse``: every 25 (most segments: none)."""
    root = tmp_path_factory.mktemp("keyframes")
    write_video(root / "videos" / "dense.mp4", numbered_frames(N, seed=1), keyint=3)
    write_video(root / "videos" / "sparse.mp4", numbered_frames(N, seed=2), keyint=25)
    (root / "list.txt").write_text(f"dense,{N},0\nsparse,{N},0\n")
    return root, parse_list(root / "list.txt", "comma", 1)


def decoded_indices(ds: VideoClipDataset, index: int) -> list[int]:
    """The sampled frames in temporal order, as frame index mod 15 read from the decoded pictures."""
    frames = ds.load_frames(index)  # (T, 3, H, W), processing order
    got = [frame_index_of(f.permute(1, 2, 0).numpy()) for f in frames]
    temporal = [0] * T
    for position, segment in enumerate(processing_order(T)):
        temporal[segment] = got[position]
    return temporal


def in_segment(residue: int, start: int, stop: int) -> int:
    """The one frame of [start, stop) (shorter than 15) with this index mod 15."""
    (frame,) = [f for f in range(start, stop) if f % 15 == residue]
    return frame


@pytest.mark.parametrize("decoder", ["decord", "torchcodec"])
def test_train_keyframes_inside_and_covering_segments(videos, decoder):
    root, entries = videos
    if decoder == "torchcodec":
        skip_without_torchcodec()
    ds = VideoClipDataset(entries, root, T, VideoTransform(32), train=True, decode_short_side=None,
                          sampling="keyframe", decoder=decoder)  # fmt: skip
    keys = keyframes_of(root / "videos" / "dense.mp4")
    assert keys == list(range(0, N, 3))
    torch.manual_seed(0)
    chosen = [set() for _ in range(T)]
    for _ in range(25):
        for s, residue in enumerate(decoded_indices(ds, 0)):
            frame = in_segment(residue, 7 * s, 7 * s + 7)  # inside its segment ...
            assert frame in keys  # ... and a keyframe: nothing before it is decoded
            chosen[s].add(frame)
    for s in range(T):  # every keyframe of every segment is drawn
        assert chosen[s] == {k for k in keys if 7 * s <= k < 7 * s + 7}


def test_train_segments_without_keyframe_fall_back_to_exact(videos):
    root, entries = videos
    ds = VideoClipDataset(entries, root, T, VideoTransform(32), train=True, decode_short_side=None,
                          sampling="keyframe")  # fmt: skip
    keys = keyframes_of(root / "videos" / "sparse.mp4")
    assert keys == [0, 25, 50]
    torch.manual_seed(0)
    chosen = [set() for _ in range(T)]
    for _ in range(25):
        for s, residue in enumerate(decoded_indices(ds, 1)):
            chosen[s].add(in_segment(residue, 7 * s, 7 * s + 7))
    for s in range(T):
        inside = {k for k in keys if 7 * s <= k < 7 * s + 7}
        assert chosen[s] == inside if inside else len(chosen[s]) > 2  # keyframe, else random exact frames


@pytest.mark.parametrize("name,index", [("dense", 0), ("sparse", 1)])
def test_eval_keyframe_nearest_segment_centre(videos, name, index):
    root, entries = videos
    ds = VideoClipDataset(entries, root, T, VideoTransform(32), train=False, decode_short_side=None,
                          sampling="keyframe")  # fmt: skip
    keys = keyframes_of(root / "videos" / f"{name}.mp4")
    tick = N / T
    expected = []
    for s in range(T):
        inside = [k for k in keys if tick * s <= k < tick * (s + 1)]
        centre = tick / 2 + tick * s
        expected.append(min(inside, key=lambda k: abs(k - centre)) if inside else int(centre))
    assert [e % 15 for e in expected] == decoded_indices(ds, index)
    if name == "dense":
        assert all(e in keys for e in expected)
    else:
        assert expected == [0, 11, 18, 25, 33, 41, 50, 56]  # three segments hold a keyframe
