"""Clip transforms (one draw per clip) and the two decoding backends (decord video vs JPEG folders)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from videos import make_video_dataset, write_video

from adafocus.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiScaleFixedCrop,
    VideoClipDataset,
    VideoReadError,
    VideoTransform,
    parse_list,
)
from adafocus.data.io import decode_size
from adafocus.data.transforms import normalize_video


def normalise(video_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (video_uint8.float() / 255 - mean) / std


def test_multiscale_crop_candidates_and_offsets():
    crop = MultiScaleFixedCrop(224)
    pairs = crop.crop_candidates(360, 640)
    sizes = [360, 315, 270, 237]  # int(360 * s) for s in (1, .875, .75, .66)
    assert set(pairs) == {(sizes[i], sizes[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    assert (224, 224) in MultiScaleFixedCrop(224).crop_candidates(256, 300)  # int(256 * .875) = 224
    assert (224, 224) in MultiScaleFixedCrop(224).crop_candidates(340, 400)  # 340 * .66 = 224.4 -> 224
    assert (224, 226) not in MultiScaleFixedCrop(224).crop_candidates(342, 400)  # 225 -> snaps to 224
    offsets = crop.fixed_offsets(360, 640, 270, 315)
    assert len(set(offsets)) == 13
    hs, ws = (360 - 270) // 4, (640 - 315) // 4
    assert set(offsets) == {(a * hs, b * ws) for a, b in
                            [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0), (2, 4), (4, 2), (0, 2),
                             (1, 1), (1, 3), (3, 1), (3, 3)]}  # fmt: skip
    for _ in range(50):
        p = crop.make_params([torch.zeros(1, 3, 360, 640)])
        assert (p["height"], p["width"]) in pairs
        assert (p["top"], p["left"]) in crop.fixed_offsets(360, 640, p["height"], p["width"])


def test_train_transform_same_crop_for_every_frame():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, 90, 120), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).clone()  # identical frames: any per-frame difference is a bug
    transform = VideoTransform(64, train=True)
    outputs = [transform(clip) for _ in range(20)]
    for out in outputs:
        assert out.shape == (6, 3, 64, 64) and out.dtype == torch.uint8  # normalised later, on the device
        assert torch.equal(out, out[:1].expand_as(out))
    assert len({o[0].sum().item() for o in outputs}) > 1  # the draws do change between clips


def test_eval_transform_resize_and_centre_crop():
    clip = torch.randint(0, 256, (3, 3, 48, 64), dtype=torch.uint8)
    out = VideoTransform(32, train=False)(clip)
    expected = F.center_crop(F.resize(clip, 32 * 256 // 224, antialias=True), [32, 32])
    assert torch.equal(out, expected)
    assert torch.allclose(normalize_video(out), normalise(expected), atol=1e-6)
    # augment=False: the eval transform in training too
    torch.manual_seed(1)
    assert torch.equal(VideoTransform(32, train=True, augment=False)(clip), out)


def test_no_augment_exact_size_is_identity():
    clip = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for train in (True, False):
        assert torch.equal(VideoTransform(32, train=train, augment=False)(clip), clip)
    assert torch.allclose(normalize_video(clip), normalise(clip), atol=1e-6)
    batch = torch.stack([clip, 255 - clip])  # (B, T, 3, H, W): the same per clip
    assert torch.allclose(normalize_video(batch)[1], normalise(255 - clip), atol=1e-6)
    with pytest.raises(ValueError, match=r"uint8 \[..., 3, H, W\], got torch.float32"):
        normalize_video(clip.float())


def test_decode_size():
    assert decode_size(640, 360, 360) == (640, 360)
    assert decode_size(1280, 720, 360) == (640, 360)
    assert decode_size(720, 1280, 360) == (360, 640)
    assert decode_size(64, 48, 24) == (32, 24)
    assert decode_size(64, 48, None) == (64, 48)


def extract_jpegs(video, folder, template, quality=95):
    folder.mkdir(parents=True)
    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            frame.to_image().save(folder / template.format(i + 1), quality=quality)


def jpeg_roundtrip(clip: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> the same frames saved as JPEG by PIL and read back."""
    out = []
    for frame in clip.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def two_backends(tmp_path_factory):
    """A dataset with videos/ and frames/ extracted from the same videos (one image_, one img_ folder)."""
    root = make_video_dataset(tmp_path_factory.mktemp("backends"), [("a", 20, [0]), ("b b", 7, [1])], 2,
                              list_format="space")  # fmt: skip
    extract_jpegs(root / "videos" / "a.mp4", root / "frames" / "a", "image_{:05d}.jpg")
    extract_jpegs(root / "videos" / "b b.mp4", root / "frames" / "b b", "img_{:05d}.jpg")
    return root, parse_list(root / "train_split.txt", "space", 2)


