"""`python -m adafocus.export`: the eval model to ONNX and TorchScript, checked against eager (issue 11.5)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf

from adafocus.export import OUTPUTS, cummax, export, export_model
from adafocus.models import AdaFocusV2
from adafocus.module import AdaFocusModule
from adafocus.tasks import train

ROOT = Path(__file__).resolve().parents[1]


def config(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def tiny_model(seed: int = 0) -> AdaFocusV2:
    """A real CPU-sized model (conf/backbone/cpu.yaml: mbv3s glance, res18 focus) on 64 px, T = 4."""
    backbone = OmegaConf.load(ROOT / "conf" / "backbone" / "cpu.yaml")
    torch.manual_seed(seed)
    model = AdaFocusV2(
        num_classes=5, glance_arch=backbone.glance_arch, focus_arch=backbone.focus_arch, patch_size=32,
        num_frames=4, input_size=64, stn_hidden_dim=backbone.stn_hidden_dim,
        classifier_dim=backbone.classifier_dim, glance_size=backbone.glance_size, pretrained=False,
    )  # fmt: skip
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def load_onnx(path: Path, video: torch.Tensor) -> dict[str, torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["video"]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, map(torch.from_numpy, session.run(names, {"video": video.numpy()})), strict=True))


def load_torchscript(path: Path, video: torch.Tensor) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        return dict(zip(OUTPUTS, torch.jit.load(str(path))(video), strict=True))


def assert_matches_eager(model: AdaFocusV2, got: dict[str, torch.Tensor], video: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(video)
    assert set(got) == {"logits", "global_logits", "local_logits", "actions"}
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, getattr(expected, name), rtol=1e-4, atol=1e-5, msg=name)
    assert got["logits"].shape == (video.shape[0], model.num_frames, model.num_classes)
    assert got["actions"].shape == (video.shape[0], model.num_frames, 2)


@pytest.mark.parametrize("fmt, load", [("onnx", load_onnx), ("torchscript", load_torchscript)])
def test_export_matches_eager_for_any_batch(tmp_path, fmt, load):
    model = tiny_model()
    path = tmp_path / f"model.{fmt}"
    export_model(model, fmt, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # one file, no temporary, no .data
    if fmt == "onnx":
        onnx.checker.check_model(str(path), full_check=True)
    for batch in (1, 2, 5):
        video = torch.randn(batch, 4, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        assert_matches_eager(model, load(path, video), video)


STEP_API = pytest.mark.skipif(
    not hasattr(AdaFocusV2, "init_state"), reason="needs the step API AdaFocusV2.init_state/step (issue 11.2)"
)


@STEP_API
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_step_export_streams_the_whole_clip_forward(tmp_path, fmt):
    model = tiny_model()
    path = tmp_path / f"step.{fmt}"
    export_model(model, fmt, path, graph="step")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        assert names == ["frame", "hidden", "pooled", "step"]

        def run(*inputs):
            feed = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
            return [torch.from_numpy(o) for o in session.run(None, feed)]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            run = torch.no_grad()(torch.jit.load(str(path)))
    for batch in (1, 3):
        video = torch.randn(batch, 4, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(video)
        hidden = torch.zeros(1, batch, model.policy.gru.hidden_size)  # the documented initial state
        pooled = torch.full((batch, model.classifier.head_weight.shape[-1]), float("-inf"))
        step = torch.tensor(0)
        for t in range(4):
            logits, action, confidence, hidden, pooled, step = run(video[:, t], hidden, pooled, step)
            torch.testing.assert_close(logits, expected.logits[:, t], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(action, expected.actions[:, t], rtol=1e-4, atol=1e-5)
            probs = torch.softmax(expected.logits[:, t], -1)
            torch.testing.assert_close(confidence, probs.max(-1).values, rtol=1e-4, atol=1e-6)
            assert int(step) == t + 1


def test_cummax_decomposition_equals_torch():
    x = torch.randint(0, 4, (3, 7, 5)).float()  # many ties: the indices must follow torch's choice
    for dim in (1, -1, 0):
        values, indices = cummax(x, dim)
        expected = torch.cummax(x, dim)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_bad_format_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(ValueError, match="format must be one of onnx, torchscript, got 'tflite'"):
        export_model(tiny_model(), "tflite", tmp_path / "model.tflite")
    assert list(tmp_path.iterdir()) == []


TRAIN = [
    "dataset.generate.num_train=8", "dataset.generate.num_val=4", "dataset.generate.frames_per_video=6",
    "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=2",
    "patch=16", "batch_size=4", "epochs=1", "workers=0", "backbone.stn_hidden_dim=32",
    "backbone.classifier_dim=64",
]  # fmt: skip


@pytest.mark.slow
def test_cli_exports_a_trained_checkpoint(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    ckpt_path = Path(train(config("train", *TRAIN, f"data_root={tmp_path / 'data'}",
                                  f"output_dir={tmp_path / 'train'}"))["best_checkpoint"])  # fmt: skip
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module = AdaFocusModule(ckpt["hyper_parameters"]["config"])
    module.load_state_dict(ckpt["state_dict"])
    model = module.model.eval()
    video = torch.randn(3, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    out = run("-m", "adafocus.export", f"ckpt_path={ckpt_path}", f"hydra.run.dir={tmp_path / 'export'}")
    default = tmp_path / "export" / f"{ckpt_path.stem}.onnx"  # format=onnx and the run directory by default
    assert f"onnx: {default}" in out.stdout
    assert_matches_eager(model, load_onnx(default, video), video)

    target = tmp_path / "exported" / "model.pt"  # the other format, in-process
    assert export(config("export", f"ckpt_path={ckpt_path}", "format=torchscript", f"out={target}",
                         f"output_dir={tmp_path / 'export2'}")) == target  # fmt: skip
    assert_matches_eager(model, load_torchscript(target, video), video)


def test_cli_errors_before_loading(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adafocus.export", f"ckpt_path={tmp_path / 'missing.ckpt'}", "format=tflite",
         f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "format must be one of onnx, torchscript, got 'tflite'" in result.stderr
    with pytest.raises(FileNotFoundError, match=f"ckpt_path={tmp_path / 'missing.ckpt'}: no such file"):
        export(config("export", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"output_dir={tmp_path}"))
