"""The synthetic focus benchmark: what the glance can and cannot see, and how the dataset is written."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adafocus.data import VideoDataModule
from adafocus.data.synthetic import CLASS_NAMES, ensure_synthetic, render_video, texture

SMALL = dict(num_train=8, num_val=4, frames_per_video=5, size=64, radius=12, num_distractors=2, workers=1)


def _pooled(video: np.ndarray, factor: int) -> torch.Tensor:
    frames = torch.from_numpy(video).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return F.avg_pool2d(frames, factor)


def test_class_is_invisible_to_the_area_pooled_glance_but_not_to_the_focus():
    # Same seed -> same clutter and motion; only the class (grating orientation) differs.
    videos = [render_video(label, seed=11, size=96, radius=16) for label in range(len(CLASS_NAMES))]
    glance = [_pooled(v, 8) for v in videos]
    for g in glance[1:]:
        assert torch.equal(g, glance[0])  # exact 8x area pooling: identical for every class
    full = [torch.from_numpy(v.astype(np.int16)) for v in videos]
    for f in full[1:]:
        assert (f - full[0]).abs().max() > 50  # at full resolution the classes differ strongly
    # and a 2x pooling (a finer glance) would see the class: the design depends on the pooling factor
    assert (_pooled(videos[0], 2) - _pooled(videos[1], 2)).abs().max() > 20


def test_texture_has_zero_mean_per_cell_and_orientation():
    for label in range(len(CLASS_NAMES)):
        t = texture(label, 16, 90.0, 8)
        cells = t.reshape(2, 8, 2, 8).sum(axis=(1, 3))
        assert np.abs(cells).max() < 1e-3
    assert np.allclose(texture(0, 8, 1.0, 8)[:, 0], texture(0, 8, 1.0, 8)[:, 5])  # horizontal: rows constant
    assert np.allclose(texture(1, 8, 1.0, 8)[0], texture(1, 8, 1.0, 8)[5])  # vertical: columns constant
    with pytest.raises(ValueError, match="label"):
        texture(7, 8, 1.0, 8)


def test_object_moves_and_starts_in_different_places():
    starts = []
    for seed in range(20):
        _, centres = render_video(0, seed=seed, size=96, radius=16, return_centres=True)
        assert np.abs(np.diff(centres, axis=0)).max() <= 8 + 1e-6  # smooth: at most one grid step a frame
        assert len(np.unique(centres, axis=0)) > 2  # it moves
        starts.append(tuple(centres[0]))
    assert len(set(starts)) >= 12  # 9 x 9 possible grid positions for a 32 px disc in a 96 px frame


def test_generated_dataset_is_deterministic_atomic_and_regenerated_on_change(tmp_path):
    root = tmp_path / "synthetic"
    ensure_synthetic(root, **SMALL)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".mp4"]) == 12
    assert (root / "classInd.txt").read_text().split("\n")[0] == "0 horizontal"
    lines = (root / "train_split.txt").read_text().splitlines()
    assert len(lines) == 8 and lines[0].split(",")[1] == "5"
    assert sorted(int(line.split(",")[2]) for line in lines) == [0, 0, 1, 1, 2, 2, 3, 3]  # balanced
    mtime = (root / "params.json").stat().st_mtime_ns
    ensure_synthetic(root, **SMALL)  # same parameters: nothing is rewritten
    assert (root / "params.json").stat().st_mtime_ns == mtime

    other = tmp_path / "again"
    ensure_synthetic(other, **SMALL)  # same parameters elsewhere: the same videos
    assert (other / "train_split.txt").read_text() == (root / "train_split.txt").read_text()
    assert (other / "videos/val/v00001.mp4").read_bytes() == (root / "videos/val/v00001.mp4").read_bytes()

    ensure_synthetic(root, **{**SMALL, "num_val": 8})  # a parameter changed: regenerated in place
    assert len((root / "val_split.txt").read_text().splitlines()) == 8
    assert json.loads((root / "params.json").read_text())["num_val"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_interrupted_generation_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="size"):
        ensure_synthetic(tmp_path / "bad", **{**SMALL, "size": 60})  # not a multiple of the grid
    assert list(tmp_path.iterdir()) == []


def test_videos_decode_through_the_data_module_pixel_exact(tmp_path):
    root = ensure_synthetic(tmp_path / "synthetic", **SMALL)
    dm = VideoDataModule(
        root, "comma", "train_split.txt", "val_split.txt", "classInd.txt", num_classes=4, multilabel=False,
        num_frames=3, input_size=64, batch_size=4, workers=0, augment=False, decode_short_side=None,
    )  # fmt: skip
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)  # uint8 -> normalised float
    assert batch["video"].shape == (4, 3, 3, 64, 64)
    assert dm.class_names == list(CLASS_NAMES)
    # Undo the normalisation: H.264 at crf 12 keeps the frames within a few grey levels of the render.
    label = int(batch["label"][0])
    params = {k: SMALL[k] for k in ("size", "radius", "num_distractors")}
    rendered = render_video(label, _seed_of(root, 0), frames=SMALL["frames_per_video"], **params)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    decoded = (batch["video"][0] * std + mean) * 255  # (T, 3, H, W) in processing order [1, 0, 2]
    frames = [int(5 / 3 / 2 + 5 / 3 * t) for t in range(3)]  # eval: segment centres
    expected = torch.from_numpy(rendered[[frames[i] for i in (1, 0, 2)]]).permute(0, 3, 1, 2).float()
    assert (decoded - expected).abs().mean() < 4


def _seed_of(root, index):
    from adafocus.data.synthetic import _video_seed

    params = json.loads((root / "params.json").read_text())
    return _video_seed(params["seed"], 1, index)
