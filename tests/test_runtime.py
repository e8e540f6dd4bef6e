"""adafocus.runtime: the eval model's parts in other engines give eager's outputs (issue 11.6)."""

from __future__ import annotations

import pytest
import torch
from test_export import tiny_model

from adafocus.runtime import FASTEST, GRAPH_PARTS, RUNTIMES, Engine, available_runtimes, optimize


def video(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_runtime_gives_eager_outputs(runtime):
    if runtime not in available_runtimes():
        pytest.skip(f"{runtime} needs what this machine lacks (see adafocus.runtime.RUNTIMES)")
    model = tiny_model()
    parts = {name: getattr(model, name) for name in GRAPH_PARTS}
    fast = optimize(model, runtime)
    assert {name: getattr(model, name) for name in GRAPH_PARTS} == parts  # the model itself is untouched
    if runtime in ("torchscript", "compile", "onnxruntime"):
        assert all(isinstance(getattr(fast, name), Engine) for name in GRAPH_PARTS)
    elif runtime == "channels_last":
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.focus.modules())  # folded
    # another batch size: a graph runtime must take it; compile's static shapes would only recompile each part
    # (torch's own mechanism, seconds a part), so it is checked on new values at the same shape
    for batch, seed in ((1, 0), (1, 1), (1, 2)) if runtime == "compile" else ((1, 0), (2, 1), (1, 2)):
        x = video(batch, seed)
        with torch.no_grad():
            expected, got = model(x), fast(x)
        for name in ("logits", "global_logits", "local_logits", "actions"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the model's own glue still runs: other policies, the input checks
        centre = fast(video(1), policy="center")
    assert torch.equal(centre.actions, torch.full((1, 4, 2), 0.5))
    torch.testing.assert_close(centre.logits, model(video(1), policy="center").logits, rtol=1e-4, atol=1e-5)
    bad = video(1)
    bad[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fast(bad)


def test_fastest_and_errors():
    here = available_runtimes()
    assert here[:3] == ["eager", "channels_last", "torchscript"]  # need nothing beyond torch
    fast = optimize(tiny_model(), "fastest")
    first = next(name for name in FASTEST if name in here)
    engines = {m.name for m in fast.modules() if isinstance(m, Engine)}
    assert engines == ({first} if first in ("torchscript", "compile", "onnxruntime") else set())
    with pytest.raises(ValueError, match="runtime must be one of eager, channels_last, torchscript, compile"):
        optimize(tiny_model(), "tensorrt")
