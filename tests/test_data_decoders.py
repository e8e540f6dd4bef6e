"""The two decoders (decord, torchcodec) return the same frames; uint8 batches normalised on the device give
the model the inputs of the float pipeline; a decoder that is not installed is named before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torchvision.transforms.v2 import functional as F
from videos import make_video_dataset, numbered_frames, skip_without_torchcodec, write_video

from adafocus.data import IMAGENET_MEAN, IMAGENET_STD, VideoDataModule
from adafocus.data.io import read_video
from adafocus.data.manifest import probe_video

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    rng = np.random.default_rng(0)
    textured = numbered_frames(40, 96, 128, seed=3)
    textured[:, :, 64:] = rng.integers(0, 255, (40, 96, 64, 3), np.uint8)  # hard to code: many P-frame bits
    return [
        write_video(root / "gop5.mp4", textured, keyint=5),
        write_video(root / "default.mkv", numbered_frames(33, 64, 96, seed=4)),  # one keyframe, mkv
    ]


@pytest.mark.parametrize("with_manifest", [False, True])
def test_decoders_return_the_same_frames(clips, with_manifest):
    skip_without_torchcodec()
    for path in clips:
        info = probe_video(path, path.stem, path.parent) if with_manifest else None
        n = len(decord.VideoReader(str(path)))
        for indices in ([0, 3, 7, n - 1], [n - 1, 12, 12, 5, 0], list(range(0, n, 4))):
            frames = {
                d: read_video(path, lambda _n, _k, i=indices: i, None, decoder=d, info=info)
                for d in ("decord", "torchcodec")
            }
            assert frames["decord"].shape == (len(indices), 3, *frames["decord"].shape[2:])
            assert torch.equal(frames["decord"], frames["torchcodec"]), (path.name, indices)
        # resized inside the decoder: decord scales bicubic, torchcodec bilinear: close, not equal
        a, b = (
            read_video(path, lambda _n, _k: [0, 9], 28, decoder=d, info=info)
            for d in ("decord", "torchcodec")
        )
        assert a.shape == b.shape and a.shape[-2:] in ((28, 37), (28, 42))
        assert (a.float() - b.float()).abs().mean() < 8


def test_decoders_see_the_same_count_and_keyframes(clips):
    skip_without_torchcodec()
    seen = {}
    for decoder in ("decord", "torchcodec"):

        def pick(n, keyframes, d=decoder):
            seen[d] = (n, list(keyframes))
            return [0]

        read_video(clips[0], pick, None, decoder=decoder)
    assert seen["decord"] == seen["torchcodec"] == (40, [0, 5, 10, 15, 20, 25, 30, 35])


def test_missing_torchcodec_is_named_before_any_work(tmp_path):
    code = (
        "import sys; sys.modules['torchcodec'] = None\n"  # as if not installed
        "from adafocus.data import VideoDataModule\n"
        f"VideoDataModule({str(tmp_path)!r}, 'comma', 't', 'v', 'c', 2, False, decoder='torchcodec')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "dataset.decoder=torchcodec cannot be used here: ModuleNotFoundError" in result.stderr
    assert "pip install -e '.[torchcodec]'" in result.stderr and "apt-get install ffmpeg" in result.stderr
    with pytest.raises(ValueError, match=r"decode_device='cuda' needs data.decoder=torchcodec and workers=0"):
        VideoDataModule(tmp_path, "comma", "t", "v", "c", 2, False, decode_device="cuda")
    with pytest.raises(ValueError, match=r"data.sampling must be one of \('exact', 'keyframe'\)"):
        VideoDataModule(tmp_path, "comma", "t", "v", "c", 2, False, sampling="keyframes")


class Recorder(pl.LightningModule):
    """Records the ``video`` each validation step receives: the model's input."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.inputs = []

    def validation_step(self, batch, batch_idx):
        self.inputs.append((batch["video"].clone(), list(batch["path"])))


@pytest.mark.parametrize("decoder", ["decord", "torchcodec"])
def test_model_inputs_equal_the_float_pipeline(tmp_path, decoder):
    if decoder == "torchcodec":
        skip_without_torchcodec()
    videos = [("v0", 20, [0]), ("v1", 13, [1]), ("v2", 16, [0])]
    root = make_video_dataset(tmp_path, videos, 2, height=96, width=128)
    t, s, short = 4, 48, 64
    dm = VideoDataModule(root, "comma", "train_split.txt", "val_split.txt", "classInd.txt", 2, False,
                         num_frames=t, input_size=s, batch_size=2, workers=2, decode_short_side=short,
                         decoder=decoder)  # fmt: skip
    loader_batch = next(iter((dm.setup("validate"), dm.val_dataloader())[1]))
    assert loader_batch["video"].dtype == torch.uint8 and loader_batch["video"].shape == (2, t, 3, s, s)
    model = Recorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    trainer.validate(model, datamodule=dm, verbose=False)
    got = torch.cat([v for v, _ in model.inputs])
    assert got.dtype == torch.float32 and got.shape == (3, t, 3, s, s)
    # the float pipeline written out: decord frames at eval indices, resize, centre crop, float, normalise
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for k, (_rel, n, _labels) in enumerate(videos):
        vr = decord.VideoReader(str(root / "videos" / f"v{k}.mp4"), width=short * 128 // 96, height=short)
        tick = n / t
        order = [int(tick / 2 + tick * i) for i in (1, 0, 3, 2)]  # processing order of T=4: (1, 0, 3, 2)
        frames = torch.from_numpy(vr.get_batch(order).asnumpy()).permute(0, 3, 1, 2)
        clip = F.center_crop(F.resize(frames, s * 256 // 224, antialias=True), [s, s])
        expected = (clip.float() / 255 - mean) / std
        diff = (got[k] - expected).abs()
        if decoder == "decord":
            assert diff.max() < 1e-5  # float round-off only
        else:  # torchcodec resizes bilinear inside the decoder (decord: bicubic): close, not equal
            assert diff.mean() < 0.35
