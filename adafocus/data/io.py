"""Video / frame-folder readers (decord and PIL) and small file helpers."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from adafocus.fileio import atomic_write_text  # noqa: F401  (re-exported for the data tools)

VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov")
FRAME_TEMPLATES = ("image_{:05d}.jpg", "img_{:05d}.jpg")


class VideoReadError(RuntimeError):
    """A video (or frame folder) that is missing or cannot be decoded; the message names the path."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        # one-argument form: DataLoader re-raises worker exceptions as ``type(e)(message)``
        super().__init__(str(path) if reason is None else f"cannot read video {path}: {reason}")
        self.path = str(path)
        self.reason = "" if reason is None else reason


def resolve_video(videos_dir: Path, rel: str) -> Path:
    """``videos_dir/<rel>.<ext>`` for the first existing ext of VIDEO_EXTENSIONS (or ``<rel>`` as given)."""
    for ext in VIDEO_EXTENSIONS:
        candidate = videos_dir / f"{rel}.{ext}"
        if candidate.is_file():
            return candidate
    direct = videos_dir / rel
    if direct.is_file():
        return direct
    raise VideoReadError(
        videos_dir / rel, f"missing: no file {videos_dir / rel}.{{{','.join(VIDEO_EXTENSIONS)}}}"
    )


def probe_size(path: Path) -> tuple[int, int]:
    """(width, height) of the first video stream, read from the header with PyAV (no decoding)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid frame size {width}x{height}")
    return width, height


def decode_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``short_side`` (aspect kept); native when None."""
    if short_side is None:
        return width, height
    short = min(width, height)
    if short == short_side:
        return width, height
    scale = short_side / short
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


def read_video(
    path: Path,
    pick: Callable[[int], Sequence[int]],
    short_side: int | None = 360,
    num_threads: int = 1,
) -> np.ndarray:
    """Decode only the frames ``pick(N)`` of ``path`` with decord, at reduced size inside the decoder.

    ``N`` is the decoder's frame count. Returns uint8 ``[T, H, W, 3]`` RGB with the shorter side
    ``short_side`` (native size when None). Any failure raises :class:`VideoReadError` naming the path.
    """
    import decord

    try:
        if path.stat().st_size == 0:
            raise VideoReadError(path, "empty file (0 bytes)")
        if short_side is None:
            vr = decord.VideoReader(str(path), num_threads=num_threads)
        else:
            w, h = decode_size(*probe_size(path), short_side)
            vr = decord.VideoReader(str(path), width=w, height=h, num_threads=num_threads)
        n = len(vr)
        if n <= 0:
            raise VideoReadError(path, "the decoder reports 0 frames")
        indices = list(pick(n))
        unique = sorted(set(indices))  # decode each needed frame once, in stream order
        decoded = vr.get_batch(unique).asnumpy()
        frames = decoded[[unique.index(i) for i in indices]]
    except VideoReadError:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError; av raises its own errors
        raise VideoReadError(
            path, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        ) from e
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise VideoReadError(path, f"decoder returned an array of shape {frames.shape}")
    return frames


def detect_frame_template(folder: Path, template: str) -> str:
    """``template`` if its first frame (index 1) is in ``folder``, else the known alternative that is."""
    for candidate in (template, *[t for t in FRAME_TEMPLATES if t != template]):
        if (folder / candidate.format(1)).is_file():
            return candidate
    raise VideoReadError(
        folder, f"no frame {template.format(1)} (nor {', '.join(t.format(1) for t in FRAME_TEMPLATES)})"
    )


def count_frames(folder: Path) -> int:
    """Number of JPEG files in a frame folder."""
    return sum(1 for name in os.listdir(folder) if name.lower().endswith((".jpg", ".jpeg")))


def read_frames(
    folder: Path, pick: Callable[[int], Sequence[int]], template: str = "image_{:05d}.jpg"
) -> np.ndarray:
    """Read frames ``pick(N)`` (0-based; files are 1-based) from a JPEG folder (PIL): uint8 ``[T, H, W, 3]``.

    ``N`` = the number of JPEGs in the folder; the name template is detected (see detect_frame_template).
    """
    from PIL import Image

    if not folder.is_dir():
        raise VideoReadError(folder, f"missing: no frame folder {folder}")
    try:
        template = detect_frame_template(folder, template)
        n = count_frames(folder)
        indices = list(pick(n))
        loaded = {}
        for i in sorted(set(indices)):
            with Image.open(folder / template.format(i + 1)) as img:
                loaded[i] = np.asarray(img.convert("RGB"))
        return np.stack([loaded[i] for i in indices])
    except VideoReadError:
        raise
    except Exception as e:
        raise VideoReadError(folder, f"{type(e).__name__}: {e}") from e
