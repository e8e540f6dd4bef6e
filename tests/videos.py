"""Helpers that write small *real* encoded videos and dataset directories for tests (PyAV, H.264).

Other areas' tests may import these: ``from tests.videos import write_video, make_video_dataset``
(or ``from videos import ...`` — ``tests/`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = 8,
    codec: str = "libx264",
    crf: int = 10,
    keyint: int | None = None,
    audio: bool = False,
) -> Path:
    """Encode ``frames`` (uint8 ``[N, H, W, 3]`` RGB, H and W even) to ``path`` (mp4/mkv/...) with PyAV.

    Uses yuv420p + a low CRF, so decoded frames are close to (not equal to) the input. ``keyint``: a keyframe
    exactly every that many frames (libx264, no scene cuts; default: x264's own choice, i.e. only frame 0 in
    short clips). ``audio``: add a silent AAC track. Returns the path.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video expects uint8 [N, H, W, 3] frames, got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_video needs even height/width for yuv420p, got {h}x{w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"} if codec == "libx264" else {}
        if keyint is not None:
            stream.options = {
                **stream.options,
                "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0",
            }
        sound = container.add_stream("aac", rate=16000) if audio else None
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:  # n / fps seconds of silence
            samples = np.zeros((1, 1024), dtype=np.float32)
            for k in range(int(16000 * n / fps) // 1024 + 1):
                chunk = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, k * 1024
                container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return path


def numbered_frames(n: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Frames whose index can be read back after lossy coding: uint8 ``[n, height, width, 3]``.

    Frame ``i`` has a flat grey level ``8 + 16 * (i % 15)`` in the left half of the image (so the index mod 15
    is recoverable within +-7 grey levels), and a smooth random colour texture in the right half.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0 : width - width // 2]
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        tex = 128 + 60 * np.sin(xx[..., None] / 5.0 + yy[..., None] / 7.0 + phase)
        out[i, :, : width // 2] = 8 + 16 * (i % 15)
        out[i, :, width // 2 :] = tex.astype(np.uint8)
    return out


def frame_index_of(frame: np.ndarray) -> int:
    """Inverse of :func:`numbered_frames` (mod 15) for a decoded ``[H, W, 3]`` frame."""
    level = float(np.asarray(frame)[:, : frame.shape[1] // 4].mean())
    return int(round((level - 8) / 16)) % 15


def make_video_dataset(
    root: str | os.PathLike,
    videos: Sequence[tuple[str, int, Sequence[int]]],
    num_classes: int,
    list_format: str = "comma",
    height: int = 48,
    width: int = 64,
    ext: str = "mp4",
    train_list: str = "train_split.txt",
    val_list: str = "val_split.txt",
    class_index: str = "classInd.txt",
    val_videos: Sequence[tuple[str, int, Sequence[int]]] | None = None,
    list_num_frames: int | None = None,
) -> Path:
    """Build a tiny dataset dir: ``root/videos/<rel>.<ext>``, list files and a class index.

    ``videos`` / ``val_videos``: ``(relative_path, num_frames, labels)`` per video (val defaults to the same
    videos). ``list_format``: "comma" (ActivityNet/FCVID, multi-label) or "space" (Mini-Kinetics, one label,
    paths may contain spaces). ``list_num_frames``: the count written in the list (default: the true one).
    Returns ``root``.
    """
    root = Path(root)
    val_videos = videos if val_videos is None else val_videos
    written: set[str] = set()
    for k, (rel, n, _labels) in enumerate([*videos, *val_videos]):
        if rel in written:
            continue
        written.add(rel)
        write_video(root / "videos" / f"{rel}.{ext}", numbered_frames(n, height, width, seed=k))

    def line(rel: str, n: int, labels: Sequence[int]) -> str:
        count = n if list_num_frames is None else list_num_frames
        if list_format == "comma":
            return ",".join([rel, str(count), *map(str, labels)])
        if list_format == "space":
            (label,) = labels
            return f"{rel} {count} {label}"
        raise ValueError(f"unknown list_format {list_format!r}")

    for name, items in ((train_list, videos), (val_list, val_videos)):
        (root / name).write_text("".join(line(*v) + "\n" for v in items))
    (root / class_index).write_text("".join(f"class_{c}\n" for c in range(num_classes)))
    return root


def skip_without_torchcodec() -> None:
    """pytest.skip, with the reason, where torchcodec or FFmpeg's shared libraries are not installed."""
    import pytest

    from adafocus.data.io import require_decoder

    try:
        require_decoder("torchcodec")
    except RuntimeError as e:
        pytest.skip(f"cannot run here: {e}")
