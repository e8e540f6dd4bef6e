"""Parameters, GFLOPs and speed of AdaFocusV2 per part.

``python -m adafocus.profile backbone=mbv2 patch=128 [format=json] [batch_size=128 device=cuda]``.

GFLOPs are multiply-accumulates per video counted by ``torch.utils.flop_counter`` over the real eval
forward (SPEC §4). Speed: CPU latency per video at batch 1 (median of ``repeats`` timed runs after
``warmup``), or, with ``batch_size=N device=cuda``, throughput in videos/s as the original authors measured.
"""

from __future__ import annotations

import json
import statistics
import time

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from adafocus.models import AdaFocusV2

PARTS = {  # part -> sub-modules (the policy row includes the patch extractor)
    "glance": ("glance", "glance_head"),
    "policy": ("policy", "patch_extractor"),
    "focus": ("focus", "local_head"),
    "classifier": ("classifier",),
}


def build_model(cfg: DictConfig) -> AdaFocusV2:
    backbone = cfg.backbone
    return AdaFocusV2(
        num_classes=int(cfg.num_classes),
        glance_arch=backbone.glance_arch,
        focus_arch=backbone.focus_arch,
        patch_size=int(cfg.patch),
        num_frames=int(cfg.num_frames),
        input_size=int(cfg.input_size),
        stn_hidden_dim=int(backbone.stn_hidden_dim),
        classifier_dim=int(backbone.get("classifier_dim", 4096)),
        glance_size=backbone.get("glance_size"),
        pretrained=False,
    )


@torch.no_grad()
def measure_speed(model: AdaFocusV2, batch_size: int, device: str, repeats: int, warmup: int) -> list[float]:
    """Seconds per forward of a ``batch_size`` batch, ``repeats`` times after ``warmup`` untimed runs."""
    model = model.to(device).eval()
    video = torch.randn(batch_size, model.num_frames, 3, model.input_size, model.input_size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        model(video)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(video)
        sync()
        times.append(time.perf_counter() - start)
    return times


def check_config(cfg: DictConfig) -> None:
    """Clear errors for the knobs, before building anything."""
    if cfg.format not in ("table", "json"):
        raise ValueError(f"format must be 'table' or 'json', got {cfg.format!r}")
    device = str(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but no CUDA device is available here; use device=cpu")
    if not device.startswith(("cpu", "cuda")):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    for key in ("batch_size", "repeats"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if int(cfg.warmup) < 0:
        raise ValueError(f"warmup must be >= 0, got {cfg.warmup}")


def profile(cfg: DictConfig) -> dict:
    """The profile as a dict: per-part params (M) and GFLOPs, totals, and latency or throughput."""
    check_config(cfg)
    if str(cfg.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input shape: pick the fastest kernels, as for training
    model = build_model(cfg).to(str(cfg.device))
    flops = model.flop_counts()
    parts = {
        part: {
            "params_m": sum(p.numel() for name in names for p in getattr(model, name).parameters()) / 1e6,
            "gflops": flops[part],
        }
        for part, names in PARTS.items()
    }
    times = measure_speed(model, int(cfg.batch_size), str(cfg.device), int(cfg.repeats), int(cfg.warmup))
    median = statistics.median(times)
    out = {
        "glance": cfg.backbone.glance_arch,
        "focus": cfg.backbone.focus_arch,
        "patch": int(cfg.patch),
        "num_frames": int(cfg.num_frames),
        "input_size": int(cfg.input_size),
        "parts": parts,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": flops["total"],
        "device": str(cfg.device),
        "threads": torch.get_num_threads(),
        "batch_size": int(cfg.batch_size),
        "latency_ms_per_video": 1000 * median / int(cfg.batch_size),
        "videos_per_s": int(cfg.batch_size) / median,
    }
    return out


def print_table(result: dict, console: Console | None = None) -> None:
    console = console or Console()
    title = (
        f"AdaFocusV2 {result['glance']} glance + {result['focus']} focus, P={result['patch']}, "
        f"T={result['num_frames']}, {result['input_size']} px"
    )
    console.print(title)
    table = Table()
    for column in ("part", "params (M)", "GFLOPs / video"):
        table.add_column(column, justify="right" if column != "part" else "left")
    for part, row in result["parts"].items():
        table.add_row(part, f"{row['params_m']:.2f}", f"{row['gflops']:.3f}")
    table.add_row("total", f"{result['params_m']:.2f}", f"{result['gflops']:.2f}", style="bold")
    console.print(table)
    if result["batch_size"] == 1:
        where = result["device"] + (f", {result['threads']} threads" if result["device"] == "cpu" else "")
        console.print(f"latency ({where}, batch 1, median): {result['latency_ms_per_video']:.1f} ms / video")
    else:
        console.print(
            f"throughput ({result['device']}, batch {result['batch_size']}): "
            f"{result['videos_per_s']:.1f} videos/s"
        )


@hydra.main(config_path="../conf", config_name="profile", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = profile(cfg)
    if cfg.format == "json":
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
