"""The per-dataset video manifest: one JSON line per video with what decoding needs to know in advance.

``<videos dir>/manifest.jsonl``, written atomically by ``prepare transcode`` and ``verify --manifest``::

    {"video": "a/v0", "file": "a/v0.mp4", "bytes": 123456, "frames": 1200, "fps": 30.0,
     "width": 640, "height": 360, "keyframes": [0, 8, 16, ...]}

``video`` is the list files' relative path (no extension), ``file`` the file relative to the manifest's
folder, ``bytes`` its size (another size on disk: the manifest is stale), ``frames`` the number of frames that
really decode (packets, counted by demuxing; decoded with ``--full``), ``keyframes`` their 0-based indices in
presentation order. With a manifest the data module opens each video once, knows its size and frame count
without probing, clamps indices to decodable frames and samples keyframes without asking the decoder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adafocus.fileio import atomic_write_text

MANIFEST_NAME = "manifest.jsonl"
FIELDS = ("video", "file", "bytes", "frames", "fps", "width", "height", "keyframes")


class ManifestError(ValueError):
    """A malformed or stale manifest line; the message names the manifest file and line."""


@dataclass(frozen=True)
class VideoInfo:
    """One manifest line. ``keyframes``: sorted 0-based indices in ``[0, frames)``, never empty."""

    video: str
    file: str
    bytes: int
    frames: int
    fps: float
    width: int
    height: int
    keyframes: tuple[int, ...]
    where: str = field(default="", compare=False)  # "manifest.jsonl:12", for messages

    def to_json(self) -> str:
        record = asdict(self)
        record.pop("where")
        record["keyframes"] = list(self.keyframes)
        return json.dumps(record, separators=(",", ":"))


def parse_line(text: str, where: str) -> VideoInfo:
    """A :class:`VideoInfo` from one manifest line; :class:`ManifestError` naming ``where`` otherwise."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not a JSON object ({e.msg})") from None
    if not isinstance(record, dict) or set(record) != set(FIELDS):
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ManifestError(f"{where}: expected the keys {list(FIELDS)}, got {got}")
    ints = ("bytes", "frames", "width", "height")
    if not all(isinstance(record[k], int) and record[k] > 0 for k in ints):
        raise ManifestError(f"{where}: {'/'.join(ints)} must be positive integers, got {record}")
    fps = record["fps"]
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ManifestError(f"{where}: fps must be a positive number, got {fps!r}")
    keys = record["keyframes"]
    if not isinstance(keys, list) or not keys:
        raise ManifestError(f"{where}: the keyframe list of {record['video']!r} is empty (or not a list)")
    n = record["frames"]
    if (
        not all(isinstance(k, int) for k in keys)
        or keys != sorted(set(keys))
        or not 0 <= keys[0] <= keys[-1] < n
    ):
        raise ManifestError(
            f"{where}: keyframes of {record['video']!r} must be increasing integers in [0, {n}), got "
            f"{keys[:8]}{'...' if len(keys) > 8 else ''}"
        )
    if not isinstance(record["video"], str) or not isinstance(record["file"], str) or not record["file"]:
        raise ManifestError(f"{where}: video and file must be strings")
    return VideoInfo(**{**record, "fps": float(fps), "keyframes": tuple(keys)}, where=where)


def read_manifest(path: str | os.PathLike) -> dict[str, VideoInfo]:
    """``{video: VideoInfo}`` of a manifest file; a malformed line or a repeated video raises
    :class:`ManifestError` naming the file and line."""
    path = Path(path)
    infos: dict[str, VideoInfo] = {}
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        info = parse_line(text, f"{path}:{lineno}")
        if info.video in infos:
            raise ManifestError(
                f"{info.where}: video {info.video!r} already listed at {infos[info.video].where}"
            )
        infos[info.video] = info
    return infos


def write_manifest(path: str | os.PathLike, infos: Iterable[VideoInfo]) -> Path:
    """Write the manifest atomically, one line per video, sorted by video."""
    lines = sorted((info.video, info.to_json()) for info in infos)
    return atomic_write_text(path, "".join(line + "\n" for _, line in lines))


def check_file(info: VideoInfo, root: Path) -> Path:
    """``root/info.file`` when it exists with the recorded size; :class:`ManifestError` (stale) otherwise."""
    path = root / info.file
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ManifestError(f"{info.where}: {path} is missing (stale manifest: rerun prepare)") from None
    if size != info.bytes:
        raise ManifestError(
            f"{info.where}: {path} has {size} bytes, the manifest says {info.bytes} "
            "(stale manifest: rerun prepare transcode / prepare verify --manifest)"
        )
    return path


def probe_video(
    path: str | os.PathLike, video: str, root: str | os.PathLike, full: bool = False
) -> VideoInfo:
    """The manifest line of ``path`` (PyAV): frames and keyframes from the packets in presentation order
    (no decoding), or with ``full`` from decoding every frame. ``file`` is taken relative to ``root``."""
    import av

    path = Path(path)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if full:
            flags = [bool(frame.key_frame) for frame in container.decode(stream)]
        else:
            packets = [
                (p.pts if p.pts is not None else p.dts, p.is_keyframe)
                for p in container.demux(stream)
                if p.size > 0  # the flush packet at the end has no data
            ]
            flags = [key for _, key in sorted(packets, key=lambda p: -1 if p[0] is None else p[0])]
    keyframes = [i for i, key in enumerate(flags) if key]
    if not flags:
        raise ValueError("no frames")
    if not keyframes:
        raise ValueError(f"no keyframe among its {len(flags)} frames")
    return VideoInfo(
        video=video,
        file=path.relative_to(root).as_posix(),
        bytes=path.stat().st_size,
        frames=len(flags),
        fps=float(rate) if rate else 0.0,
        width=int(width),
        height=int(height),
        keyframes=tuple(keyframes),
    )
