"""Export a trained AdaFocusV2 (eval mode, learned policy) to ONNX or TorchScript.

``python -m adafocus.export ckpt_path=FILE format=onnx|torchscript [graph=eval|step] [out=FILE]``

``graph=eval`` (:class:`EvalGraph`) maps ``video`` float ``[B, T, 3, H, W]`` (normalised; T and H = W fixed
by the model, B free) to ``logits`` ``[B, T, C]`` (the per-step classifier; the prediction is
``logits[:, -1]``), ``global_logits``, ``local_logits`` ``[B, T, C]`` and ``actions`` ``[B, T, 2]``.
``graph=step`` (:class:`StepGraph`) is one streaming step, its state as tensors. Each written file is loaded
back and checked against the eager whole-clip forward before it replaces ``out`` (so ``out`` is never a
wrong graph).

ONNX: the eval graph goes through the dynamo-based exporter (``torch.export`` +
``torch.onnx.export(ExportedProgram)``), as the legacy TorchScript-based exporter has no ``aten::cummax``
(the recurrent classifier's running max): the exported program's ``cummax`` is decomposed into T
elementwise maxima first. The step graph has no cummax but input checks ``torch.export`` cannot take, so it
goes through the TorchScript-based exporter (:func:`step_onnx`). TorchScript: ``torch.jit.trace`` (the model's
Python branches test shapes only; ``torch.jit.script`` cannot compile its dataclass outputs).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from adafocus.fileio import atomic_path
from adafocus.models import AdaFocusV2
from adafocus.tasks.common import user_errors

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
GRAPHS = ("eval", "step")  # the whole-clip eval forward; one streaming step (AdaFocusV2.step)
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
        # ONNX has no cumulative max; onnxruntime's Einsum transposes the classifier's T heads' weights at
        # every call (5x slower than eager at batch 1): torch's own einsum decomposition gives a MatMul whose
        # weight transpose is constant-folded
        einsum = torch.ops.aten.einsum.default
        decompositions = {
            torch.ops.aten.cummax.default: cummax,
            einsum: torch.export.default_decompositions()[einsum],
        }
        program = program.run_decompositions(decompositions)
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


def load_exported(path: str | Path, fmt: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    """An exported file as a function of its input tensors (in graph order) returning its output tensors."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            feed = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
            return tuple(torch.from_numpy(o) for o in session.run(None, feed))

        return run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of export
        module = torch.jit.load(str(path), map_location="cpu")
    return torch.no_grad()(module)


def check_eval_graph(run: Callable[..., tuple[torch.Tensor, ...]], model: AdaFocusV2) -> float:
    """``run`` (an eval graph) against ``model`` on a random video of a batch size it was not traced with;
    raises AssertionError naming the output that differs, returns the largest absolute difference."""
    video = example_video(model, EXAMPLE_BATCH + 1, seed=1)
    with torch.no_grad():
        expected = model(video)
    worst = 0.0
    for name, got in zip(OUTPUTS, run(video), strict=True):
        torch.testing.assert_close(
            got, getattr(expected, name), **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}"
        )
        worst = max(worst, float((got - getattr(expected, name)).abs().max()))
    return worst


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


def export_model(model: AdaFocusV2, fmt: str, out: str | Path, graph: str = "eval") -> float:
    """Write ``model``'s ``graph`` (eval: :class:`EvalGraph`; step: :class:`StepGraph`) to ``out`` in ``fmt``
    (onnx | torchscript), atomically, after checking the file against the eager whole-clip forward
    (:func:`check_eval_graph`, :func:`check_step_graph`). Returns the largest absolute difference."""
    check_format(fmt)
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    model = model.cpu().eval()
    with atomic_path(out) as tmp:
        if graph == "eval":
            module, example = EvalGraph(model).eval(), (example_video(model),)
            if fmt == "onnx":
                onnx_program(module, example, ["video"], list(OUTPUTS)).save(tmp, external_data=False)
            else:
                torchscript_module(module, example).save(tmp)
            return check_eval_graph(load_exported(tmp, fmt), model)
        module = StepGraph(model).eval()
        example = (example_video(model)[:, 0], *initial_step_state(model, EXAMPLE_BATCH))
        if fmt == "onnx":
            step_onnx(module, example, tmp)
        else:
            torchscript_module(module, example).save(tmp)
        return check_step_graph(load_exported(tmp, fmt), model)


