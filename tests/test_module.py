"""The LightningModule (issue 4, SPEC §2): one training step on a real batch reaches every parameter that
should learn and none that should not, the four SGD groups get lr x ratio, the per-epoch cosine holds on the
real optimiser, and the validation metrics follow SPEC §4."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from adafocus.metrics import VideoMetrics, mean_average_precision
from adafocus.module import AdaFocusModule
from adafocus.pipeline import plain_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "dataset.generate.num_train=16", "dataset.generate.num_val=9", "dataset.generate.frames_per_video=6",
    "dataset.generate.size=64", "dataset.input_size=64", "backbone.glance_size=8", "num_frames=2", "patch=16",
    "batch_size=4", "epochs=1", "workers=0", "backbone.stn_hidden_dim=32", "backbone.classifier_dim=64",
    "optimizer=sgd", "optim.lr_ratios.policy=0.1",  # the published optimiser and ratios on the tiny task
]  # fmt: skip
GROUPS = ("policy", "glance", "focus", "classifier")


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY, *overrides])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny config, a real training batch from the VideoDataModule (generated mp4s), a fresh module."""
    tmp = tmp_path_factory.mktemp("module")
    cfg = compose_cfg(f"data_root={tmp / 'data'}", f"output_dir={tmp / 'out'}")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (4, 2, 3, 64, 64)
    return cfg, batch


def fresh_module(cfg) -> AdaFocusModule:
    torch.manual_seed(0)
    return AdaFocusModule(plain_config(cfg))


def grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def is_zero(g: torch.Tensor | None) -> bool:
    return g is None or not g.abs().sum() > 0


# ------------------------------------------------------------------ gradients
def test_one_training_step_reaches_every_parameter_of_the_four_groups(setup):
    cfg, batch = setup
    module = fresh_module(cfg)
    module.train()
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    groups = module.model.param_groups()
    assert set(groups) == set(GROUPS)
    for group, params in groups.items():
        assert params, group
        names = {id(p): n for n, p in module.model.named_parameters()}
        for p in params:
            name = f"{group}: {names[id(p)]}"
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    # every parameter of the module is in exactly one group
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in module.parameters()}


def test_glance_gets_no_gradient_from_the_policy_path(setup):
    cfg, batch = setup
    module = fresh_module(cfg)
    module.train()
    model = module.model
    glance_params = [*model.glance.parameters(), *model.glance_head.parameters()]
    policy_params = [*model.policy.parameters()]
    video = batch["video"]

    glance = model.run_glance(video)
    out = model.run_focus(video, glance, "learned")
    out.actions.sum().backward()  # only what depends on the actions: the policy path
    assert all(not is_zero(g) for g in grads(policy_params))  # the policy does get it ...
    assert all(is_zero(g) for g in grads(glance_params))  # ... and stops there: the glance input is detached

    # the same with the full loss: the glance gradient is exactly the one without the policy's influence
    module.zero_grad(set_to_none=True)
    target = batch["label"].repeat_interleave(video.shape[1])
    torch.manual_seed(2)  # the same dropout masks in both glances
    glance = model.run_glance(video)
    torch.nn.functional.cross_entropy(glance.global_logits.flatten(0, 1), target).backward()
    glance_only = grads(glance_params)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    glance = model.run_glance(video)
    out = model.run_focus(video, glance, "learned")
    loss = torch.nn.functional.cross_entropy(glance.global_logits.flatten(0, 1), target)
    # + the local loss, which reaches the policy through the patch interpolation but not the glance
    (loss + torch.nn.functional.cross_entropy(out.local_logits.flatten(0, 1), target)).backward()
    assert all(not is_zero(g) for g in grads(policy_params))
    for a, b in zip(glance_only, grads(glance_params), strict=True):
        assert a is not None and b is not None and torch.equal(a, b)


def test_random_pass_gives_the_policy_no_gradient(setup):
    cfg, batch = setup
    module = fresh_module(cfg)
    module.train()
    model = module.model
    video = batch["video"]
    target = batch["label"].repeat_interleave(video.shape[1])
    out = model.run_focus(video, model.run_glance(video), "random")
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), target).backward()
    assert all(is_zero(p.grad) for p in model.policy.parameters())
    assert not all(is_zero(p.grad) for p in model.focus.parameters())


