"""The one-video demo (issue 11) end to end: a checkpoint of a tiny real training run, a generated video, the
real CLI in a subprocess; its numbers against the data module's eval path and the offline early exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from adafocus.data import ListFileError, VideoReadError
from adafocus.data.transforms import normalize_video
from adafocus.early_exit import confidences, early_exit_sweep, exit_steps
from adafocus.module import AdaFocusModule
from adafocus.tasks import train
from adafocus.thresholds import ThresholdsFileError, write_thresholds

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset.generate.num_train=12", "dataset.generate.num_val=9", "dataset.generate.frames_per_video=6",
    "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=3",
    "patch=16", "batch_size=4", "epochs=1", "workers=0", "backbone.stn_hidden_dim=32",
    "backbone.classifier_dim=64",
]  # fmt: skip
pytestmark = pytest.mark.slow


def config(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def demo(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "adafocus.demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert (result.returncode == 0) == ok, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A checkpoint of a tiny real training run, and every val / train video's per-step logits computed
    through the data module's own eval loader and the whole-clip forward."""
    tmp = tmp_path_factory.mktemp("demo")
    cfg = config("train", *TINY, f"data_root={tmp}", f"output_dir={tmp / 'run'}")
    ckpt = Path(train(cfg)["best_checkpoint"])
    module = AdaFocusModule(
        torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
    )
    module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    model = module.model.eval()
    datamodule = instantiate(cfg.data)
    logits, paths = {}, {}
    for split in ("train", "val"):
        batches = list(datamodule.eval_dataloader(split))
        with torch.no_grad():
            logits[split] = torch.cat([model(normalize_video(b["video"])).logits for b in batches])  # (N,T,C)
        paths[split] = [p for b in batches for p in b["path"]]
    return {
        "ckpt": ckpt,
        "model": model,
        "logits": logits,
        "paths": paths,
        "data": Path(cfg.data_dir),
        "tmp": tmp,
    }


def test_demo_streams_one_video_and_stops_where_offline_early_exit_stops(trained, tmp_path):
    val = trained["logits"]["val"]
    labels = val[:, -1].argmax(-1, keepdim=True)
    result = early_exit_sweep(trained["logits"]["train"], val, labels, 1.0, "top1", [0.5])
    thresholds = write_thresholds(tmp_path / "thresholds.json", result, num_classes=4, dataset="synthetic")
    conf = confidences(val)  # (N, T)
    eta = result.thresholds[0]
    assert ((conf - eta).abs()[:, torch.isfinite(eta)] > 1e-5).all()  # no float-level tie with a threshold
    steps = exit_steps(conf, result.thresholds)[0]  # (N,) offline exit step per val video
    n = int(steps.argmin())  # a video that stops as early as any
    video = trained["data"] / "videos" / f"{trained['paths']['val'][n]}.mp4"
    out = tmp_path / "out"
    run = demo(
        f"ckpt_path={trained['ckpt']}", f"video={video}", f"thresholds={thresholds}", f"hydra.run.dir={out}"
    )

    shown = json.loads((out / "demo.json").read_text())
    names = (trained["data"] / "classInd.txt").read_text().split("\n")
    names = [line.split(" ", 1)[1] for line in names if line]
    probs = val[n].softmax(-1)  # (T, C): the eval loader's clip, whole-clip forward
    assert len(shown["steps"]) == 3
    for t, step in enumerate(shown["steps"]):
        top = probs[t].topk(4)
        assert [e["class"] for e in step["top"]] == [names[c] for c in top.indices.tolist()]
        assert [e["prob"] for e in step["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert step["frame"] == [3, 1, 5][t]  # 6 frames, T=3: centres 1, 3, 5; processing order 1, 0, 2
        for e in step["top"]:
            assert f"{100 * e['prob']:6.2f}%  {e['class']}" in run.stdout
    stop = int(steps[n])
    assert stop < 2  # this video does stop early
    assert shown["exit"]["step"] == stop + 1 and shown["exit"]["class"] == names[int(val[n, stop].argmax())]
    gflops = shown["gflops_per_video"]
    assert shown["exit"]["gflops"] == pytest.approx((stop + 1) * gflops / 3)
    assert (
        "AdaFocusV2+ (p=0.5) stops here" in run.stdout and f"stops after step {stop + 1} of 3" in run.stdout
    )

    with av.open(str(out / "demo.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with Image.open(out / "demo.gif") as gif:
        assert gif.n_frames == 3
        size = gif.size
    assert len(frames) == 3 and frames[0].shape[:2] == (size[1], size[0]) and size[0] >= 224
    assert frames[0][size[0] - 1 :].max() > 200  # the caption strip below the frame has white text


def test_demo_of_a_published_layout_checkpoint_gives_the_same_steps(trained, tmp_path):
    from adafocus.models import to_official_state_dict

    video = trained["data"] / "videos" / f"{trained['paths']['val'][0]}.mp4"
    published = tmp_path / "synthetic_p16_mbv3s.pth.tar"
    torch.save({"state_dict": to_official_state_dict(trained["model"])}, published)
    demo(f"ckpt_path={published}", f"video={video}", *TINY, "backbone=cpu", f"data_root={trained['tmp']}",
         f"hydra.run.dir={tmp_path / 'pub'}")  # fmt: skip
    demo(f"ckpt_path={trained['ckpt']}", f"video={video}", f"hydra.run.dir={tmp_path / 'ours'}")
    pub, ours = (json.loads((tmp_path / d / "demo.json").read_text()) for d in ("pub", "ours"))
    assert [s["top"][0]["class"] for s in pub["steps"]] == [s["top"][0]["class"] for s in ours["steps"]]
    assert pub["steps"][-1]["top"][0]["prob"] == pytest.approx(ours["steps"][-1]["top"][0]["prob"], abs=1e-5)
    assert pub["exit"] is None


def test_demo_errors(trained, tmp_path):
    from adafocus.demo import run_demo

    def run(*overrides: str):
        return run_demo(config("demo", f"ckpt_path={trained['ckpt']}", f"output_dir={tmp_path}", *overrides))

    with pytest.raises(FileNotFoundError, match="video=.*nope.mp4: no such file"):
        run(f"video={tmp_path / 'nope.mp4'}")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        run(f"video={broken}")
    video = trained["data"] / "videos" / f"{trained['paths']['val'][0]}.mp4"
    g = torch.Generator().manual_seed(0)
    other = early_exit_sweep(torch.randn(30, 5, 4, generator=g), torch.randn(5, 5, 4, generator=g),
                             torch.zeros(5, 1).long(), 1.0, "top1", [1.0])  # fmt: skip
    wrong_t = write_thresholds(tmp_path / "t5.json", other, 4, "other")
    with pytest.raises(ThresholdsFileError, match="t5.json was calibrated for T=5 steps.*has T=3"):
        run(f"video={video}", f"thresholds={wrong_t}")
    with pytest.raises(ValueError, match="needs thresholds=FILE"):
        run(f"video={video}", "budget=1.0")
    # a class index that does not fit the checkpoint (3 names, 4 classes): the real CLI, data_dir override
    bad = tmp_path / "three"
    bad.mkdir()
    (bad / "classInd.txt").write_text("a\nb\nc\n")
    result = demo(f"ckpt_path={trained['ckpt']}", f"video={video}", f"data_dir={bad}", ok=False)
    assert "classInd.txt: 3 classes, but dataset.num_classes = 4" in result.stderr
    assert ListFileError.__name__ in result.stderr
