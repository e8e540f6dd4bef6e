"""`python -m adafocus.profile`: per-part params and GFLOPs, totals, latency, throughput (issue 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console

from adafocus.models import AdaFocusV2
from adafocus.profile import PARTS, print_table, profile

ROOT = Path(__file__).resolve().parents[1]
CPU = OmegaConf.load(ROOT / "conf" / "backbone" / "cpu.yaml")  # the profiled backbone=cpu
TINY = ["backbone=cpu", "patch=32", "input_size=64", "num_frames=4", "num_classes=5", "repeats=2", "warmup=1"]


def cpu_model() -> AdaFocusV2:
    """The model the profile builds for TINY, from conf/backbone/cpu.yaml (not from the profile's code)."""
    return AdaFocusV2(
        num_classes=5, glance_arch=CPU.glance_arch, focus_arch=CPU.focus_arch, patch_size=32,
        num_frames=4, input_size=64, stn_hidden_dim=CPU.stn_hidden_dim,
        classifier_dim=CPU.classifier_dim, glance_size=CPU.glance_size, pretrained=False,
    )  # fmt: skip


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("profile", overrides=[*TINY, *overrides])


def test_cli_json_matches_the_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adafocus.profile", *TINY, "format=json", "runtime=[eager,channels_last]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)  # the whole of stdout is the one JSON object
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file left behind

    model = cpu_model()
    flops = model.flop_counts()
    assert list(out["parts"]) == ["glance", "policy", "focus", "classifier"]
    for part, modules in PARTS.items():
        params = sum(p.numel() for m in modules for p in getattr(model, m).parameters())
        assert out["parts"][part]["params_m"] == pytest.approx(params / 1e6, abs=1e-9), part
        assert out["parts"][part]["gflops"] == pytest.approx(flops[part], rel=1e-9), part
    assert out["gflops"] == pytest.approx(model.gflops(), rel=1e-9)
    assert out["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-9)
    assert sum(p["params_m"] for p in out["parts"].values()) == pytest.approx(out["params_m"])
    assert sum(p["gflops"] for p in out["parts"].values()) == pytest.approx(out["gflops"], rel=1e-9)
    assert (out["glance"], out["focus"], out["patch"], out["num_frames"], out["input_size"]) == (
        CPU.glance_arch, CPU.focus_arch, 32, 4, 64,
    )  # fmt: skip
    assert (out["device"], out["batch_size"]) == ("cpu", 1)
    assert list(out["runtimes"]) == ["eager", "channels_last"]  # (every runtime: test_runtime.py)
    for name, row in out["runtimes"].items():
        assert row["latency_ms_per_video"] > 0, name
        assert row["videos_per_s"] == pytest.approx(1000 / row["latency_ms_per_video"])
        assert list(row["parts_ms_per_video"]) == ["glance", "policy", "focus", "classifier", "other"]
        assert all(t > 0 for part, t in row["parts_ms_per_video"].items() if part != "other"), name
        assert sum(row["parts_ms_per_video"].values()) == pytest.approx(row["latency_ms_per_video"])
        assert row["max_rel_diff"] <= 1e-3, name  # the same model: eager's outputs to float tolerance
    assert out["runtimes"]["eager"]["max_abs_diff"] == 0


def test_table_and_throughput_in_process():
    threads = torch.get_num_threads()
    try:
        result = profile(config("batch_size=2", "runtime=[channels_last,eager]", "threads=1"))
    finally:
        torch.set_num_threads(threads)
    assert result["batch_size"] == 2 and result["threads"] == 1
    assert list(result["runtimes"]) == ["channels_last", "eager"]  # the order asked for
    for row in result["runtimes"].values():
        assert row["videos_per_s"] == pytest.approx(1000 / row["latency_ms_per_video"])
    console = Console(record=True, width=140)
    print_table(result, console)
    text = console.export_text()
    assert f"{CPU.glance_arch} glance + {CPU.focus_arch} focus, P=32, T=4, 64 px" in text
    for part in ("glance", "policy", "focus", "classifier", "total", "other", "x eager"):
        assert part in text
    assert f"{result['gflops']:.2f}" in text and f"{result['params_m']:.2f}" in text
    assert "throughput (cpu, 1 threads, batch 2)" in text and "videos/s" in text
    row = result["runtimes"]["channels_last"]
    ratio = row["latency_ms_per_video"] / result["runtimes"]["eager"]["latency_ms_per_video"]
    line = next(line for line in text.splitlines() if line.startswith("│ channels_last "))
    cells = [cell.strip() for cell in line.strip("│").split("│")]
    parts = [f"{row['parts_ms_per_video'][p]:.1f}" for p in (*PARTS, "other")]
    assert cells == ["channels_last", f"{row['videos_per_s']:.1f}", f"{ratio:.2f}", *parts,
                     f"{row['max_abs_diff']:.1e}", f"{row['setup_s']:.1f}"]  # fmt: skip
    result["batch_size"] = 1
    console = Console(record=True, width=140)
    print_table(result, console)
    assert "latency (cpu, 1 threads, batch 1, median), ms / video" in console.export_text()


def test_config_errors():
    with pytest.raises(ValueError, match="format must be 'table' or 'json'"):
        profile(config("format=xml"))
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        profile(config("device=tpu"))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        profile(config("repeats=0"))
    with pytest.raises(ValueError, match="runtime: unknown 'tensorrt'; known: eager, channels_last"):
        profile(config("runtime=[eager,tensorrt]"))
    with pytest.raises(ValueError, match="names a runtime twice"):
        profile(config("runtime=[eager,eager]"))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        profile(config("threads=0"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            profile(config("device=cuda", "batch_size=4"))