def test_training_step_loss_is_the_mean_of_the_two_passes(setup):
    """SPEC §2: per pass CE(cat) + CE(global) + CE(local), averaged over B*T; loss = mean of the passes."""
    cfg, batch = setup
    module = fresh_module(cfg)
    module.eval()  # no dropout, BN running stats: the only randomness left is the random pass's actions
    video = batch["video"]
    target = batch["label"].repeat_interleave(video.shape[1])
    with torch.no_grad():
        torch.manual_seed(1)
        loss = module.training_step(batch, 0)
        torch.manual_seed(1)
        glance = module.model.run_glance(video)
        passes = [module.model.run_focus(video, glance, p) for p in ("learned", "random")]

    def ce(x):
        return torch.nn.functional.cross_entropy(x.flatten(0, 1), target)

    expected = sum(ce(o.logits) + ce(o.global_logits) + ce(o.local_logits) for o in passes) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(passes[0].global_logits, passes[1].global_logits)  # glance once, shared


# ------------------------------------------------------------------ optimiser and schedule
def test_four_sgd_groups_at_lr_times_ratio(setup):
    cfg, _ = setup
    module = fresh_module(cfg)
    setup_ = module.configure_optimizers()
    optimizer = setup_["optimizer"]
    assert type(optimizer) is torch.optim.SGD
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    ratios = {"policy": 0.1, "glance": 0.5, "focus": 1.0, "classifier": 5.0}  # SPEC §2
    assert lrs == pytest.approx({name: cfg.lr * ratio for name, ratio in ratios.items()}, rel=1e-12)
    for group in optimizer.param_groups:  # momentum 0.9, wd 1e-4 on every parameter, no Nesterov
        assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-4, False)
    model_groups = module.model.param_groups()
    for group in optimizer.param_groups:
        assert [id(p) for p in group["params"]] == [id(p) for p in model_groups[group["name"]]]
    assert setup_["lr_scheduler"]["interval"] == "epoch"


def test_cosine_per_epoch_on_the_real_optimiser(setup):
    """lr_e = 0.5 * lr * (1 + cos(pi * e / E)) for every group, stepped as Lightning does (epoch end)."""
    cfg, batch = setup
    epochs = 4
    cfg = compose_cfg(f"data_root={cfg.data_root}", f"output_dir={cfg.output_dir}", f"epochs={epochs}")
    module = fresh_module(cfg)
    module.train()
    setup_ = module.configure_optimizers()
    optimizer, scheduler = setup_["optimizer"], setup_["lr_scheduler"]["scheduler"]
    for epoch in range(epochs + 1):
        expected = 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / epochs))
        for group in optimizer.param_groups:
            ratio = cfg.optim.lr_ratios[group["name"]]
            assert group["lr"] == pytest.approx(expected * ratio, rel=1e-9, abs=1e-15), (epoch, group["name"])
        if epoch == 0:  # a real optimiser step in between: the schedule does not depend on it
            optimizer.zero_grad()
            module.training_step(batch, 0).backward()
            optimizer.step()
        scheduler.step()  # once per epoch


# ------------------------------------------------------------------ metrics (SPEC §4)
def test_video_metrics_top1_top5_and_map():
    logits = torch.tensor(
        [[4.0, 3, 2, 1, 0, -1], [0, 5, 1, 0, 0, 0], [-1, 0, 0, 0, 1, 6], [6, 1, 0, 0, 0, -1]]
    )
    labels = torch.tensor([[0, -1], [2, 1], [0, -1], [1, 3]])  # -1 padded, first label counts for accuracy
    metrics = VideoMetrics(num_classes=6, multilabel=True)
    metrics.update(logits[:2], labels[:2])
    metrics.update(logits[2:], labels[2:])  # two batches: state accumulates
    values = metrics.compute()
    assert values["top1"].item() == pytest.approx(25.0)  # only video 0: video 1's first label is 2
    assert values["top5"].item() == pytest.approx(75.0)  # video 2's class 0 is rank 6 -> out of the top 5
    # mAP by hand (non-interpolated AP over classes with a positive: 0, 1, 2, 3; 4 and 5 left out)
    scores = logits.softmax(-1)
    expected = []
    for c in range(4):
        positive = (labels == c).any(1)
        order = scores[:, c].argsort(descending=True)
        hits = positive[order].float()
        precision = hits.cumsum(0) / torch.arange(1, 5)
        expected.append((precision * hits).sum() / hits.sum())
    assert values["map"].item() == pytest.approx(100 * torch.stack(expected).mean().item(), rel=1e-5)
    value, excluded = mean_average_precision(scores, labels)
    assert value == pytest.approx(values["map"].item(), rel=1e-6) and excluded == 2
    assert set(VideoMetrics(6, multilabel=False).keys()) == {"top1", "top5"}