@pytest.mark.parametrize("template", ["image_{:05d}.jpg", "img_{:05d}.jpg"])
def test_backends_agree(two_backends, template):
    root, entries = two_backends
    kwargs = dict(
        num_frames=8, transform=VideoTransform(32, train=False), train=False, decode_short_side=None
    )
    video_ds = VideoClipDataset(entries, root, backend="video", **kwargs)
    frames_ds = VideoClipDataset(entries, root, backend="frames", frame_template=template, **kwargs)
    for i in range(len(entries)):
        a, b = video_ds.load_frames(i), frames_ds.load_frames(i)
        assert a.shape == b.shape
        # the frames backend reads exactly the JPEG round trip of the frames decord decodes
        assert torch.equal(b, jpeg_roundtrip(a))
        a, b = a.float(), b.float()
        assert (a - b).abs().mean() < 3.0  # JPEG loss only
        va, vb = normalize_video(video_ds[i]["video"]), normalize_video(frames_ds[i]["video"])
        assert (va - vb).abs().mean() < 0.05
        # a different clip is far away: the comparison is meaningful
        assert (a - video_ds.load_frames(1 - i).float()[: len(a)]).abs().mean() > 10


def test_frames_backend_errors(two_backends, tmp_path):
    root, entries = two_backends
    ds = VideoClipDataset(entries, root, 8, VideoTransform(32), train=False, backend="frames")
    (tmp_path / "frames" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "frames" / "a" / "frame1.jpg")
    bad = VideoClipDataset(entries, tmp_path, 8, VideoTransform(32), train=False, backend="frames")
    with pytest.raises(VideoReadError, match="no frame image_00001.jpg"):
        bad[0]
    with pytest.raises(VideoReadError, match=r"missing: no frame folder .*b b"):
        bad[1]
    assert ds[0]["video"].shape == (8, 3, 32, 32)


def test_decoder_resizes_inside_decord(tmp_path):
    write_video(
        tmp_path / "videos" / "big.mp4", np.random.default_rng(0).integers(0, 255, (6, 96, 128, 3), np.uint8)
    )
    (tmp_path / "list.txt").write_text("big,6,0\n")
    entries = parse_list(tmp_path / "list.txt", "comma", 1)
    for short, size in [(24, (24, 32)), (None, (96, 128)), (120, (120, 160))]:
        ds = VideoClipDataset(entries, tmp_path, 4, VideoTransform(16), train=False, decode_short_side=short)
        assert ds.load_frames(0).shape == (4, 3, *size)


def test_three_crops_along_the_longer_side():
    """ThreeCrop for multi-view testing: after the eval resize (shorter side S*256/224), three S x S crops at
    the start, centre and end of the longer side; each crop's columns tell where it came from."""
    size = 32  # eval resize: shorter side 36
    columns = torch.arange(72, dtype=torch.uint8).view(1, 1, 1, 72).expand(2, 3, 36, 72).contiguous()
    crops = VideoTransform(size, train=False, crops=3)(columns)  # an already 36 px high clip: no resize
    assert crops.shape == (3, 2, 3, size, size)
    assert [int(c[0, 0, 0, 0]) for c in crops] == [0, (72 - size) // 2, 72 - size]
    portrait = VideoTransform(size, train=False, crops=3)(columns.transpose(-1, -2).contiguous())
    assert [int(c[0, 0, 0, 0]) for c in portrait] == [0, (72 - size) // 2, 72 - size]
    with pytest.raises(ValueError, match="crops=2"):
        VideoTransform(size, train=False, crops=2)