def export(cfg: DictConfig) -> Path:
    """The CLI: load ``cfg.ckpt_path`` (a checkpoint of ours or a published .pth.tar) and export it."""
    fmt, graph = str(cfg.format), str(cfg.graph)
    check_format(fmt)
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    from adafocus.tasks.checkpoint import load_module

    module, _ = load_module(cfg)
    name = Path(cfg.ckpt_path).stem + ("_step" if graph == "step" else "")
    out = Path(cfg.out) if cfg.get("out") else Path(cfg.output_dir) / f"{name}{FORMATS[fmt]}"
    worst = export_model(module.model, fmt, out, graph)
    print(f"{fmt}: {out} ({graph} graph; checked against eager: max abs difference {worst:.2e})", flush=True)
    return out


# ---------------------------------------------------------------- the one-step (streaming) model
# Needs the step API AdaFocusV2.init_state / step (issue 11.2, branch use); state fields as its StreamState.
STEP_INPUTS = ("frame", "hidden", "pooled", "step")
STEP_OUTPUTS = ("logits", "action", "confidence", "next_hidden", "next_pooled", "next_step")


class StepGraph(nn.Module):
    """``model.step`` on tensors only: (frame ``[B, 3, H, W]``, the policy's GRU state ``hidden``
    ``[1, B, Hp]``, the classifier's running max ``pooled`` ``[B, Hc]``, ``step`` int64 ``[]``) -> (``logits``
    ``[B, C]``, ``action`` ``[B, 2]``, ``confidence`` ``[B]``, the next hidden, pooled and step). Start from
    :func:`initial_step_state` and feed the T frames in processing order (a step >= T is out of range)."""

    def __init__(self, model: AdaFocusV2):
        super().__init__()
        self.model = model

    def forward(self, frame, hidden, pooled, step) -> tuple[torch.Tensor, ...]:
        state = self.model.init_state(frame.shape[0])  # the learned policy
        state = dataclasses.replace(state, step=step, policy_state=hidden, pooled=pooled)
        out, state = self.model.step(frame, state)
        return out.logits, out.action, out.confidence, state.policy_state, state.pooled, state.step


def initial_step_state(model: AdaFocusV2, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, pooled, step) before the first frame: a zero GRU state, a running max of -inf (so the first
    maximum is the first frame's) and step 0; their shapes are those ``model.step`` returns."""
    frame = torch.zeros(batch_size, 3, model.input_size, model.input_size)
    with torch.no_grad():
        _, state = model.step(frame, model.init_state(batch_size))
    hidden, pooled = state.policy_state, state.pooled
    return torch.zeros_like(hidden), torch.full_like(pooled, float("-inf")), torch.tensor(0)


def step_onnx(module: StepGraph, args: tuple[torch.Tensor, ...], path: str) -> None:
    """The step graph to ONNX with the TorchScript-based exporter: ``model.step``'s input checks (a
    data-dependent branch on the step index and the frame's values) stop ``torch.export``; a trace keeps
    them out of the graph (the caller checks its inputs)."""
    batch = {"frame": {0: "batch"}, "hidden": {1: "batch"}, "pooled": {0: "batch"}}
    batch |= {name: {0: "batch"} for name in ("logits", "action", "confidence", "next_pooled")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size other than 1")  # h0 is
        # an input, which is what this warning asks for
        torch.onnx.export(
            module, args, path, dynamo=False, input_names=list(STEP_INPUTS), output_names=list(STEP_OUTPUTS),
            dynamic_axes=batch | {"next_hidden": {1: "batch"}},
        )  # fmt: skip


def check_step_graph(run: Callable[..., tuple[torch.Tensor, ...]], model: AdaFocusV2) -> float:
    """``run`` (a step graph) fed the T frames of a random video, one by one from
    :func:`initial_step_state`, against ``model``'s whole-clip forward at every step; returns the largest
    absolute difference."""
    video = example_video(model, EXAMPLE_BATCH + 1, seed=1)
    with torch.no_grad():
        expected = model(video)
    state = initial_step_state(model, video.shape[0])
    worst = 0.0
    for t in range(model.num_frames):
        logits, action, confidence, *state = run(video[:, t], *state)
        pairs = {
            "logits": (logits, expected.logits[:, t]),
            "action": (action, expected.actions[:, t]),
            "confidence": (confidence, expected.logits[:, t].softmax(-1).amax(-1)),
        }
        for name, (got, want) in pairs.items():
            torch.testing.assert_close(
                got, want, **TOLERANCE, msg=lambda m, n=name, t=t: f"step {t} {n}: {m}"
            )
            worst = max(worst, float((got - want).abs().max()))
        assert int(state[2]) == t + 1, f"step {t}: next_step is {int(state[2])}"
    return worst


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        export(cfg)


if __name__ == "__main__":
    main()
