"""Map-style clip dataset over a split file: decode (decord / JPEG folders), sample, order, transform."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from adafocus.data.io import DECODERS, VideoReadError, read_frames, read_video, resolve_video
from adafocus.data.lists import VideoEntry
from adafocus.data.manifest import VideoInfo
from adafocus.data.sampling import SAMPLINGS, sample_clip_indices
from adafocus.data.transforms import VideoTransform

log = logging.getLogger(__name__)

BACKENDS = ("video", "frames")
ON_ERROR = ("substitute", "raise", "skip")


class VideoClipDataset(Dataset):
    """Clips of ``num_frames`` frames from the videos of one split.

    Item: ``{"video": uint8 [T, 3, S, S], "label": long [], "labels": long [L] (-1 padded),
    "index": int, "path": str}`` (``index``/``path`` of the video actually loaded); multi-view testing
    (``num_clips`` > 1 or a transform with 3 crops): ``video`` uint8 ``[V, T, 3, S, S]``, V = clips x crops.

    ``train=True``: random TSN sampling and a random label among the video's labels at each load;
    ``train=False``: segment centres and the first label. Frames come in the coarse-to-fine processing order.
    ``sampling="keyframe"``: keyframes inside the segments instead (see ``sampling.sample_clip_indices``).
    ``manifest`` (``{video: VideoInfo}`` of the files under ``manifest_root``): frame counts, sizes and
    keyframes known in advance, so each video is opened once. ``decoder``: "decord" or "torchcodec".
    The normalisation is not done here: see ``transforms.normalize_video``.

    Bad videos (missing, empty, undecodable) are marked in ``failed``, a uint8 ``[len]`` tensor in shared
    memory, so that marks made inside DataLoader worker processes are visible to the main process
    (see :meth:`failed_paths`); each is reported once (logging warning) with its path and the decoder's
    message. Then, by ``on_error``: ``"substitute"`` loads another random video instead (training),
    ``"raise"`` raises :class:`VideoReadError` naming the path, ``"skip"`` returns None, which
    :class:`ClipCollate` drops.
    """

    def __init__(
        self,
        entries: Sequence[VideoEntry],
        data_dir: str | Path,
        num_frames: int,
        transform: VideoTransform,
        train: bool,
        backend: str = "video",
        frame_template: str = "image_{:05d}.jpg",
        decode_short_side: int | None = 360,
        max_labels: int | None = None,
        on_error: str = "raise",
        decode_threads: int = 1,
        max_substitutions: int = 20,
        sampling: str = "exact",
        decoder: str = "decord",
        manifest: dict[str, VideoInfo] | None = None,
        manifest_root: str | Path | None = None,
        decode_device: str = "cpu",
        num_clips: int = 1,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"dataset backend must be one of {BACKENDS}, got {backend!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"dataset sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if decoder not in DECODERS:
            raise ValueError(f"dataset decoder must be one of {DECODERS}, got {decoder!r}")
        self.entries = list(entries)
        self.data_dir = Path(data_dir)
        self.num_frames = int(num_frames)
        self.transform = transform
        self.train = bool(train)
        self.backend = backend
        self.frame_template = frame_template
        self.decode_short_side = decode_short_side
        self.max_labels = max_labels or max(len(e.labels) for e in self.entries)
        self.on_error = on_error
        self.decode_threads = decode_threads
        self.max_substitutions = max_substitutions
        self.sampling, self.decoder, self.decode_device = sampling, decoder, decode_device
        self.manifest = manifest
        self.manifest_root = None if manifest_root is None else Path(manifest_root)
        if num_clips < 1 or (num_clips > 1 and (train or sampling != "exact")):
            raise ValueError(
                f"num_clips={num_clips}: >= 1, and several clips only for evaluation with exact sampling"
            )
        self.num_clips = int(num_clips)
        self.failed = torch.zeros(len(self.entries), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.entries)

    def source(self, index: int) -> Path:
        """The video file (``videos/<path>.<ext>``) or frame folder (``frames/<path>``) of entry ``index``."""
        rel = self.entries[index].path
        if self.backend == "video" and self.manifest is not None:
            return self.manifest_root / self.manifest[rel].file
        if self.backend == "video":
            return resolve_video(self.data_dir / "videos", rel)
        return self.data_dir / "frames" / rel

    def display_path(self, index: int) -> str:
        sub = "videos" if self.backend == "video" else "frames"
        return str(self.data_dir / sub / self.entries[index].path)

    def load_frames(self, index: int) -> torch.Tensor:
        """The sampled frames of entry ``index`` in processing order: uint8 ``[T, 3, H, W]`` (``[clips * T,
        3, H, W]``, clip after clip, with several clips: decoded in one call)."""

        keyframe = self.sampling == "keyframe"

        def pick(n: int, keyframes: Sequence[int] | None = None) -> list[int]:
            return [
                i
                for c in range(self.num_clips)
                for i in sample_clip_indices(
                    n, self.num_frames, self.train, keyframes=keyframes if keyframe else None, clip=c,
                    num_clips=self.num_clips,
                )
            ]  # fmt: skip

        src = self.source(index)
        if self.backend == "frames":  # every JPEG is a keyframe: exact sampling
            frames = read_frames(src, pick, self.frame_template)
            return torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)
        info = None if self.manifest is None else self.manifest[self.entries[index].path]
        return read_video(
            src, pick, self.decode_short_side, self.decode_threads, self.decoder, info, self.decode_device
        )

    def _item(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        frames = self.load_frames(index)  # (clips * T, 3, H, W)
        if self.num_clips == 1:
            video = self.transform(frames)  # (T, 3, S, S), or (crops, T, 3, S, S)
        else:  # multi-view testing: (clips * crops, T, 3, S, S), clip-major
            views = [self.transform(clip) for clip in frames.split(self.num_frames)]
            video = torch.cat([v if v.dim() == 5 else v[None] for v in views])
        labels = entry.labels
        label = labels[int(torch.randint(len(labels), ()))] if self.train and len(labels) > 1 else labels[0]
        padded = torch.full((self.max_labels,), -1, dtype=torch.long)
        padded[: len(labels)] = torch.tensor(labels, dtype=torch.long)
        return {
            "video": video,
            "label": torch.tensor(label, dtype=torch.long),
            "labels": padded,
            "index": index,
            "path": entry.path,
        }

    def _mark_failed(self, index: int, error: VideoReadError) -> None:
        if int(self.failed[index]) == 0:
            self.failed[index] = 1
            log.warning("bad video %s (%s)", error.path, error.reason)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self._item(index)
        except VideoReadError as e:
            self._mark_failed(index, e)
            if self.on_error == "raise":
                raise
            if self.on_error == "skip":
                return None
        # substitute: another random video that has not failed yet
        for _ in range(self.max_substitutions):
            healthy = (self.failed == 0).nonzero().flatten()
            if len(healthy) == 0:
                break
            other = int(healthy[int(torch.randint(len(healthy), ()))])
            try:
                return self._item(other)
            except VideoReadError as e:
                self._mark_failed(other, e)
        raise RuntimeError(
            f"could not find a readable substitute for bad video {self.display_path(index)} "
            f"after {self.max_substitutions} tries; bad videos so far: {self.failed_paths()}"
        )

    def failed_paths(self) -> list[str]:
        """Paths of the videos that failed so far (in any worker process)."""
        return [self.display_path(int(i)) for i in self.failed.nonzero().flatten()]


class ClipCollate:
    """default_collate of the items, dropping None (videos skipped in evaluation).

    An all-skipped batch becomes an empty batch with the usual keys (``video`` uint8 ``[0, T, 3, S, S]``).
    """

    def __init__(self, num_frames: int, input_size: int, max_labels: int, views: int = 1) -> None:
        self.num_frames, self.input_size, self.max_labels, self.views = (
            num_frames,
            input_size,
            max_labels,
            views,
        )

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [item for item in items if item is not None]
        if kept:
            return default_collate(kept)
        t, s = self.num_frames, self.input_size
        return {
            "video": torch.zeros(
                0, *((self.views,) if self.views > 1 else ()), t, 3, s, s, dtype=torch.uint8
            ),
            "label": torch.zeros(0, dtype=torch.long),
            "labels": torch.zeros(0, self.max_labels, dtype=torch.long),
            "index": torch.zeros(0, dtype=torch.long),
            "path": [],
        }
