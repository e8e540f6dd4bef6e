"""Where the model looks: the policy's patch drawn on every frame.

- ``save_focus_figure``: PNG grid of the T frames in processing order, the P×P patch drawn as a box whose
  top-left corner is ``(a_row·(H−P), a_col·(W−P))`` (SPEC §1.4), with a title (true / predicted class,
  confidence).
- ``save_focus_gif``: animated GIF of the frames with the moving box (PIL's GIF writer).
- ``save_focus_examples``: both files for the first K videos of a batch (``evaluate.py visualize=K``).
- ``captioned``, ``save_gif``, ``save_mp4``: caption strips under frames; GIF and H.264 MP4 writers (demo).
- ``FocusVisualizationCallback``: logs the figure for a fixed validation batch every N epochs to the W&B and
  TensorBoard loggers of the trainer (nothing when neither is present).

Frames are uint8 ``[T, H, W, 3]``; ``denormalize`` turns the model's normalised ``[T, 3, H, W]`` input back.
All files are written atomically (temp name + os.replace); figures use matplotlib's Agg canvas directly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from adafocus.fileio import atomic_path

BOX_COLOR = (255, 40, 40)


def _imagenet_stats() -> tuple[Sequence[float], Sequence[float]]:
    try:
        from adafocus.data import IMAGENET_MEAN, IMAGENET_STD

        return IMAGENET_MEAN, IMAGENET_STD
    except ImportError:  # data package without the constants: the SPEC's values
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def denormalize(video: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """Normalised video float [T, 3, H, W] -> uint8 numpy [T, H, W, 3] (ImageNet mean/std by default)."""
    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"denormalize: expected a video [T, 3, H, W], got shape {list(video.shape)}")
    if mean is None or std is None:
        mean, std = _imagenet_stats()
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    frames = (video.detach().float().cpu() * std_t + mean_t).clamp(0, 1)  # (T, 3, H, W) in [0, 1]
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # (T, H, W, 3)


def _check(frames: Any, actions: Any, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    frames = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    actions = (
        actions.detach().float().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
    )
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    t, h, w, _ = frames.shape
    if actions.shape != (t, 2):
        raise ValueError(
            f"actions must be [T, 2] = [{t}, 2] (a_row, a_col per step), got {list(actions.shape)}"
        )
    if not 0 < patch_size <= min(h, w):
        raise ValueError(f"patch_size {patch_size} must be in (0, {min(h, w)}] for {h}x{w} frames")
    return frames, actions.astype(np.float64)


def patch_boxes(actions: Any, patch_size: int, height: int, width: int) -> np.ndarray:
    """Patch corners per frame: actions [T, 2] (a_row, a_col) -> float [T, 4] (x1, y1, x2, y2) in pixels."""
    a = actions.detach().float().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
    y1 = np.clip(a[:, 0], 0, 1) * (height - patch_size)
    x1 = np.clip(a[:, 1], 0, 1) * (width - patch_size)
    return np.stack([x1, y1, x1 + patch_size, y1 + patch_size], axis=1)


def _class_name(class_names: Sequence[str] | None, k: int) -> str:
    return class_names[k] if class_names is not None and 0 <= k < len(class_names) else str(k)


def focus_title(true_class: str | None, pred_class: str, confidence: float) -> str:
    """ "true: X | predicted: Y (87.3%)"."""
    head = f"true: {true_class} | " if true_class is not None else ""
    return f"{head}predicted: {pred_class} ({100 * confidence:.1f}%)"


def focus_figure(frames: Any, actions: Any, patch_size: int, title: str = "", max_cols: int = 8):
    """matplotlib Figure (Agg canvas): the T frames in processing order, the patch box on each, a title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    frames, actions = _check(frames, actions, patch_size)
    t, h, w, _ = frames.shape
    cols = min(t, max_cols)
    rows = math.ceil(t / cols)
    fig = Figure(figsize=(2.0 * cols, 2.0 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    boxes = patch_boxes(actions, patch_size, h, w)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= t:
            continue
        ax.imshow(frames[i], interpolation="nearest")
        x1, y1 = boxes[i, 0], boxes[i, 1]
        ax.add_patch(
            Rectangle(
                (x1 - 0.5, y1 - 0.5),
                patch_size,
                patch_size,
                fill=False,
                lw=2,
                edgecolor=np.array(BOX_COLOR) / 255,
            )
        )
        ax.set_title(f"step {i + 1}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _atomic(path: str | os.PathLike, write) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def save_focus_figure(
    frames: Any, actions: Any, patch_size: int, title: str, png_path: str | os.PathLike
) -> Path:
    """PNG of the T frames (uint8 [T, H, W, 3]) with the patch at ``actions`` [T, 2]; returns the path."""
    fig = focus_figure(frames, actions, patch_size, title)
    return _atomic(png_path, lambda tmp: fig.savefig(tmp, format="png"))


def focus_gif_frames(frames: Any, actions: Any, patch_size: int, scale: int | None = None) -> list:
    """PIL images of the frames with the box drawn (nearest-upscaled so small frames stay visible)."""
    from PIL import Image, ImageDraw

    frames, actions = _check(frames, actions, patch_size)
    t, h, w, _ = frames.shape
    scale = scale or max(1, math.ceil(224 / max(h, w)))
    boxes = patch_boxes(actions, patch_size, h, w) * scale
    width = max(2, round(max(h, w) * scale / 112))
    images = []
    for i in range(t):
        img = Image.fromarray(frames[i]).resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(img)
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=BOX_COLOR, width=width)
        draw.text((4, 2), f"{i + 1}/{t}", fill=(255, 255, 0))
        images.append(img)
    return images


def save_focus_gif(
    frames: Any, actions: Any, patch_size: int, gif_path: str | os.PathLike, duration_ms: int = 400
) -> Path:
    """Animated GIF (one frame per step, looping) of the frames with the moving patch box."""
    return save_gif(focus_gif_frames(frames, actions, patch_size), gif_path, duration_ms)


def captioned(images: list, captions: Sequence[Sequence[str]], font_size: int = 13) -> list:
    """The images with a black strip below each holding its caption lines (PIL images, same count)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    line = font_size + 4
    height = 4 + line * max(len(c) for c in captions)
    out = []
    for img, lines in zip(images, captions, strict=True):
        canvas = Image.new("RGB", (img.width, img.height + height + height % 2), (0, 0, 0))  # even: yuv420p
        canvas.paste(img, (0, 0))
        draw = ImageDraw.Draw(canvas)
        for i, text in enumerate(lines):
            draw.text((4, img.height + 3 + i * line), text, fill=(255, 255, 255), font=font)
        out.append(canvas)
    return out


def save_gif(images: list, gif_path: str | os.PathLike, duration_ms: int = 400) -> Path:
    """Animated looping GIF of PIL images (PIL's GIF writer), written atomically."""

    def write(tmp: str) -> None:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=duration_ms,
            loop=0,
            disposal=1,
        )

    return _atomic(gif_path, write)


def save_mp4(images: list, mp4_path: str | os.PathLike, fps: int = 2) -> Path:
    """H.264 MP4 (PyAV, yuv420p) of PIL images of one size (cropped to even sides), written atomically."""
    import av

    width, height = images[0].width // 2 * 2, images[0].height // 2 * 2

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for img in images:
                rgb = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:height, :width])  # (H, W, 3)
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    return _atomic(mp4_path, write)


