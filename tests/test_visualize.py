"""Focus visualisations: PNG grid and animated GIF are valid images with the box where the action says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adafocus.visualize import (
    denormalize,
    focus_title,
    patch_boxes,
    save_focus_examples,
    save_focus_figure,
    save_focus_gif,
)

T, H, W, P = 4, 64, 64, 16
ACTIONS = torch.tensor([[0.0, 0.0], [0.5, 0.25], [1.0, 1.0], [0.25, 0.75]])  # (a_row, a_col)


def frames_gray():
    return np.full((T, H, W, 3), 128, dtype=np.uint8)


def test_patch_boxes_follow_spec():
    # top-left = (a_row (H-P), a_col (W-P)), as (x1, y1, x2, y2)
    boxes = patch_boxes(ACTIONS, P, H, W)
    assert boxes.tolist() == [[0, 0, 16, 16], [12, 24, 28, 40], [48, 48, 64, 64], [36, 12, 52, 28]]


def test_figure_png(tmp_path):
    title = focus_title("class_2", "class_2", 0.873)
    assert title == "true: class_2 | predicted: class_2 (87.3%)"
    path = save_focus_figure(frames_gray(), ACTIONS, P, title, tmp_path / "fig" / "focus.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert w >= 4 * 150 and h >= 150  # one row of 4 frames
        rgb = np.asarray(img.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)
    assert red.sum() > 100  # the boxes are drawn
    assert [p.name for p in path.parent.iterdir()] == ["focus.png"]  # atomic: no temp files left


def test_gif_frames_and_box_position(tmp_path):
    path = save_focus_gif(frames_gray(), ACTIONS, P, tmp_path / "focus.gif")
    scale = 4  # frames are upscaled (nearest) so that the long side reaches 224 px: 64 * 4 = 256
    with Image.open(path) as img:
        assert img.format == "GIF" and img.n_frames == T and img.size == (W * scale, H * scale)
        assert img.info.get("loop") == 0
        boxes = patch_boxes(ACTIONS, P, H, W) * scale
        for i in range(T):
            img.seek(i)
            rgb = np.asarray(img.convert("RGB")).astype(int)
            x1, y1, x2, y2 = (int(v) for v in boxes[i])
            mid_y = (y1 + y2) // 2
            assert rgb[mid_y, x1, 0] > 200 and rgb[mid_y, x1, 1] < 100, f"left edge of box {i}"
            assert rgb[mid_y, x2 - 1, 0] > 200, f"right edge of box {i}"
            inside = rgb[mid_y, (x1 + x2) // 2]
            assert abs(inside[0] - 128) < 10 and abs(inside[1] - 128) < 10  # the patch content is untouched


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"actions must be \[T, 2\]"):
        save_focus_gif(frames_gray(), ACTIONS[:2], P, "x.gif")
    with pytest.raises(ValueError, match="frames must be uint8"):
        save_focus_figure(frames_gray().astype(np.float32), ACTIONS, P, "", "x.png")
    with pytest.raises(ValueError, match="patch_size 100"):
        save_focus_figure(frames_gray(), ACTIONS, 100, "", "x.png")


def test_denormalize_and_examples(tmp_path):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
    pixels = torch.rand(2, T, 3, H, W)
    videos = (pixels - mean) / std  # (B, T, 3, H, W) as the data pipeline normalises
    frames = denormalize(videos[0])
    assert frames.dtype == np.uint8 and frames.shape == (T, H, W, 3)
    assert np.abs(frames.astype(float) / 255 - pixels[0].permute(0, 2, 3, 1).numpy()).max() < 1 / 255 + 1e-6
    logits = torch.zeros(2, T, 3)
    logits[0, -1, 2] = 5.0
    out = save_focus_examples(
        videos, ACTIONS.expand(2, T, 2), logits, torch.tensor([[2, -1], [0, 1]]), P, tmp_path, ["a", "b", "c"]
    )
    assert [(p.name, g.name) for p, g in out] == [
        ("focus_0000.png", "focus_0000.gif"),
        ("focus_0001.png", "focus_0001.gif"),
    ]
    for png, gif in out:
        with Image.open(png) as img:
            assert img.format == "PNG"
        with Image.open(gif) as img:
            assert img.n_frames == T
