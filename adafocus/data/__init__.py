"""Video data pipeline (SPEC §3): decord decoding, TSN sampling, transforms, the LightningDataModule."""

from adafocus.data.datamodule import BadVideosError, VideoDataModule
from adafocus.data.dataset import ClipCollate, VideoClipDataset
from adafocus.data.io import VideoReadError
from adafocus.data.lists import ListFileError, VideoEntry, parse_list, read_class_index
from adafocus.data.sampling import eval_indices, processing_order, sample_clip_indices, train_indices
from adafocus.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiScaleFixedCrop, VideoTransform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadVideosError",
    "ClipCollate",
    "ListFileError",
    "MultiScaleFixedCrop",
    "VideoClipDataset",
    "VideoDataModule",
    "VideoEntry",
    "VideoReadError",
    "VideoTransform",
    "eval_indices",
    "parse_list",
    "processing_order",
    "read_class_index",
    "sample_clip_indices",
    "train_indices",
]
