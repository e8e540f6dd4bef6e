"""Parameters, GFLOPs and speed of AdaFocusV2 per part, per inference runtime.

``python -m adafocus.profile backbone=mbv2 patch=128 [runtime=[eager,onnxruntime]] [threads=2]
[format=json] [batch_size=128 device=cuda]``.

GFLOPs are multiply-accumulates per video counted by ``torch.utils.flop_counter`` over the real eval
forward (SPEC §4). Speed: CPU latency per video at batch 1 (median of ``repeats`` timed runs after
``warmup``), or, with ``batch_size=N device=cuda``, throughput in videos/s as the original authors measured;
for each runtime of :mod:`adafocus.runtime` (CPU; default: all available here), with the median time of
each part (``other``: the glue between them) and the largest difference of its outputs from eager's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from adafocus.models import AdaFocusV2
from adafocus.models.adafocus import AdaFocusOutput
from adafocus.runtime import RUNTIMES, available_runtimes, optimize
from adafocus.tasks.common import set_threads

PARTS = {  # part -> sub-modules (the policy row includes the patch extractor)
    "glance": ("glance", "glance_head"),
    "policy": ("policy", "patch_extractor"),
    "focus": ("focus", "local_head"),
    "classifier": ("classifier",),
}
RELATIVE_TOLERANCE = 1e-3  # a runtime's outputs vs eager's, relative to their magnitude (float32 rounding)


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


class PartTimer:
    """Times ``model``'s forwards, in total and per part of :data:`PARTS` (forward hooks around the part's
    modules, whatever runtime they are in); ``close()`` removes the hooks."""

    def __init__(self, model: AdaFocusV2, sync: Callable[[], None]):
        self.model, self.sync = model, sync
        self.spent: dict[str, float] = {}
        started: dict[str, float] = {}

        def pre(name):
            def hook(_module, _args):
                sync()
                started[name] = time.perf_counter()

            return hook

        def post(part, name):
            def hook(_module, _args, _out):
                sync()
                self.spent[part] = self.spent.get(part, 0.0) + time.perf_counter() - started[name]

            return hook

        self.hooks = [
            handle
            for part, names in PARTS.items()
            for name in names
            for handle in (
                getattr(model, name).register_forward_pre_hook(pre(name)),
                getattr(model, name).register_forward_hook(post(part, name)),
            )
        ]

    @torch.no_grad()
    def __call__(self, video: torch.Tensor) -> tuple[float, dict[str, float]]:
        """Seconds of one forward of ``video`` and of each part in it."""
        self.spent.clear()
        self.sync()
        start = time.perf_counter()
        self.model(video)
        self.sync()
        return time.perf_counter() - start, {part: self.spent.get(part, 0.0) for part in PARTS}

    def close(self) -> None:
        for handle in self.hooks:
            handle.remove()


def measure_speed(
    models: dict[str, AdaFocusV2], video: torch.Tensor, repeats: int, warmup: int
) -> dict[str, tuple[list[float], list[dict[str, float]]]]:
    """Per model: seconds per forward of ``video`` and per part, ``repeats`` times after ``warmup`` untimed
    runs. The models take turns (one forward each per round), so a change in the machine's load during the
    run falls on all of them alike."""
    sync = torch.cuda.synchronize if video.is_cuda else (lambda: None)
    timers = {name: PartTimer(model, sync) for name, model in models.items()}
    try:
        for _ in range(warmup):
            for timer in timers.values():
                timer(video)
        runs = {name: ([], []) for name in models}
        for _ in range(repeats):
            for name, timer in timers.items():
                total, parts = timer(video)
                runs[name][0].append(total)
                runs[name][1].append(parts)
    finally:
        for timer in timers.values():
            timer.close()
    return runs


def max_differences(got: AdaFocusOutput, expected: AdaFocusOutput) -> dict[str, float]:
    """Largest absolute difference per output, and the largest relative to the output's magnitude."""
    names = ("logits", "global_logits", "local_logits", "actions")
    pairs = [(getattr(got, n).float().cpu(), getattr(expected, n).float().cpu()) for n in names]
    absolute = max(float((g - e).abs().max()) for g, e in pairs)
    relative = max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-12)) for g, e in pairs)
    return {"max_abs_diff": absolute, "max_rel_diff": relative}


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
    runtimes(cfg)


