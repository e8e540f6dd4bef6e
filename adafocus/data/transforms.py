"""Clip transforms on uint8 video tensors ``[T, 3, H, W]`` with torchvision.transforms.v2 (SPEC §3).

Only the original's fixed-offset multi-scale crop is written here (:class:`MultiScaleFixedCrop`); the rest is
torchvision. Every random draw is made once per clip, so all T frames get the same crop and flip.
The clip transforms stay on uint8 (in the DataLoader workers); :func:`normalize_video` turns a uint8 batch
into the model's normalised float32 input once, on the device (``VideoDataModule.on_after_batch_transfer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiScaleFixedCrop(v2.Transform):
    """The original's ``GroupMultiScaleCrop`` crop (without its resize): one draw per call.

    base = shorter side; crop height and width each ``int(base * s)`` for s in ``scales``, chosen with at
    most ``max_distort`` steps between the two scale indices; sizes within 3 px of ``input_size`` snap to it.
    The position is one of 13 fixed points on a grid of ``(W - w) // 4`` x ``(H - h) // 4`` steps: 4 corners,
    centre, 4 edge centres, 4 quarter points.
    """

    def __init__(
        self, input_size: int, scales: Sequence[float] = (1, 0.875, 0.75, 0.66), max_distort: int = 1
    ) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.scales = tuple(scales)
        self.max_distort = int(max_distort)

    def crop_candidates(self, height: int, width: int) -> list[tuple[int, int]]:
        """All allowed ``(crop_h, crop_w)`` pairs for a ``height`` x ``width`` frame."""
        base = min(height, width)
        sizes = [int(base * s) for s in self.scales]
        sizes = [self.input_size if abs(s - self.input_size) < 3 else s for s in sizes]
        return [
            (min(h, height), min(w, width))
            for i, h in enumerate(sizes)
            for j, w in enumerate(sizes)
            if abs(i - j) <= self.max_distort
        ]

    @staticmethod
    def fixed_offsets(height: int, width: int, crop_h: int, crop_w: int) -> list[tuple[int, int]]:
        """The 13 fixed ``(top, left)`` positions."""
        hs, ws = (height - crop_h) // 4, (width - crop_w) // 4
        return [
            (0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws),  # corners, centre
            (2 * hs, 0), (2 * hs, 4 * ws), (4 * hs, 2 * ws), (0, 2 * ws),  # edge centres
            (hs, ws), (hs, 3 * ws), (3 * hs, ws), (3 * hs, 3 * ws),  # quarter points
        ]  # fmt: skip

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        candidates = self.crop_candidates(height, width)
        crop_h, crop_w = candidates[int(torch.randint(len(candidates), ()))]
        offsets = self.fixed_offsets(height, width, crop_h, crop_w)
        top, left = offsets[int(torch.randint(len(offsets), ()))]
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` (a clip ``[T, 3, H, W]`` or a batch ``[B, T, 3, H, W]``) -> float32 in [0, 1]
    normalised with the ImageNet mean/std: the model's input. Runs on the tensor's device."""
    if video.dtype != torch.uint8 or video.ndim < 3 or video.shape[-3] != 3:
        raise ValueError(
            f"normalize_video expects uint8 [..., 3, H, W], got {video.dtype} {tuple(video.shape)}"
        )
    return F.normalize(F.to_dtype(video, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


class VideoTransform:
    """The clip transform preset: uint8 ``[T, 3, H, W]`` -> uint8 ``[T, 3, S, S]`` (see normalize_video).

    - ``train and augment``: MultiScaleFixedCrop -> Resize((S, S)) bilinear -> RandomHorizontalFlip(0.5).
    - otherwise (eval): Resize(shorter side S*256//224) -> CenterCrop(S); with ``crops=3`` (multi-view
      testing, MMAction2's ThreeCrop) three S x S crops along the longer side (start, centre, end) ->
      ``[3, T, 3, S, S]``.
    - ``augment=False`` (pixel-exact data, e.g. synthetic): the eval transform for train and eval, and no
      resampling at all when the frames are already S x S.
    The resize runs on uint8 frames and rounds to uint8, as it did before the normalisation moved out.
    """

    def __init__(
        self, input_size: int = 224, train: bool = False, augment: bool = True, crops: int = 1
    ) -> None:
        if crops not in (1, 3) or (crops == 3 and train):
            raise ValueError(f"crops={crops}: 1, or 3 for evaluation (three crops along the longer side)")
        self.input_size, self.train, self.augment, self.crops = (
            int(input_size),
            bool(train),
            bool(augment),
            crops,
        )
        size = self.input_size
        if self.train and self.augment:
            self.geometric = v2.Compose(
                [
                    MultiScaleFixedCrop(size),
                    v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                    v2.RandomHorizontalFlip(p=0.5),
                ]
            )
        else:
            self.geometric = v2.Compose(
                [
                    v2.Resize(size * 256 // 224, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                    v2.CenterCrop(size),
                ]
            )

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[1] != 3:
            raise ValueError(
                f"VideoTransform expects uint8 [T, 3, H, W], got {video.dtype} {tuple(video.shape)}"
            )
        clip = tv_tensors.Video(video)
        if self.crops == 3:
            return self._three_crops(clip)
        exact = not self.augment and tuple(video.shape[-2:]) == (self.input_size, self.input_size)
        if not exact:
            clip = self.geometric(clip)
        return clip.as_subclass(torch.Tensor)

    def _three_crops(self, clip: tv_tensors.Video) -> torch.Tensor:
        size = self.input_size
        resized = self.geometric.transforms[0](clip)  # the eval resize: shorter side S*256//224
        h, w = resized.shape[-2:]
        if h >= w:  # portrait: top, centre, bottom
            boxes = [(top, (w - size) // 2) for top in (0, (h - size) // 2, h - size)]
        else:  # landscape: left, centre, right
            boxes = [((h - size) // 2, left) for left in (0, (w - size) // 2, w - size)]
        crops = [v2.functional.crop(resized, top, left, size, size) for top, left in boxes]
        return torch.stack([c.as_subclass(torch.Tensor) for c in crops])  # (3, T, 3, S, S)

    def __repr__(self) -> str:
        mode = "train" if self.train and self.augment else "eval"
        return f"VideoTransform({mode}, input_size={self.input_size}, augment={self.augment})"
