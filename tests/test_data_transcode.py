"""``prepare transcode`` / ``prepare verify --manifest`` as real CLIs, and the manifest in the data module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import decord
import pytest
from videos import frame_index_of, make_video_dataset, numbered_frames, write_video

from adafocus.data import VideoDataModule, VideoReadError
from adafocus.data.manifest import ManifestError, read_manifest

REPO = Path(__file__).resolve().parents[1]
KEYINT = 4


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adafocus.data.prepare", *args], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def stream_facts(path: Path) -> dict:
    """What PyAV sees in a file: streams, codec, size, and each decoded frame's picture type."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        facts = {
            "audio": len(c.streams.audio), "codec": v.codec_context.name, "pix_fmt": v.codec_context.pix_fmt,
            "size": (v.codec_context.width, v.codec_context.height), "rate": v.average_rate,
        }  # fmt: skip
        facts["types"] = [av.video.frame.PictureType(f.pict_type).name for f in c.decode(v)]
    return facts


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    """Raw videos: 96x128 with audio and x264's default keyframes, one in a sub-folder, one broken."""
    root = tmp_path_factory.mktemp("raw")
    write_video(root / "a.mp4", numbered_frames(30, 96, 128, seed=1), fps=10, audio=True)
    write_video(root / "sub" / "b c.mkv", numbered_frames(17, 128, 96, seed=2), fps=10)
    (root / "broken.mp4").write_bytes(b"not a video" * 50)
    return root


