"""Video / frame-folder readers (decord or torchcodec, and PIL) and small file helpers."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from adafocus.data.manifest import VideoInfo
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


DECODERS = ("decord", "torchcodec")
TORCHCODEC_INSTALL = (
    "torchcodec (pip install -e '.[torchcodec]') and FFmpeg's shared libraries (Debian/Ubuntu: apt-get "
    "install ffmpeg)"
)


def require_decoder(decoder: str) -> None:
    """Raise a clear error, before any work, when ``decoder`` is unknown or not usable here."""
    if decoder not in DECODERS:
        raise ValueError(f"dataset.decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "torchcodec":
        try:
            from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads FFmpeg's libraries)
        except Exception as e:  # ImportError, or RuntimeError/OSError when FFmpeg's libraries are missing
            raise RuntimeError(
                f"dataset.decoder=torchcodec cannot be used here: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e) else ''}. Install {TORCHCODEC_INSTALL}, "
                "or use dataset.decoder=decord"
            ) from e


Pick = Callable[[int, Sequence[int]], Sequence[int]]


def read_video(
    path: Path,
    pick: Pick,
    short_side: int | None = 360,
    num_threads: int = 1,
    decoder: str = "decord",
    info: VideoInfo | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """Decode only the frames ``pick(N, keyframes)`` of ``path``, resized inside the decoder.

    ``N`` frames and ``keyframes`` (sorted 0-based indices) come from the manifest line ``info`` when given
    (no probing; N clamped to what the decoder reports, a manifest claiming more frames is stale), else from
    the decoder. ``decoder``: "decord" or "torchcodec" (one VideoDecoder, ``seek_mode="approximate"`` with a
    manifest, one ``get_frames_at`` call; ``device="cuda"``: on the GPU). Returns uint8 ``[T, 3, H, W]``
    RGB with the shorter side ``short_side`` (native size when None). Any failure raises
    :class:`VideoReadError` naming the path.
    """
    try:
        if path.stat().st_size == 0:
            raise VideoReadError(path, "empty file (0 bytes)")
        native = (info.width, info.height) if info is not None else (probe_size(path) if short_side else None)
        size = None if short_side is None else decode_size(*native, short_side)
        if decoder == "decord":
            frames = _read_decord(path, pick, size, num_threads, info)
        elif decoder == "torchcodec":
            frames = _read_torchcodec(path, pick, size, num_threads, info, device)
        else:
            raise ValueError(f"unknown decoder {decoder!r} (one of {DECODERS})")
    except VideoReadError:
        raise
    except Exception as e:  # decord raises DECORDError / RuntimeError; av and torchcodec raise their own
        raise VideoReadError(
            path, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        ) from e
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise VideoReadError(path, f"decoder returned an array of shape {tuple(frames.shape)}")
    return frames


def _frame_count(path: Path, reported: int | None, info: VideoInfo | None) -> int:
    """The frames to sample from: the manifest's count (checked against the decoder's) or the decoder's."""
    if info is None:
        if not reported or reported <= 0:
            raise VideoReadError(path, "the decoder reports 0 frames")
        return int(reported)
    if reported is not None and reported < info.frames:
        raise VideoReadError(
            path,
            f"stale manifest line {info.where}: it says {info.frames} frames, the decoder finds {reported} "
            "(rerun prepare transcode / prepare verify --manifest)",
        )
    return info.frames


def _unique(indices: Sequence[int], n: int) -> tuple[list[int], list[int]]:
    """(sorted unique indices clamped to [0, n), position of each requested index among them)."""
    clamped = [min(max(int(i), 0), n - 1) for i in indices]
    unique = sorted(set(clamped))  # decode each needed frame once, in stream order
    where = {i: k for k, i in enumerate(unique)}
    return unique, [where[i] for i in clamped]


def _read_decord(
    path: Path, pick: Pick, size: tuple[int, int] | None, num_threads: int, info: VideoInfo | None
) -> torch.Tensor:
    import decord

    if size is None:
        vr = decord.VideoReader(str(path), num_threads=num_threads)
    else:
        vr = decord.VideoReader(str(path), width=size[0], height=size[1], num_threads=num_threads)
    n = _frame_count(path, len(vr), info)
    keyframes = info.keyframes if info is not None else vr.get_key_indices()
    unique, order = _unique(pick(n, keyframes), n)
    decoded = torch.from_numpy(vr.get_batch(unique).asnumpy())  # (U, H, W, 3)
    return decoded[order].permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)


def _read_torchcodec(
    path: Path,
    pick: Pick,
    size: tuple[int, int] | None,
    num_threads: int,
    info: VideoInfo | None,
    device: str,
) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    decoder = VideoDecoder(
        str(path),
        num_ffmpeg_threads=num_threads,
        device=device,
        seek_mode="approximate" if info is not None else "exact",  # exact mode scans the whole file
        transforms=None if size is None else [Resize((size[1], size[0]))],
    )
    n = _frame_count(path, decoder.metadata.num_frames, info)
    # without a manifest the keyframes come from exact mode's scan (torchcodec has no public accessor yet)
    keyframes = info.keyframes if info is not None else decoder._get_key_frame_indices().tolist()
    unique, order = _unique(pick(n, keyframes), n)
    return decoder.get_frames_at(unique).data[order]  # (T, 3, H, W)


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