def save_focus_examples(
    videos: torch.Tensor,
    actions: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    patch_size: int,
    out_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    num_videos: int | None = None,
    prefix: str = "focus",
    start_index: int = 0,
) -> list[tuple[Path, Path]]:
    """PNG + GIF for the first ``num_videos`` videos of a batch.

    videos: normalised float [B, T, 3, H, W]; actions [B, T, 2]; logits [B, T, C] (the last step predicts) or
    [B, C]; labels long [B] or [B, L] (-1 padded, first label shown) or None. Files are
    ``{out_dir}/{prefix}_{start_index + i:04d}.png|.gif``. Returns [(png, gif), ...].
    """
    b = videos.shape[0] if num_videos is None else min(num_videos, videos.shape[0])
    final = logits[:, -1] if logits.dim() == 3 else logits  # (B, C)
    probs = torch.softmax(final.detach().float().cpu(), dim=-1)
    conf, pred = probs.max(dim=-1)
    out = []
    for i in range(b):
        frames = denormalize(videos[i])
        true = None
        if labels is not None:
            lab = labels[i]
            lab = int(lab.flatten()[0]) if isinstance(lab, torch.Tensor) else int(lab)
            true = _class_name(class_names, lab)
        title = focus_title(true, _class_name(class_names, int(pred[i])), float(conf[i]))
        stem = Path(out_dir) / f"{prefix}_{start_index + i:04d}"
        png = save_focus_figure(frames, actions[i], patch_size, title, stem.with_suffix(".png"))
        gif = save_focus_gif(frames, actions[i], patch_size, stem.with_suffix(".gif"))
        out.append((png, gif))
    return out