@pytest.fixture(scope="module")
def transcoded(source_tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fast") / "videos"
    args = [str(source_tree), str(dst), "--short-side", "48", "--keyint", str(KEYINT), "--workers", "2"]
    result = run("transcode", *args, "--quiet")
    return dst, args, result


def test_transcode_encodes_for_fast_reads(transcoded):
    dst, _, result = transcoded
    assert result.returncode == 1 and "1 video(s) failed" in result.stderr  # broken.mp4, the others done
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.mp4")) == ["a.mp4", "sub/b c.mp4"]
    a, b = stream_facts(dst / "a.mp4"), stream_facts(dst / "sub" / "b c.mp4")
    assert a["audio"] == 0 and a["codec"] == "h264" and a["pix_fmt"] == "yuv420p"
    assert a["size"] == (64, 48) and b["size"] == (48, 64)  # shorter side 48, aspect kept
    assert len(a["types"]) == 30 and len(b["types"]) == 17  # every frame kept at native fps
    for facts, n in ((a, 30), (b, 17)):  # a keyframe exactly every KEYINT frames, no B-frames
        assert facts["types"] == ["I" if i % KEYINT == 0 else "P" for i in range(n)]
    # the content survives: decoded frame i shows index i
    vr = decord.VideoReader(str(dst / "a.mp4"))
    assert [frame_index_of(vr[i].asnumpy()) for i in range(0, 30, 7)] == [i % 15 for i in range(0, 30, 7)]


def test_transcode_manifest_and_failures(transcoded):
    dst, _, _ = transcoded
    infos = read_manifest(dst / "manifest.jsonl")
    assert sorted(infos) == ["a", "sub/b c"]
    a = infos["a"]
    assert (a.file, a.frames, a.fps, a.width, a.height) == ("a.mp4", 30, 10.0, 64, 48)
    assert a.bytes == (dst / "a.mp4").stat().st_size
    for info in infos.values():  # the decoder agrees with the manifest
        vr = decord.VideoReader(str(dst / info.file))
        assert info.frames == len(vr) and list(info.keyframes) == list(vr.get_key_indices())
    failures = (dst / "transcode_failures.txt").read_text().splitlines()
    assert len(failures) == 1 and failures[0].startswith("broken\t") and "Invalid data" in failures[0]
    assert not [p for p in dst.rglob("*") if p.name.startswith(".")]  # no temporary file left


def test_transcode_resumes_and_reencodes_missing(transcoded, source_tree):
    dst, args, _ = transcoded
    mtime = (dst / "a.mp4").stat().st_mtime_ns
    (dst / "sub" / "b c.mp4").unlink()
    result = run("transcode", *args, "--quiet")
    assert result.returncode == 1
    assert (dst / "a.mp4").stat().st_mtime_ns == mtime  # finished: kept
    assert stream_facts(dst / "sub" / "b c.mp4")["size"] == (48, 64)  # missing: re-encoded
    assert sorted(read_manifest(dst / "manifest.jsonl")) == ["a", "sub/b c"]


def test_transcode_list_and_fps(source_tree, tmp_path):
    listed = tmp_path / "train.txt"
    listed.write_text("a,30,0\nnope,10,1\n")
    dst = tmp_path / "out"
    result = run("transcode", str(source_tree), str(dst), "--list", str(listed), "--fps", "5",
                 "--short-side", "48", "--keyint", "3", "--workers", "1", "--quiet")  # fmt: skip
    assert result.returncode == 1 and "1 video(s) failed" in result.stderr
    assert "nope\tmissing" in (dst / "transcode_failures.txt").read_text()
    facts = stream_facts(dst / "a.mp4")
    assert facts["rate"] == 5 and len(facts["types"]) == 15  # 3 s at 5 fps
    assert read_manifest(dst / "manifest.jsonl")["a"].keyframes == (0, 3, 6, 9, 12)
    ok = tmp_path / "ok.txt"
    ok.write_text("a,30,0\n")
    result = run("transcode", str(source_tree), str(dst), "--list", str(ok), "--quiet")
    assert result.returncode == 0 and not (dst / "transcode_failures.txt").exists()


def test_verify_writes_manifest(source_tree, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "videos").symlink_to(source_tree)
    (data / "val.txt").write_text("a,30,0\nsub/b c,17,1\nbroken,5,0\n")
    result = run("verify", str(data), "--list", "val.txt", "--num-classes", "2", "--manifest", "--quiet")
    assert result.returncode == 0, result.stderr
    infos = read_manifest(source_tree / "manifest.jsonl")
    assert sorted(infos) == ["a", "sub/b c"]  # the unreadable one is left out
    vr = decord.VideoReader(str(source_tree / "a.mp4"))
    assert infos["a"].frames == len(vr) == 30 and list(infos["a"].keyframes) == list(vr.get_key_indices())
    assert infos["sub/b c"].file == "sub/b c.mkv"
    (source_tree / "manifest.jsonl").unlink()  # other tests use this tree without a manifest


# ------------------------------------------------------------------ the manifest in the data module
VIDEOS = [("v0", 12, [0]), ("v1", 16, [1])]


@pytest.fixture(scope="module")
def verified_root(tmp_path_factory):
    root = make_video_dataset(tmp_path_factory.mktemp("manifest") / "d", VIDEOS, 2)
    result = run("verify", str(root), "--list", "train_split.txt", "--manifest", "--quiet")
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def manifest_root(verified_root, tmp_path):
    """A fresh copy of a dataset whose manifest the real CLI wrote (the tests below edit it)."""
    return Path(shutil.copytree(verified_root, tmp_path / "d"))


def make_dm(root, **kwargs):
    args = dict(
        data_dir=root, list_format="comma", train_list="train_split.txt", val_list="val_split.txt",
        class_index="classInd.txt", num_classes=2, multilabel=False, num_frames=4, input_size=32,
        batch_size=2, workers=0, decode_short_side=32,
    )  # fmt: skip
    return VideoDataModule(**{**args, **kwargs})


def test_manifest_used(manifest_root):
    dm = make_dm(manifest_root)
    dm.setup("fit")
    assert sorted(dm.video_infos) == ["v0", "v1"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["video"].shape == (2, 4, 3, 32, 32)
    assert make_dm(manifest_root, manifest=None).manifest_path() is None


def rewrite(path: Path, lineno: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("\n".join(lines) + "\n")


def test_malformed_and_stale_manifest_lines(manifest_root):
    manifest = manifest_root / "videos" / "manifest.jsonl"
    original = manifest.read_text()

    def changed(**fields):
        return lambda t: json.dumps({**json.loads(t), **fields})

    cases = [
        (lambda t: t[:-5], r"manifest.jsonl:2: not a JSON object"),
        (changed(keyframes=[]), r"manifest.jsonl:2: the keyframe list .* empty"),
        (changed(keyframes=[0, 99]), r"manifest.jsonl:2: keyframes .* \[0, 16\)"),
        (changed(bytes=7), r"manifest.jsonl:2: .*v1.mp4 has \d+ bytes, the manifest says 7"),
        (
            lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "fps"}),
            r":2: expected the keys",
        ),
    ]
    for edit, message in cases:
        manifest.write_text(original)
        rewrite(manifest, 2, edit)
        with pytest.raises(ManifestError, match=message):
            make_dm(manifest_root).setup("fit")
    manifest.write_text(original.splitlines()[0] + "\n")  # v1 has no line
    with pytest.raises(ManifestError, match=r"train_split.txt:2: video 'v1' has no line in the manifest"):
        make_dm(manifest_root).setup("fit")
    manifest.write_text(original)
    (manifest_root / "videos" / "v0.mp4").rename(manifest_root / "v0.mp4")
    with pytest.raises(ManifestError, match=r"manifest.jsonl:1: .*v0.mp4 is missing"):
        make_dm(manifest_root).setup("validate")


def test_manifest_claiming_more_frames_is_an_error_naming_the_line(manifest_root):
    manifest = manifest_root / "videos" / "manifest.jsonl"
    rewrite(manifest, 2, lambda t: json.dumps({**json.loads(t), "frames": 40}))
    dm = make_dm(manifest_root)
    dm.setup("validate")
    with pytest.raises(
        VideoReadError,
        match=r"stale manifest line .*manifest.jsonl:2: it says 40 frames, the decoder finds 16",
    ):
        list(dm.val_dataloader())  # fmt: skip
