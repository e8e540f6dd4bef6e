"""VideoDataModule: the LightningDataModule between video files on disk and ``[B, T, 3, S, S]`` batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from adafocus.data.dataset import BACKENDS, ClipCollate, VideoClipDataset
from adafocus.data.io import VideoReadError, require_decoder
from adafocus.data.lists import LIST_FORMATS, ListFileError, VideoEntry, parse_list, read_class_index
from adafocus.data.manifest import ManifestError, VideoInfo, check_file, read_manifest
from adafocus.data.resumable import ResumableDataLoader
from adafocus.data.sampling import SAMPLINGS
from adafocus.data.transforms import VideoTransform, normalize_video

log = logging.getLogger(__name__)


class BadVideosError(RuntimeError):
    """Too many training videos failed to decode."""


class VideoDataModule(pl.LightningDataModule):
    """Videos of a split file -> batches ``{"video": [B, T, 3, S, S], "label": long [B],
    "labels": long [B, L] (-1 padded), "index": long [B], "path": list[str]}``.

    The loaders yield ``video`` as uint8 (4x less through worker queues and pinned memory);
    :meth:`on_after_batch_transfer` (Lightning calls it on the device) makes it the model's float32 input with
    :func:`~adafocus.data.transforms.normalize_video` — code reading a loader directly calls that itself.

    ``data_dir`` holds the list files and class index, and ``videos/<path>.<ext>`` (backend "video", decord)
    or ``frames/<path>/image_00001.jpg...`` (backend "frames", PIL). ``batch_size`` is the total over all
    devices. See SPEC §3 for sampling / processing order / augmentation.

    ``sampling``: "exact" (SPEC §3's TSN) or "keyframe" (a keyframe inside each segment: no decoding of the
    frames before it). ``decoder``: "decord" or "torchcodec" (optional extra). ``manifest``: path of the
    videos' manifest relative to ``data_dir`` (``prepare transcode`` / ``verify --manifest`` write it),
    used when the file exists (null: never). ``decode_device="cuda"``: torchcodec decodes on the GPU; only in
    the main process (``workers=0``).

    Bad videos: in training a failing video is replaced by another one and counted; when more than
    ``max_bad_fraction`` of an epoch's videos (on this rank) have failed, the next batch raises
    :class:`BadVideosError` listing them (checked in ``on_before_batch_transfer``, which runs in the main
    process for every batch, from the dataset's shared-memory failure marks). In evaluation a failing video
    raises an error naming it, or with ``skip_bad_eval`` is dropped from its batch
    (see :meth:`skipped_videos`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        list_format: str,
        train_list: str,
        val_list: str,
        class_index: str,
        num_classes: int,
        multilabel: bool,
        num_frames: int = 16,
        input_size: int = 224,
        batch_size: int = 32,
        workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        augment: bool = True,
        decode_short_side: int | None = 360,
        backend: str = "video",
        frame_template: str = "image_{:05d}.jpg",
        max_bad_fraction: float = 0.01,
        skip_bad_eval: bool = False,
        generate: Mapping[str, Any] | None = None,
        seed: int = 0,
        decode_threads: int = 1,
        sampling: str = "exact",
        decoder: str = "decord",
        manifest: str | None = "videos/manifest.jsonl",
        decode_device: str = "cpu",
        eval_limit: int | None = None,
        test_clips: int = 1,
        test_crops: int = 1,
        predict_split: str = "val",
        predict_transform: str = "eval",
    ) -> None:
        super().__init__()
        if sampling not in SAMPLINGS:
            raise ValueError(f"data.sampling must be one of {SAMPLINGS}, got {sampling!r}")
        require_decoder(decoder)  # a decoder that is not installed: a message naming what to install, now
        if decode_device != "cpu" and (decoder != "torchcodec" or int(workers) != 0):
            raise ValueError(
                f"data.decode_device={decode_device!r} needs data.decoder=torchcodec and workers=0 (GPU "
                f"decoding runs in the main process), got decoder={decoder!r}, workers={workers}"
            )
        if list_format not in LIST_FORMATS:
            raise ValueError(f"data.list_format must be one of {LIST_FORMATS}, got {list_format!r}")
        if backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
        if decode_short_side is not None and int(decode_short_side) <= 0:
            raise ValueError(
                f"data.decode_short_side must be a positive int or null, got {decode_short_side}"
            )
        if "{" not in frame_template:
            raise ValueError(
                f"data.frame_template must be a format string like 'image_{{:05d}}.jpg', "
                f"got {frame_template!r}"
            )
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if predict_split not in ("train", "val") or predict_transform not in ("train", "eval"):
            raise ValueError(
                f"predict_split must be train|val and predict_transform train|eval, got {predict_split!r}, "
                f"{predict_transform!r}"
            )
        if int(batch_size) < 1 or int(num_frames) < 1 or int(input_size) < 1 or int(workers) < 0:
            raise ValueError(
                f"data.batch_size/num_frames/input_size must be >= 1 and workers >= 0, got "
                f"{batch_size}/{num_frames}/{input_size}/{workers}"
            )
        self.data_dir = Path(data_dir)
        self.list_format = list_format
        self.train_list, self.val_list, self.class_index = train_list, val_list, class_index
        self.num_classes, self.multilabel = int(num_classes), bool(multilabel)
        self.num_frames, self.input_size = int(num_frames), int(input_size)
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.augment = bool(augment)
        self.decode_short_side = None if decode_short_side is None else int(decode_short_side)
        self.backend, self.frame_template = backend, frame_template
        self.max_bad_fraction, self.skip_bad_eval = float(max_bad_fraction), bool(skip_bad_eval)
        self.generate = None if generate is None else dict(generate)
        self.seed = int(seed)
        self.decode_threads = int(decode_threads)
        self.sampling, self.decoder, self.decode_device = sampling, decoder, decode_device
        self.manifest = manifest
        self.video_infos: dict[str, VideoInfo] | None = None  # the manifest's lines, read in setup()

        self.class_names: list[str] = []
        self.per_device_batch_size: int | None = None
        self.max_labels = 1
        self.train_dataset: VideoClipDataset | None = None
        self.val_dataset: VideoClipDataset | None = None
        self._entries: dict[str, list[VideoEntry]] = {}
        self._eval_datasets: dict[str, VideoClipDataset] = {}
        self._train_epoch_size = 0
        self.eval_limit = None if eval_limit is None else int(eval_limit)
        if int(test_clips) < 1 or int(test_crops) not in (1, 3):
            raise ValueError(f"test_clips={test_clips} must be >= 1 and test_crops={test_crops} 1 or 3")
        if int(test_clips) > 1 and sampling != "exact":
            raise ValueError(f"test_clips={test_clips} needs dataset.sampling=exact, got {sampling!r}")
        self.test_clips, self.test_crops = int(test_clips), int(test_crops)
        self.predict_split, self.predict_transform = predict_split, predict_transform

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Generate the synthetic dataset when ``generate`` is set (rank 0 only, before setup)."""
        if self.generate is not None:
            from adafocus.data.synthetic import ensure_synthetic  # lazy: the generator is optional

            ensure_synthetic(self.data_dir, **self.generate)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _list_path(self, split: str) -> Path:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.data_dir / (self.train_list if split == "train" else self.val_list)

    def entries(self, split: str) -> list[VideoEntry]:
        """Parsed and validated entries of ``split`` ("train" / "val")."""
        if split not in self._entries:
            path = self._list_path(split)
            entries = parse_list(path, self.list_format, self.num_classes)
            if not self.multilabel:
                for e in entries:
                    if len(e.labels) != 1:
                        raise ListFileError(
                            f"{path}:{e.line}: {len(e.labels)} labels for {e.path!r}, but the dataset is "
                            "single-label (dataset.multilabel=false)"
                        )
            self._entries[split] = entries
            self.max_labels = max(self.max_labels, *(len(e.labels) for e in entries))
        return self._entries[split]

    def setup(self, stage: str | None = None) -> None:
        """Read the class index and validate the list files (before any training); per-device batch size."""
        world_size, _ = self._world()
        if self.batch_size % world_size:
            raise ValueError(
                f"batch_size={self.batch_size} is the total over all devices and must be divisible by the "
                f"world size {world_size}"
            )
        self.per_device_batch_size = self.batch_size // world_size
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"data_dir not found: expected the directory {self.data_dir}")
        self.class_names = read_class_index(self.data_dir / self.class_index, self.num_classes)
        splits = ["val"] if stage in ("validate", "test", "predict") else ["train", "val"]
        for split in splits:
            self.check_manifest(split)
        if "train" in splits:
            self.check_files(["train", "val"])  # a missing video stops here, not hours into an epoch
            self.train_dataset = self._dataset(self.entries("train"), train=True)
        # validation during training skips (and counts, see skipped_videos) a video that fails to decode:
        # one bad file must not end a run; evaluate.py's test loader is strict unless skip_bad_eval
        self.val_dataset = self._dataset(
            self.entries("val"), train=False, on_error="skip" if "train" in splits else None
        )

    def check_files(self, splits: list[str]) -> None:
        """Every listed video (or frame folder) exists: FileNotFoundError naming the missing ones (list file,
        line, path); no decoding."""
        missing = []
        for split in splits:
            dataset = self._dataset(self.entries(split), train=False)
            for i, entry in enumerate(dataset.entries):
                try:
                    if not dataset.source(i).exists():
                        raise VideoReadError(dataset.display_path(i))
                except VideoReadError:
                    missing.append(f"{self._list_path(split)}:{entry.line}: {dataset.display_path(i)}")
        if missing:
            shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
            raise FileNotFoundError(f"{len(missing)} listed videos are missing:\n  {shown}")

    def manifest_path(self) -> Path | None:
        """The manifest file when ``manifest`` is set and the file exists (backend "video")."""
        if self.manifest is None or self.backend != "video":
            return None
        path = self.data_dir / self.manifest
        return path if path.is_file() else None

    def check_manifest(self, split: str) -> None:
        """Read the manifest (once) and check it against ``split``'s entries: every listed video has a line,
        and its file exists with the recorded size. :class:`ManifestError` naming the file and line."""
        entries = self.entries(split)
        path = self.manifest_path()
        if path is None:
            return
        if self.video_infos is None:
            self.video_infos = read_manifest(path)
            log.info("manifest %s: %d videos", path, len(self.video_infos))
        for e in entries:
            info = self.video_infos.get(e.path)
            if info is None:
                raise ManifestError(
                    f"{self._list_path(split)}:{e.line}: video {e.path!r} has no line in the manifest {path} "
                    "(rerun python -m adafocus.data.prepare transcode / verify --manifest, "
                    "or data.manifest=null)"
                )
            check_file(info, path.parent)

    def _dataset(
        self,
        entries: list[VideoEntry],
        train: bool,
        train_transform: bool = False,
        views: tuple[int, int] = (1, 1),
        on_error: str | None = None,
    ) -> VideoClipDataset:
        """``train``: the training set (random frames and crops; bad videos substituted); else an evaluation
        set (bad videos raise or, with skip_bad_eval, are skipped), with the training transform when
        ``train_transform``."""
        if on_error is None:
            on_error = "substitute" if train else "skip" if self.skip_bad_eval else "raise"
        return VideoClipDataset(
            entries,
            self.data_dir,
            self.num_frames,
            VideoTransform(
                self.input_size, train=train or train_transform, augment=self.augment, crops=views[1]
            ),
            train=train or train_transform,
            backend=self.backend,
            frame_template=self.frame_template,
            decode_short_side=self.decode_short_side,
            max_labels=self.max_labels,
            on_error=on_error,
            decode_threads=self.decode_threads,
            sampling=self.sampling,
            decoder=self.decoder,
            manifest=self.video_infos,
            manifest_root=None if self.manifest_path() is None else self.manifest_path().parent,
            decode_device=self.decode_device,
            num_clips=views[0],
        )

    # ------------------------------------------------------------------ loaders
    def _loader(
        self,
        dataset: VideoClipDataset,
        sampler: torch.utils.data.Sampler,
        drop_last: bool = False,
        loader: type[DataLoader] = DataLoader,
        **kwargs: Any,
    ) -> DataLoader:
        if self.per_device_batch_size is None:
            raise RuntimeError("VideoDataModule.setup() must run before asking for a dataloader")
        return loader(
            dataset,
            batch_size=self.per_device_batch_size,
            sampler=sampler,
            num_workers=self.workers,
            pin_memory=self.pin_memory and torch.cuda.is_available() and self.decode_device == "cpu",
            persistent_workers=self.persistent_workers and self.workers > 0,
            collate_fn=ClipCollate(
                self.num_frames,
                self.input_size,
                dataset.max_labels,
                dataset.num_clips * dataset.transform.crops,
            ),
            drop_last=drop_last,
            **kwargs,
        )

    def _eval_sampler(self, dataset: VideoClipDataset) -> torch.utils.data.Sampler:
        world_size, rank = self._world()
        if world_size > 1:
            return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return SequentialSampler(dataset)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("VideoDataModule.setup('fit') must run before train_dataloader()")
        world_size, rank = self._world()
        if world_size > 1:
            sampler = DistributedSampler(
                self.train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed
            )
        else:
            sampler = RandomSampler(self.train_dataset)
        self._train_epoch_size = len(sampler)
        # drop_last as the original (eval keeps all); resumable mid-epoch, in the same order
        return self._loader(self.train_dataset, sampler, drop_last=True, loader=ResumableDataLoader)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            raise RuntimeError("VideoDataModule.setup() must run before val_dataloader()")
        self._eval_datasets["val"] = self.val_dataset
        # its own generator: validation (and the sanity check) draws nothing from training's random stream, so
        # a resumed run, which skips the validation its checkpoint reached, continues that stream unchanged
        return self._loader(
            self.val_dataset,
            self._eval_sampler(self.val_dataset),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def test_dataloader(self) -> DataLoader:
        """The val split (``eval_limit``: a seeded random subset), eval transform, ``test_clips`` x
        ``test_crops`` views per video: what evaluate.py scores."""
        return self.eval_dataloader(
            "val", self.eval_limit, self.seed, views=(self.test_clips, self.test_crops)
        )

    def predict_dataloader(self) -> DataLoader:
        """``predict_split`` (``eval_limit``: a seeded random subset) with ``predict_transform``: what the
        prediction files hold (early exit calibrates on train videos with the training transform)."""
        train_transform = self.predict_transform == "train"
        views = (1, 1) if train_transform else (self.test_clips, self.test_crops)
        return self.eval_dataloader(self.predict_split, self.eval_limit, self.seed, train_transform, views)

    def eval_dataloader(
        self,
        split: str = "val",
        limit: int | None = None,
        seed: int = 0,
        train_transform: bool = False,
        views: tuple[int, int] = (1, 1),
    ) -> DataLoader:
        """Loader over ``split`` ("val" / "train") in list order, every video once (under DDP too);
        ``limit``: a seeded random subset of that many videos (kept in list order); ``train_transform``:
        random TSN frames and the training augmentation instead of the deterministic eval ones; ``views``:
        (clips, crops) per video for multi-view testing. Works with or without a prior setup()."""
        if self.per_device_batch_size is None:
            self.setup("validate")
        if not self.class_names:
            self.class_names = read_class_index(self.data_dir / self.class_index, self.num_classes)
        self.check_manifest(split)
        entries = self.entries(split)
        if limit is not None and int(limit) < len(entries):
            generator = torch.Generator().manual_seed(int(seed))
            keep = sorted(torch.randperm(len(entries), generator=generator)[: int(limit)].tolist())
            entries = [entries[i] for i in keep]
        dataset = self._dataset(entries, train=False, train_transform=train_transform, views=views)
        self._eval_datasets[split] = dataset
        return self._loader(dataset, self._eval_sampler(dataset))

    # ------------------------------------------------------------------ bad videos
    @property
    def bad_videos(self) -> list[str]:
        """Training videos that failed so far on this rank (all worker processes together)."""
        return [] if self.train_dataset is None else self.train_dataset.failed_paths()

    def skipped_videos(self, split: str = "val") -> list[str]:
        """Videos skipped by the last eval loader of ``split`` (``skip_bad_eval=True``) on this rank."""
        dataset = self._eval_datasets.get(split)
        return [] if dataset is None else dataset.failed_paths()

    def check_bad_videos(self) -> None:
        """Raise :class:`BadVideosError` when more than ``max_bad_fraction`` of an epoch's training videos
        (this rank's share) have failed."""
        if self.train_dataset is None:
            return
        num_bad = int(self.train_dataset.failed.sum())
        if num_bad == 0:
            return
        epoch_size = self._train_epoch_size or len(self.train_dataset)
        if num_bad > self.max_bad_fraction * epoch_size:
            paths = self.train_dataset.failed_paths()
            raise BadVideosError(
                f"{num_bad} of the {epoch_size} training videos of an epoch failed to decode "
                f"(> data.max_bad_fraction={self.max_bad_fraction}); fix or remove them from "
                f"{self._list_path('train')} (python -m adafocus.data.prepare verify ...):\n  "
                + "\n  ".join(paths)
            )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or trainer.training:
            self.check_bad_videos()
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: uint8 ``video`` ``[B, T, 3, S, S]`` -> the model's normalised float32 input."""
        batch["video"] = normalize_video(batch["video"])
        return batch