def runtimes(cfg: DictConfig) -> list[str]:
    """``cfg.runtime`` as a list: one name, a list, or null (every runtime available here; eager on CUDA)."""
    on_cpu = str(cfg.device) == "cpu"
    if cfg.runtime is None:
        return available_runtimes() if on_cpu else ["eager"]
    names = [cfg.runtime] if isinstance(cfg.runtime, str) else list(cfg.runtime)
    for name in names:
        if name not in RUNTIMES:
            raise ValueError(f"runtime: unknown {name!r}; known: {', '.join(RUNTIMES)}")
        if name not in available_runtimes():
            raise ValueError(f"runtime: {name} is not available here (see adafocus.runtime)")
        if name != "eager" and not on_cpu:
            raise ValueError(f"runtime: {name} runs on the CPU only; use device=cpu (or runtime=eager)")
    if len(set(names)) != len(names):
        raise ValueError(f"runtime: {names} names a runtime twice")
    return names


def profile(cfg: DictConfig) -> dict:
    """The profile as a dict: per-part params (M) and GFLOPs, totals, and per runtime the latency or
    throughput, the per-part times (ms per video) and the outputs' difference from eager."""
    check_config(cfg)
    set_threads(cfg.threads)
    if str(cfg.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input shape: pick the fastest kernels, as for training
    device, batch_size = str(cfg.device), int(cfg.batch_size)
    model = build_model(cfg).to(device).eval()
    flops = model.flop_counts()
    parts = {
        part: {
            "params_m": sum(p.numel() for name in names for p in getattr(model, name).parameters()) / 1e6,
            "gflops": flops[part],
        }
        for part, names in PARTS.items()
    }
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, model.num_frames, 3, model.input_size, model.input_size)
    video = torch.randn(shape, generator=generator).to(device)
    with torch.no_grad():
        expected = model(video)
    models, setup = {}, {}
    for name in runtimes(cfg):
        start = time.perf_counter()
        models[name] = model if name == "eager" else optimize(model, name)
        setup[name] = time.perf_counter() - start
    runs = measure_speed(models, video, int(cfg.repeats), int(cfg.warmup))
    speed = {}
    for name, (times, part_times) in runs.items():
        median = statistics.median(times)
        per_part = {part: statistics.median(p[part] for p in part_times) for part in PARTS}
        per_part["other"] = median - sum(per_part.values())
        with torch.no_grad():
            diffs = max_differences(models[name](video), expected)
        if diffs["max_rel_diff"] > RELATIVE_TOLERANCE:
            raise RuntimeError(
                f"runtime={name}: outputs differ from eager's by {diffs['max_rel_diff']:.2e} of their "
                f"magnitude (> {RELATIVE_TOLERANCE}): it is not the same model"
            )
        speed[name] = {
            "latency_ms_per_video": 1000 * median / batch_size,
            "videos_per_s": batch_size / median,
            "parts_ms_per_video": {part: 1000 * t / batch_size for part, t in per_part.items()},
            "setup_s": setup[name],
            **diffs,
        }
    return {
        "glance": cfg.backbone.glance_arch,
        "focus": cfg.backbone.focus_arch,
        "patch": int(cfg.patch),
        "num_frames": int(cfg.num_frames),
        "input_size": int(cfg.input_size),
        "parts": parts,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": flops["total"],
        "device": device,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "runtimes": speed,
    }


def print_table(result: dict, console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 120)  # files, pipes: no squashing
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
    where = result["device"] + (f", {result['threads']} threads" if result["device"] == "cpu" else "")
    speed = result["runtimes"]
    if result["batch_size"] == 1:
        title = f"latency ({where}, batch 1, median), ms / video"
    else:
        title = f"throughput ({where}, batch {result['batch_size']}): videos/s; times in ms / video"
    table = Table(title=title)
    key = "latency_ms_per_video" if result["batch_size"] == 1 else "videos_per_s"
    columns = ["runtime", "ms" if key == "latency_ms_per_video" else "videos/s"]
    columns += ["x eager"] if "eager" in speed else []
    columns += [*PARTS, "other", "max|diff|", "setup s"]
    for column in columns:
        table.add_column(column, justify="left" if column == "runtime" else "right")
    for name, row in speed.items():
        cells = [name, f"{row[key]:.1f}"]
        if "eager" in speed:
            cells.append(f"{row['latency_ms_per_video'] / speed['eager']['latency_ms_per_video']:.2f}")
        cells += [f"{row['parts_ms_per_video'][part]:.1f}" for part in (*PARTS, "other")]
        cells += [f"{row['max_abs_diff']:.1e}", f"{row['setup_s']:.1f}"]
        table.add_row(*cells)
    console.print(table)


@hydra.main(config_path="../conf", config_name="profile", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = profile(cfg)
    if cfg.format == "json":
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
