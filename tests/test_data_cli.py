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


def test_bench_cli_long_videos_from_real_clips(tiny_video, tmp_path):
    work = tmp_path / "work"
    result = run("adafocus.data.bench", "--from", str(tiny_video), "--num-videos", "2", "--seconds", "2",
                 "--fps", "10", "--height", "48", "--source-keyint", "10", "--keyint", "4",
                 "--short-side", "32", "--frames-height", "32", "--clips", "2", "--num-frames", "4",
                 "--input-size", "24", "--decoders", "decord", "--work", str(work))  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2 source videos: 42x24, 86x48, 40 frames, keyframe every ~" in out  # 48p and 24p, 16:9
    for row in (
        "| raw | decord | exact |",
        "| raw | decord | keyframe |",
        "| transcoded G=4 | decord | exact |",
        "| transcoded G=4 | decord | keyframe |",
        "| JPEG frames | PIL | exact |",
        "| transcoded G=4 |",
    ):
        assert row in out, row
    assert len(list((work / "jpeg" / "frames" / "0").glob("image_*.jpg"))) == 20  # 2 s at 10 fps
    assert sorted(p.name for p in (work / "transcoded_g4").glob("*.mp4")) == ["0.mp4", "1.mp4"]
