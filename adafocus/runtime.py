"""Fast CPU inference: the same AdaFocusV2 eval forward with its heavy parts run by another engine.

``fast = optimize(model, "fastest")`` returns an eval-mode copy of ``model`` whose glance, policy, focus and
classifier are replaced by the runtime's version of each; ``fast(video)`` is ``model(video)`` (an
:class:`~adafocus.models.adafocus.AdaFocusOutput`, equal to float tolerance) and the glue between the parts
(input checks, reshapes, the heads, the patch read-out) stays the model's own code, so ``run_glance`` /
``run_focus`` / ``policy="random"`` work as before. Inference only: the parts run without gradients.

Runtimes (:data:`RUNTIMES`):

- ``eager``: the model as it is (the reference).
- ``channels_last``: eager, with the glance and focus CNNs' BatchNorms folded into their convolutions and
  their input in channels-last layout, which oneDNN's convolutions (depthwise ones above all) run without
  reordering (the model's own trunks hold channels-last weights already: the folding is what this adds).
- ``torchscript``: each part ``torch.jit.trace`` d, frozen and ``optimize_for_inference`` d (BN folding,
  oneDNN convolution fusion).
- ``compile``: each part ``torch.compile`` d by Inductor with weight freezing (needs a C++ compiler).
- ``onnxruntime``: each part exported to ONNX (:func:`adafocus.export.onnx_program`) and run by an
  onnxruntime CPU session with all graph optimisations, as many threads as torch uses.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from adafocus.export import example_video, onnx_program, torchscript_module
from adafocus.models import AdaFocusV2

GRAPH_PARTS = ("glance", "policy", "focus", "classifier")  # the sub-modules a graph runtime replaces
CONV_TRUNKS = ("glance.trunk", "focus")  # the CNNs channels_last rewrites


class Engine(nn.Module):
    """A part run by another engine: ``forward(x) = run(x)`` without gradients; ``name`` says which."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], name: str):
        super().__init__()
        self.run = run
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.run(x)

    def extra_repr(self) -> str:
        return self.name


class ChannelsLast(nn.Module):
    """``module`` (a CNN with its BatchNorms folded) on channels-last input: ``[N, C, H, W]`` -> its map."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = fuse(module).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def part_inputs(model: AdaFocusV2, video: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each of :data:`GRAPH_PARTS` gets in ``model(video)`` (recorded by forward hooks)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, name).register_forward_pre_hook(lambda _m, args, n=name: inputs.setdefault(n, args[0]))
        for name in GRAPH_PARTS
    ]
    try:
        with torch.no_grad():
            model(video)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _channels_last(model: AdaFocusV2, inputs: dict[str, torch.Tensor]) -> None:
    for path in CONV_TRUNKS:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, name, ChannelsLast(getattr(owner, name)))


def _torchscript(model: AdaFocusV2, inputs: dict[str, torch.Tensor]) -> None:
    for name in GRAPH_PARTS:
        traced = torchscript_module(getattr(model, name), (inputs[name],))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of compile
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        setattr(model, name, Engine(frozen, "torchscript"))


def _compile(model: AdaFocusV2, inputs: dict[str, torch.Tensor]) -> None:
    for name in GRAPH_PARTS:  # compiled at the first call of each input shape (static shapes: fastest code)
        compiled = torch.compile(getattr(model, name), dynamic=False, options={"freezing": True})
        setattr(model, name, Engine(compiled, "compile"))


def _onnxruntime(model: AdaFocusV2, inputs: dict[str, torch.Tensor]) -> None:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # torch runs between parts
    for name in GRAPH_PARTS:
        program = onnx_program(getattr(model, name), (inputs[name],), ["input"], ["output"])
        session = onnxruntime.InferenceSession(
            program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

        def run(x: torch.Tensor, session=session) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"input": x.detach().contiguous().numpy()})[0])

        setattr(model, name, Engine(run, "onnxruntime"))


def _has_onnx() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


RUNTIMES: dict[str, tuple[Callable[[AdaFocusV2, dict], None] | None, Callable[[], bool]]] = {
    # name -> (rewrites the copy's parts given their example inputs; None: no change, is it usable here)
    "eager": (None, lambda: True),
    "channels_last": (_channels_last, lambda: True),
    "torchscript": (_torchscript, lambda: True),
    "compile": (_compile, lambda: any(shutil.which(c) for c in ("g++", "c++", "clang++"))),
    "onnxruntime": (_onnxruntime, _has_onnx),
}
FASTEST = ("onnxruntime", "torchscript", "channels_last", "eager")  # measured order (README, "Model profile")


def available_runtimes() -> list[str]:
    """The runtimes this machine can run, in :data:`RUNTIMES` order."""
    return [name for name, (_, usable) in RUNTIMES.items() if usable()]


def optimize(model: AdaFocusV2, runtime: str = "fastest") -> AdaFocusV2:
    """An eval-mode CPU copy of ``model`` whose parts run in ``runtime`` (a :data:`RUNTIMES` name, or
    "fastest": the first of :data:`FASTEST` available here). Building takes seconds (``compile``: its
    first call per input shape takes a minute); the copy's forward gives ``model``'s outputs to float
    tolerance."""
    available = available_runtimes()
    if runtime == "fastest":
        runtime = next(name for name in FASTEST if name in available)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)} or 'fastest', got {runtime!r}")
    if runtime not in available:
        need = "pip install 'adafocus[export]'" if runtime == "onnxruntime" else "a C++ compiler (g++)"
        raise RuntimeError(f"runtime={runtime} is not available here: it needs {need}")
    fast = copy.deepcopy(model).cpu().eval()
    rewrite = RUNTIMES[runtime][0]
    if rewrite is not None:
        rewrite(fast, part_inputs(fast, example_video(fast)))
    return fast
