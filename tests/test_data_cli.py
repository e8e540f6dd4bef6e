"""The dataset tools and the benchmark, run as real CLIs in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from videos import numbered_frames, write_video

from adafocus.data import parse_list, read_class_index

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def kinetics_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    for c, name in enumerate(["abseiling", "air drumming", "zumba"]):
        for i in range(3):
            write_video(root / name / f"clip {i}.mp4", numbered_frames(8 + i, seed=10 * c + i))
    (root / "zumba" / "broken.mp4").write_bytes(b"not a video" * 20)
    return root


def test_prepare_build_minik_subset(kinetics_tree, tmp_path):
    classes = tmp_path / "subset.txt"
    classes.write_text("zumba\nair drumming\n")
    out = tmp_path / "minik"
    result = run("adafocus.data.prepare", "build", str(kinetics_tree), str(out), "--classes", str(classes),
                 "--preset", "minik", "--val-fraction", "0.34", "--workers", "2", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "broken.mp4" in result.stderr  # unreadable: reported and left out
    assert read_class_index(out / "minik_classInd.txt") == ["zumba", "air drumming"]
    train = parse_list(out / "mini_train_videofolder.txt", "space", 2)
    val = parse_list(out / "mini_val_videofolder.txt", "space", 2)
    assert len(train) == 4 and len(val) == 2
    rows = {(e.path, e.num_frames, e.labels) for e in train + val}
    assert ("zumba/clip 2", 10, (0,)) in rows and ("air drumming/clip 0", 8, (1,)) in rows
    assert (out / "videos").resolve() == kinetics_tree.resolve()  # the layout the data module reads


def test_prepare_verify_writes_clean_list(kinetics_tree, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "videos").symlink_to(kinetics_tree)
    write_video(kinetics_tree.parent / "short" / "two.mp4", numbered_frames(2))
    lines = [
        "abseiling/clip 0,8,0",
        "zumba/broken,20,2",  # unreadable
        "zumba/nope,20,2",  # missing
        "air drumming/clip 1,9,5",  # label out of range
        "just garbage",  # malformed
        "zumba/clip 2,10,1,2",
        f"{kinetics_tree.parent / 'short' / 'two'},3,0",  # too short for the decoder (2 frames)
    ]
    (data / "val.txt").write_text("\n".join(lines) + "\n")
    result = run("adafocus.data.prepare", "verify", str(data), "--list", "val.txt", "--num-classes", "3",
                 "--num-frames", "4", "--workers", "2", "--quiet", "--strict")  # fmt: skip
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "missing files: 1" in out and "val.txt:3" in out
    assert "unreadable videos: 1" in out and "val.txt:2" in out
    assert "out-of-range labels: 1" in out and "val.txt:4" in out
    assert "malformed lines: 1" in out and "val.txt:5" in out
    assert "too short: 1" in out and "val.txt:7" in out
    assert (data / "val.clean.txt").read_text() == "abseiling/clip 0,8,0\nzumba/clip 2,10,1,2\n"


def test_bench_cli_runs(tiny_video):
    result = run("adafocus.data.bench", "--videos", str(tiny_video), "--workers", "0", "--clips", "2",
                 "--batch-size", "1", "--num-frames", "4", "--input-size", "32", "--decode-short-side", "48",
                 "--frames-height", "48")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for row in ("decord video", "JPEG folders (PIL)", "train", "eval", "clips/s"):
        assert row in result.stdout
