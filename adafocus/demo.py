"""Run a trained AdaFocusV2 on one video, one frame at a time; options in ``conf/demo.yaml``.

``python -m adafocus.demo ckpt_path=FILE video=PATH [thresholds=FILE budget=p] [policy=...]``
(a published ``.pth.tar``: also ``dataset=NAME data_dir=DIR``, the class names come from its class index).

The video is decoded as evaluation decodes it (:func:`load_clip`); the step API (``AdaFocusV2.step``) reads
the T frames in processing order. After every step it prints the top-k classes with their probabilities;
with a thresholds file, the step at which AdaFocusV2+ stops at budget p and what that costs. In the run
directory: ``demo.mp4`` and ``demo.gif`` (the frames in processing order with the focus box and the running
prediction) and ``demo.json`` (every step's patch, confidence and top-k; the exit).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from adafocus.data import VideoTransform, read_class_index, sample_clip_indices
from adafocus.data.io import read_video
from adafocus.data.transforms import normalize_video
from adafocus.early_exit import confidences
from adafocus.fileio import atomic_write_text
from adafocus.tasks.checkpoint import load_module
from adafocus.tasks.common import user_errors
from adafocus.thresholds import BudgetThresholds, read_thresholds
from adafocus.visualize import captioned, denormalize, focus_gif_frames, save_gif, save_mp4

log = logging.getLogger(__name__)


def load_clip(path: Path, data: DictConfig) -> tuple[torch.Tensor, list[int]]:
    """One video as evaluation feeds it to the model: float ``[T, 3, S, S]`` normalised, in processing order
    (``data``: the run's ``data`` node: decoder, sampling, sizes), and the decoded frame index of each
    step."""
    indices: list[int] = []
    keyframe = data.get("sampling", "exact") == "keyframe"

    def pick(num_video_frames: int, keyframes=None) -> list[int]:
        chosen = sample_clip_indices(
            num_video_frames, int(data.num_frames), train=False, keyframes=keyframes if keyframe else None
        )
        indices.extend(chosen)
        return chosen

    clip = read_video(
        path, pick, data.decode_short_side, decoder=data.get("decoder", "decord")
    )  # (T, 3, H, W)
    clip = VideoTransform(int(data.input_size), train=False, augment=bool(data.augment))(
        clip
    )  # uint8 (T,3,S,S)
    return normalize_video(clip), indices


def class_names(data: DictConfig, num_classes: int) -> tuple[list[str], Path | None]:
    """Names from the dataset's class index (its count must be the model's), else "class k"."""
    path = Path(data.data_dir) / data.class_index
    if path.is_file():
        return read_class_index(path, num_classes), path
    return [f"class {k}" for k in range(num_classes)], None


def _budget(cfg: DictConfig, num_steps: int, num_classes: int) -> BudgetThresholds | None:
    if not cfg.thresholds:
        if cfg.budget is not None:
            raise ValueError(
                f"budget={cfg.budget} needs thresholds=FILE (early_exit.py writes thresholds.json)"
            )
        return None
    thresholds = read_thresholds(cfg.thresholds)
    thresholds.check_model(num_steps, num_classes, f"checkpoint {cfg.ckpt_path}")
    return thresholds.budget(None if cfg.budget is None else float(cfg.budget))


def _top(logits: torch.Tensor, names: list[str], k: int) -> list[dict]:
    probs, classes = logits.float().softmax(-1).topk(k)  # (k,), (k,)
    return [
        {"class": names[c], "index": c, "prob": p}
        for c, p in zip(classes.tolist(), probs.tolist(), strict=True)
    ]


def run_demo(cfg: DictConfig) -> dict:
    """The demo: prints every step, writes demo.mp4 / demo.gif / demo.json; returns what demo.json holds."""
    if not cfg.video:
        raise ValueError("video=PATH is required: the video file to run the model on")
    video = Path(cfg.video)
    if not video.is_file():
        raise FileNotFoundError(f"video={video}: no such file")
    if cfg.thresholds and not Path(cfg.thresholds).is_file():
        raise FileNotFoundError(f"thresholds={cfg.thresholds}: no such file (early_exit.py writes it)")
    module, run_cfg = load_module(cfg)
    model = module.model.eval()
    t_steps, num_classes = model.num_frames, model.num_classes
    names, index_file = class_names(run_cfg.data, num_classes)
    budget = _budget(cfg, t_steps, num_classes)
    clip, frame_indices = load_clip(video, run_cfg.data)  # (T, 3, S, S)
    gflops = module.gflops_per_video
    k = min(int(cfg.top_k), num_classes)
    where = f"names from {index_file}" if index_file else "no class index found"
    policy_name = "learned" if module.eval_policy is None else type(module.eval_policy).__name__
    print(
        f"AdaFocusV2 {cfg.ckpt_path} on {video}: {t_steps} steps, {num_classes} classes ({where}), "
        f"policy {policy_name}, {gflops:.4g} GFLOPs for all steps",
        flush=True,
    )

    state = model.init_state(1, module.eval_policy)  # policy=random|center: another than the trained one
    steps, stop = [], None
    for t in range(t_steps):
        out, state = model.step(clip[None, t], state)
        row, col = out.action[0, :2].tolist()
        top = _top(out.logits[0], names, k)
        steps.append(
            {
                "step": t + 1,
                "frame": frame_indices[t],
                "action": out.action[0].tolist(),
                "confidence": float(out.confidence[0]),
                "top": top,
            }
        )
        print(
            f"step {t + 1}/{t_steps}  frame {frame_indices[t]}  patch at (row {row:.2f}, col {col:.2f})  "
            f"confidence {float(out.confidence[0]):.3f}",
            flush=True,
        )
        for entry in top:
            print(f"  {100 * entry['prob']:6.2f}%  {entry['class']}", flush=True)
        if budget is not None and stop is None and bool(budget.exits(out.logits, t)[0]):
            stop = t
            value = float(confidences(out.logits.cpu()[:, None], budget.criterion)[0, 0])
            eta = float(budget.eta[t])
            print(
                f"  -> AdaFocusV2+ (p={budget.p:g}) stops here: {budget.criterion} confidence "
                f"{value:.3f} >= threshold {eta:.3f}; {(t + 1) * gflops / t_steps:.4g} GFLOPs",
                flush=True,
            )

    final = steps[-1]["top"][0]
    print(
        f"prediction after all {t_steps} steps: {final['class']} ({100 * final['prob']:.1f}%), "
        f"{gflops:.4g} GFLOPs"
    )
    exit_info = None
    if budget is None:
        print("no thresholds=FILE given: no early exit (early_exit.py writes thresholds.json)")
    else:
        top = steps[stop]["top"][0]
        exit_info = {
            "p": budget.p,
            "criterion": budget.criterion,
            "step": stop + 1,
            "class": top["class"],
            "prob": top["prob"],
            "gflops": (stop + 1) * gflops / t_steps,
        }
        print(
            f"AdaFocusV2+ (p={budget.p:g}, {budget.criterion}) stops after step {stop + 1} of {t_steps}: "
            f"{top['class']} ({100 * top['prob']:.1f}%), {exit_info['gflops']:.4g} GFLOPs"
        )

    out_dir = Path(cfg.output_dir)
    captions = []
    for t, step in enumerate(steps):
        lines = [
            f"step {t + 1}/{t_steps}  frame {step['frame']}",
            f"{step['top'][0]['class']} {100 * step['top'][0]['prob']:.0f}%",
        ]
        if stop is not None and t >= stop:
            lines.append(
                f"AdaFocusV2+ p={budget.p:g}: " + ("stops here" if t == stop else f"stopped at {stop + 1}")
            )
        captions.append(lines)
    actions = torch.tensor([step["action"] for step in steps])  # (T, 2)
    images = captioned(focus_gif_frames(denormalize(clip), actions, model.patch_size), captions)
    mp4 = save_mp4(images, out_dir / "demo.mp4", fps=int(cfg.fps))
    gif = save_gif(images, out_dir / "demo.gif", duration_ms=round(1000 / int(cfg.fps)))
    result = {
        "video": str(video),
        "checkpoint": str(cfg.ckpt_path),
        "policy": policy_name,
        "gflops_per_video": gflops,
        "steps": steps,
        "exit": exit_info,
    }
    atomic_write_text(out_dir / "demo.json", json.dumps(result, indent=2))
    print(f"annotated video: {mp4} and {gif}; every step: {out_dir / 'demo.json'}", flush=True)
    return result


@hydra.main(config_path="../conf", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_demo(cfg)


if __name__ == "__main__":
    main()
