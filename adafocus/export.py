"""Export a trained AdaFocusV2 (eval mode, learned policy) to ONNX or TorchScript.

``python -m adafocus.export ckpt_path=FILE format=onnx|torchscript [out=FILE]``

The graph maps ``video`` float ``[B, T, 3, H, W]`` (normalised, T and H = W fixed by the model, B free) to
``logits`` ``[B, T, C]`` (the per-step classifier; the prediction is ``logits[:, -1]``), ``global_logits``,
``local_logits`` ``[B, T, C]`` and ``actions`` ``[B, T, 2]``. Each written file is loaded back and checked
against the eager model on a random video before it replaces ``out`` (so ``out`` is never a wrong graph).

ONNX goes through the dynamo-based exporter (``torch.export`` + ``torch.onnx.export(ExportedProgram)``): the
legacy TorchScript-based exporter has no ``aten::cummax`` (the recurrent classifier's running max), so the
exported program's ``cummax`` is decomposed into T elementwise maxima first. TorchScript is a
``torch.jit.trace`` (the model has no data-dependent control flow; ``torch.jit.script`` cannot compile its
dataclass outputs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from adafocus.fileio import atomic_path
from adafocus.models import AdaFocusV2

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
OUTPUTS = ("logits", "global_logits", "local_logits", "actions")
EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1: trace with 2 to keep B free
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # exported vs eager outputs (float32 reassociation only)


class EvalGraph(nn.Module):
    """``model``'s eval forward with tensor outputs: video ``[B, T, 3, H, W]`` -> :data:`OUTPUTS` tensors."""

    def __init__(self, model: AdaFocusV2):
        super().__init__()
        self.model = model

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(video)
        return tuple(getattr(out, name) for name in OUTPUTS)


def cummax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.cummax`` as elementwise maxima over the (static) length of ``dim``: ONNX has no cumulative max.
    Equal values keep the later index, as ``torch.cummax``."""
    dim = dim % x.dim()
    values, indices = [], []
    for t in range(x.shape[dim]):
        z = x.select(dim, t)
        if t == 0:
            running, index = z, torch.zeros_like(z, dtype=torch.long)
        else:
            take = z >= running
            running, index = torch.where(take, z, running), torch.where(take, t, index)
        values.append(running)
        indices.append(index)
    return torch.stack(values, dim), torch.stack(indices, dim)


def onnx_program(
    module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str]
) -> torch.onnx.ONNXProgram:
    """``module(*args)`` as an ONNX program (dynamo exporter), dimension 0 of every input free.

    ``args``: example inputs whose dimension 0 is not 1 (a size-1 dimension is specialised)."""
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", UserWarning)  # the GRU's flat weights "assigned during export"
        program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
        program = program.run_decompositions({torch.ops.aten.cummax.default: cummax})
        return torch.onnx.export(program, input_names=input_names, output_names=output_names, verbose=False)


def torchscript_module(module: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """``module`` traced on ``args``. Its Python branches test shapes only (fixed T and frame size), so the
    TracerWarnings about them are expected and silenced; ``check_trace`` reruns the trace to compare."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated in favour of export
        return torch.jit.trace(module, args)


def example_video(model: AdaFocusV2, batch_size: int = EXAMPLE_BATCH, seed: int = 0) -> torch.Tensor:
    """A random normalised-scale video ``[batch_size, T, 3, H, W]`` for tracing and checking."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, model.num_frames, 3, model.input_size, model.input_size)
    return torch.randn(shape, generator=generator)


def run_exported(path: str | Path, fmt: str, video: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Load an exported file and run it on ``video``: the :data:`OUTPUTS` tuple."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = session.run(list(OUTPUTS), {"video": video.numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of export
        return tuple(torch.jit.load(str(path), map_location="cpu")(video))


def check_format(fmt: str) -> None:
    """A known format whose packages are installed (ONNX: the ``export`` extra)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ImportError(f"format=onnx needs pip install 'adafocus[export]' ({err})") from err


def export_model(model: AdaFocusV2, fmt: str, out: str | Path) -> dict[str, float]:
    """Write ``model``'s eval graph to ``out`` in ``fmt`` (onnx | torchscript), atomically, after checking the
    file's outputs against eager on a fresh random video of another batch size. Returns the largest absolute
    difference per output."""
    check_format(fmt)
    graph = EvalGraph(model.cpu().eval()).eval()
    example = (example_video(model),)
    video = example_video(model, EXAMPLE_BATCH + 1, seed=1)
    with torch.no_grad():
        expected = graph(video)
    with atomic_path(out) as tmp:
        if fmt == "onnx":
            onnx_program(graph, example, ["video"], list(OUTPUTS)).save(tmp, external_data=False)
        else:
            torchscript_module(graph, example).save(tmp)
        got = run_exported(tmp, fmt, video)
        for name, g, e in zip(OUTPUTS, got, expected, strict=True):
            torch.testing.assert_close(g, e, **TOLERANCE, msg=lambda m, n=name: f"exported {n}: {m}")
    return {name: float((g - e).abs().max()) for name, g, e in zip(OUTPUTS, got, expected, strict=True)}


def export(cfg: DictConfig) -> Path:
    """The CLI: load ``cfg.ckpt_path`` (a checkpoint of ours or a published .pth.tar) and export it."""
    fmt = str(cfg.format)
    check_format(fmt)
    from adafocus.pipeline import load_module

    module, _ = load_module(cfg)
    default = Path(cfg.output_dir) / f"{Path(cfg.ckpt_path).stem}{FORMATS[fmt]}"
    out = Path(cfg.out) if cfg.get("out") else default
    diffs = export_model(module.model, fmt, out)
    worst = max(diffs.values())
    print(f"{fmt}: {out} (checked against eager: max abs difference {worst:.2e})", flush=True)
    return out


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
