"""Focus visualisations: PNG grid and animated GIF are valid images with the box where the action says."""

from __future__ import annotations

from pathlib import Path

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


# ---- the Lightning callback ----
class TinyFocusNet(torch.nn.Module):
    """A small real network with the AdaFocusV2 output contract: logits [B, T, C] and actions [B, T, 2]."""

    def __init__(self, num_classes=3, patch_size=P):
        super().__init__()
        self.patch_size = patch_size
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)
        self.policy = torch.nn.Linear(4, 2)
        self.head = torch.nn.Linear(4, num_classes)

    def forward(self, video):
        from types import SimpleNamespace

        b, t = video.shape[:2]
        feat = self.conv(video.flatten(0, 1)).mean(dim=(2, 3)).view(b, t, -1)  # (B, T, 4)
        return SimpleNamespace(
            logits=self.head(feat).cummax(dim=1).values, actions=torch.sigmoid(self.policy(feat))
        )


def _module_and_data(n=6):
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyFocusNet()

        def training_step(self, batch, batch_idx):
            out = self.model(batch["video"])
            return torch.nn.functional.cross_entropy(out.logits[:, -1], batch["label"])

        def validation_step(self, batch, batch_idx):
            out = self.model(batch["video"])
            self.log("val_loss", torch.nn.functional.cross_entropy(out.logits[:, -1], batch["label"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    items = [
        {
            "video": torch.randn(T, 3, H, W, generator=g),
            "label": torch.tensor(i % 3),
            "labels": torch.tensor([i % 3, -1]),
            "index": i,
        }
        for i in range(n)
    ]
    loader = torch.utils.data.DataLoader(items, batch_size=4)
    return Module(), loader


def _trainer(tmp_path, loggers, callback, epochs=2):
    import pytorch_lightning as pl

    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        default_root_dir=tmp_path,
    )


def test_callback_logs_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adafocus.visualize import FocusVisualizationCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    module, loader = _module_and_data()
    tb = TensorBoardLogger(tmp_path / "tb", name="run")
    wb = WandbLogger(project="adafocus-test", save_dir=str(tmp_path), offline=True)
    callback = FocusVisualizationCallback(every_n_epochs=2, num_videos=3)
    trainer = _trainer(tmp_path, [CSVLogger(tmp_path / "csv"), tb, wb], callback, epochs=2)
    trainer.fit(module, loader, loader)
    run_dir = Path(wb.experiment.dir)
    wb.experiment.finish()
    assert callback.last_logged_epoch == 1  # every 2 epochs: only after the second (epoch index 1)
    assert callback._batch["video"].shape == (3, T, 3, H, W)  # the fixed batch: first 3 validation videos

    acc = EventAccumulator(str(tb.log_dir), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["focus/video_0", "focus/video_1", "focus/video_2"]
    (event,) = acc.Images("focus/video_0")
    assert event.width > 4 * 100 and event.height > 100
    images = list((run_dir / "media" / "images" / "focus").glob("videos_*.png"))
    assert len(images) == 3
    with Image.open(images[0]) as img:
        assert img.size[0] > 4 * 100


def test_callback_without_image_loggers_does_nothing(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from adafocus.visualize import FocusVisualizationCallback

    module, loader = _module_and_data()
    callback = FocusVisualizationCallback(every_n_epochs=1, num_videos=2)
    _trainer(tmp_path, [CSVLogger(tmp_path / "csv")], callback, epochs=1).fit(module, loader, loader)
    assert callback.last_logged_epoch is None and callback._batch is None
    with pytest.raises(ValueError, match="every_n_epochs"):
        FocusVisualizationCallback(every_n_epochs=-1)