def _figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3) uint8


class FocusVisualizationCallback(Callback):
    """Every ``every_n_epochs`` validation epochs (0: never), draw where the policy looks on a fixed
    validation batch.

    The batch is the first ``num_videos`` videos of the first validation batch (kept on CPU the first time it
    is seen). The figure of each video goes to every WandbLogger (``log_image``, key ``focus/videos``) and
    TensorBoardLogger (``add_figure``, tag ``focus/video_i``) of the trainer; with neither, nothing is done.
    Runs on global rank 0 only; skipped during the sanity check. The module's network is ``pl_module.model``
    (an AdaFocusV2) or ``pl_module`` itself.
    """

    def __init__(self, every_n_epochs: int = 1, num_videos: int = 4) -> None:
        super().__init__()
        if every_n_epochs < 0 or num_videos < 1:
            raise ValueError(
                f"FocusVisualizationCallback: every_n_epochs={every_n_epochs} must be >= 0 (0: off) and "
                f"num_videos={num_videos} >= 1"
            )
        self.every_n_epochs = int(every_n_epochs)
        self.num_videos = int(num_videos)
        self._batch: dict | None = None
        self.last_logged_epoch: int | None = None

    @staticmethod
    def _targets(trainer) -> list:
        return [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self.every_n_epochs == 0 or self._batch is not None or trainer.sanity_checking or batch_idx != 0:
            return
        if dataloader_idx != 0:
            return
        if not trainer.is_global_zero or not self._targets(trainer):
            return
        k = self.num_videos
        labels = batch.get("labels", batch.get("label"))
        self._batch = {
            "video": batch["video"][:k].detach().cpu().clone(),
            "labels": None if labels is None else labels[:k].detach().cpu().clone(),
        }

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._batch is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        targets = self._targets(trainer)
        if not targets:
            return
        net = getattr(pl_module, "model", pl_module)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            out = net(self._batch["video"].to(pl_module.device))
        net.train(was_training)
        datamodule = getattr(trainer, "datamodule", None)
        class_names = getattr(datamodule, "class_names", None)
        videos = self._batch["video"]
        final = out.logits[:, -1].float().cpu()
        probs = torch.softmax(final, dim=-1)
        conf, pred = probs.max(dim=-1)
        extractor = getattr(net, "patch_extractor", None)
        patch = int(getattr(net, "patch_size", getattr(extractor, "patch_size", 0)))
        if patch <= 0:
            raise AttributeError("FocusVisualizationCallback: cannot find the model's patch_size")
        figures, captions = [], []
        labels = self._batch["labels"]
        for i in range(videos.shape[0]):
            true = None if labels is None else _class_name(class_names, int(labels[i].flatten()[0]))
            title = focus_title(true, _class_name(class_names, int(pred[i])), float(conf[i]))
            figures.append(focus_figure(denormalize(videos[i]), out.actions[i].cpu(), patch, title))
            captions.append(f"epoch {trainer.current_epoch}: {title}")
        for lg in targets:
            if isinstance(lg, WandbLogger):
                lg.log_image(
                    key="focus/videos",
                    images=[_figure_to_array(f) for f in figures],
                    caption=captions,
                    step=trainer.global_step,
                )
            elif isinstance(lg, TensorBoardLogger):
                for i, fig in enumerate(figures):
                    lg.experiment.add_figure(
                        f"focus/video_{i}", fig, global_step=trainer.global_step, close=False
                    )
        self.last_logged_epoch = trainer.current_epoch
